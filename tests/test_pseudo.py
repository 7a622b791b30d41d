
import torch

from transfgu.pseudo import keep_top_mass, pseudo_masks

from reference import reference_pseudo_masks  # the original per-concept loop


def test_batched_pseudo_masks_equal_per_concept_loop(tiny_backbone):
    images = torch.randn(3, 3, 48, 40, dtype=torch.float64)
    centroids = torch.randn(7, tiny_backbone.embed_dim, dtype=torch.float64)
    fast = pseudo_masks(tiny_backbone, images, centroids, grad_scale=1 / 3)
    ref = reference_pseudo_masks(tiny_backbone, images, centroids)
    assert fast.shape == (3, 7, 6, 5)
    assert (ref > 0).any() and (ref == 0).any()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_batched_pseudo_masks_equal_loop_in_float32(tiny_backbone):
    bb = tiny_backbone.float()
    try:
        images = torch.randn(2, 3, 32, 32)
        centroids = torch.randn(5, bb.embed_dim)
        fast = pseudo_masks(bb, images, centroids, grad_scale=1 / 2)
        ref = reference_pseudo_masks(bb, images, centroids)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    finally:
        tiny_backbone.double()


def test_keep_top_mass_on_hand_made_values():
    g = torch.tensor([[0.0, 0.1, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # sorted: 0, .1, .2, .2, .5 -> cumsum 0, .1, .3, .5, 1.0 -> keep > .2: the two .2 and .5
    keep = keep_top_mass(g, 0.8)
    assert keep.tolist() == [[False, False, True, True, True], [False] * 5]
