"""Slow reference versions of the pipeline's batched maths, written the plain way (loops, one item at a time).
The tests check the fast paths against them; benchmarks/bench.py times them as its baselines.

Import: benchmarks/ on sys.path (the benchmark scripts have it; the tests insert it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from transfgu.crops import select_crops


def reference_concept_gradients(backbone, images, centroids):
    """The original per-concept loop: the full last-block attention matrix A, one backward per concept of the
    batch-mean loss 1 - cos(z, c). Returns the [CLS] attention to the patches averaged over heads (B, hw) and each
    concept's gradient dL/dA on the [CLS] row, patch columns, averaged over heads (B, K, hw).

    A is the matrix timm's own last block computes (its unfused attention path): a forward hook on the block's
    attention dropout swaps in a copy of A that requires grad, and the rest of timm's block and final norm give z.
    Register / storage tokens (DINOv2 with registers, DINOv3) are in A; their columns are left out of the maps."""
    vit = backbone.vit
    H, W = images.shape[-2:]
    grid = (H // backbone.patch_size, W // backbone.patch_size)
    t, rope = backbone.tokens(images), backbone.rope(grid)
    run = (lambda blk, t: blk(t)) if rope is None else (lambda blk, t: blk(t, rope=rope))  # noqa: E731
    for blk in vit.blocks[:-1]:
        t = run(blk, t)
    blk = vit.blocks[-1]
    captured = {}

    def swap(module, inputs, output):
        captured["A"] = output.detach().requires_grad_(True)
        return captured["A"]

    fused, blk.attn.fused_attn = blk.attn.fused_attn, False
    hook = blk.attn.attn_drop.register_forward_hook(swap)
    try:
        z = vit.norm(run(blk, t))[:, 0]
    finally:
        hook.remove()
        blk.attn.fused_attn = fused
    A, n = captured["A"], backbone.num_prefix_tokens
    grads = []
    for c in centroids:
        A.grad = None
        (1 - F.cosine_similarity(z, c[None], dim=1)).mean().backward(retain_graph=True)
        grads.append(A.grad[:, :, 0, n:].mean(1))
    return A[:, :, 0, n:].mean(1).detach(), torch.stack(grads, 1)


def reference_pseudo_masks(backbone, images, centroids, mass=0.8):
    """Pseudo masks (B, K, h, w) the original way: `reference_concept_gradients`, then per concept and image a
    plain sort / cumsum keeping the top `mass` of relu(-G), added to the max-normalised attention; 0 where
    G > 0."""
    B, _, H, W = images.shape
    h, w = H // backbone.patch_size, W // backbone.patch_size
    a, grads = reference_concept_gradients(backbone, images, centroids)
    a = a / a.max(dim=1, keepdim=True).values
    maps = []
    for G in grads.unbind(1):
        g = torch.relu(-G)
        keep = torch.zeros_like(g, dtype=torch.bool)
        for b in range(B):
            vals, idx = torch.sort(g[b])
            if vals.sum() > 0:
                cum = torch.cumsum(vals / vals.sum(), 0)
                keep[b, idx[cum > 1 - mass]] = True
        P = a + torch.where(keep, g, torch.zeros_like(g))
        P[G > 0] = 0
        maps.append(P.view(B, h, w))
    return torch.stack(maps, 1)


def reference_cut_crops(images, image_index, boxes, size):
    """Each pixel box [y0, x0, y1, x1] (end exclusive) sliced from its image and resized on its own (bilinear,
    align_corners=False): (M, C, size, size)."""
    return torch.cat([F.interpolate(images[i:i + 1, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
                                    align_corners=False)
                      for i, (y0, x0, y1, x1) in zip(image_index.tolist(), boxes.tolist())])


def reference_crop_features(backbone, images, windows, crop_size, things_only=False):
    """Per image: its [CLS] attention map and window selection, then each selected window (in window order,
    thing crops then stuff crops) cut with the published slice (one pixel short of the window on the bottom
    and right) and resized on its own, the image's crops forwarded together. Returns ((thing features, stuff
    features): per image (n, D)), thing and stuff masks (B, W)."""
    p = backbone.patch_size
    out, masks = ([], []), ([], [])
    for img in images:
        grid = img.shape[-1] // p
        thing, stuff = select_crops(backbone.cls_attention(img[None]).view(1, grid, grid), windows)
        keeps = (thing[0], stuff[0] & (not things_only))
        boxes = [[p * y0, p * x0, p * y1 - 1, p * x1 - 1]
                 for keep in keeps for y0, x0, y1, x1 in windows[keep].tolist()]
        feats = torch.zeros(0, backbone.embed_dim)
        if boxes:
            crops = reference_cut_crops(img[None], torch.zeros(len(boxes), dtype=torch.long), torch.tensor(boxes),
                                        crop_size)
            feats = backbone(crops)[:, 0]
        n_thing = int(keeps[0].sum())
        out[0].append(feats[:n_thing])
        out[1].append(feats[n_thing:])
        masks[0].append(thing[0])
        masks[1].append(stuff[0])
    return out, torch.stack(masks[0]), torch.stack(masks[1])
