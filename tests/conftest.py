import os

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


@pytest.fixture(autouse=True, scope="session")
def _file_hash_cache(tmp_path_factory):
    """prepare's file-hash cache (transfgu.data.file_hashes) in a temporary folder, for the stages the tests run in
    process and in subprocesses, not in the user's ~/.cache."""
    saved = os.environ.get("TRANSFGU_HASH_CACHE")
    os.environ["TRANSFGU_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash_cache") / "file-hashes.sqlite")
    yield
    if saved is None:
        os.environ.pop("TRANSFGU_HASH_CACHE", None)
    else:
        os.environ["TRANSFGU_HASH_CACHE"] = saved
