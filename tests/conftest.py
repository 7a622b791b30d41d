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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: much faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
