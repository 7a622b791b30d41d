import pytest
import torch

from transfgu.models.vit import build_backbone


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random-weight 4-block ViT with 8-px patches (no checkpoint)."""
    return build_backbone("vit_mini", 8, checkpoint=None, seed=0).double()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
