import torch
import torch.nn.functional as F

from transfgu.pseudo import keep_top_mass, pseudo_masks


def reference_pseudo_masks(backbone, images, centroids, mass=0.8):
    """The original algorithm: full last-block attention matrix, one backward per concept, loss
    averaged over the batch."""
    vit = backbone.vit
    B, _, H, W = images.shape
    h, w = H // backbone.patch_size, W // backbone.patch_size
    t = backbone.tokens(images)
    for blk in vit.blocks[:-1]:
        t = blk(t)
    blk = vit.blocks[-1]
    N, D = t.shape[1], t.shape[2]
    heads = backbone.num_heads
    qkv = blk.attn.qkv(blk.norm1(t)).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    A = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1).detach().requires_grad_(True)
    out = (A @ v).transpose(1, 2).reshape(B, N, D)
    t = t + blk.attn.proj(out)
    t = t + blk.mlp(blk.norm2(t))
    z = vit.norm(t)[:, 0]
    a = A[:, :, 0, 1:].mean(1).detach()
    a = a / a.max(dim=1, keepdim=True).values
    maps = []
    for c in centroids:
        A.grad = None
        loss = (1 - F.cosine_similarity(z, c[None], dim=1)).mean()
        loss.backward(retain_graph=True)
        G = A.grad[:, :, 0, 1:].mean(1)
        g = torch.relu(-G)
        keep = torch.zeros_like(g, dtype=torch.bool)
        for b in range(B):  # plain per-image sort / cumsum
            vals, idx = torch.sort(g[b])
            if vals.sum() > 0:
                cum = torch.cumsum(vals / vals.sum(), 0)
                keep[b, idx[cum > 1 - mass]] = True
        P = a + torch.where(keep, g, torch.zeros_like(g))
        P[G > 0] = 0
        maps.append(P.view(B, h, w))
    return torch.stack(maps, 1)


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
