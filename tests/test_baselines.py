"""The patch k-means baseline."""
import numpy as np
import torch

from transfgu.baselines import patch_kmeans_confusion, patch_tokens
from transfgu.metrics import segmentation_scores
from transfgu.models.vit import build_backbone

def test_patch_kmeans_on_images_whose_patches_are_two_colours():
    """Left half one colour, right half another, labels likewise: two clusters split the patches exactly
    along the label boundary (at patch resolution), so the matched accuracy is 100%."""
    torch.manual_seed(0)
    bb = build_backbone("vit_mini", 8, None, seed=0)
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    for i in range(4):
        cut = 8 * (i + 1)  # on patch boundaries
        images[i, :, :, :cut] = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None]
        images[i, :, :, cut:] = torch.tensor([20, 40, 220], dtype=torch.uint8)[:, None, None]
        labels[i, :, cut:] = 1
    loader = [{"image": images[:2], "label": labels[:2]}, {"image": images[2:], "label": labels[2:]}]
    conf = patch_kmeans_confusion(bb, loader, 2, 2, "cpu", niter=20)
    assert conf.sum() == 4 * 32 * 32
    s = segmentation_scores(conf)
    # with a random backbone the token depends on position too; the colour contrast dominates here
    assert s["pixel_accuracy"] > 90


def test_patch_tokens_are_unit_norm_on_the_patch_grid():
    bb = build_backbone("vit_mini", 8, None, seed=0)
    t = patch_tokens(bb, torch.rand(2, 3, 24, 40))
    assert t.shape == (2, 3, 5, 192)
    np.testing.assert_allclose(t.norm(dim=-1).numpy(), 1.0, atol=1e-5)
