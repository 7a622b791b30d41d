"""Crop windows on the patch grid, their thing/stuff selection from the [CLS] attention, and the
crop [CLS] feature bank (METHOD.md section 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .precision import autocast

THING_STUFF_WINDOW_SIZES = (0.5, 0.4, 0.3, 0.2)
THINGS_ONLY_WINDOW_SIZES = (0.6, 0.5, 0.4, 0.3)


def window_starts(grid: int, side: int) -> list[int]:
    """Start positions of windows of `side` patches along a `grid`-patch axis: stride side // 2, all
    windows inside the grid, the last one flush with the far edge."""
    stride = max(side // 2, 1)
    starts = list(range(0, grid - side + 1, stride))
    if starts[-1] != grid - side:
        starts.append(grid - side)
    return starts


def crop_windows(grid: int, sizes=THING_STUFF_WINDOW_SIZES) -> torch.Tensor:
    """Square windows (W, 4) as [y0, x0, y1, x1] in patches (end exclusive) on a grid x grid patch grid,
    for each relative size in `sizes` (side int(grid * s))."""
    boxes = []
    for s in sizes:
        side = int(grid * s)
        if side < 1:
            raise ValueError(f"window size {s} gives an empty window on a {grid}-patch grid")
        starts = window_starts(grid, side)
        boxes += [(y, x, y + side, x + side) for y in starts for x in starts]
    return torch.tensor(boxes, dtype=torch.long)


def window_fractions(mask: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Fraction of True cells of `mask` (B, G, G) inside each window (W, 4): (B, W), via an integral image."""
    B, G, _ = mask.shape
    integral = F.pad(mask.float().cumsum(1).cumsum(2), (1, 0, 1, 0))
    y0, x0, y1, x1 = windows.to(mask.device).unbind(1)
    total = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
    return total / ((y1 - y0) * (x1 - x0)).float()


def attention_foreground(cls_attention: torch.Tensor) -> torch.Tensor:
    """Foreground patches of [CLS] attention maps (B, G, G): attention above the map's own mean."""
    return cls_attention > cls_attention.mean(dim=(1, 2), keepdim=True)


def select_crops(cls_attention: torch.Tensor, windows: torch.Tensor, thing_fraction: float = 0.5,
                 stuff_fraction: float = 0.8):
    """Thing / stuff windows from the [CLS] attention map (B, G, G).

    Foreground = `attention_foreground`. A window is a thing crop when its foreground fraction is
    > thing_fraction, a stuff crop when its background fraction is > stuff_fraction.
    Returns two bool tensors (B, W)."""
    fg = attention_foreground(cls_attention)
    frac = window_fractions(fg, windows)
    return frac > thing_fraction, (1 - frac) > stuff_fraction


def cut_crops(images: torch.Tensor, image_index: torch.Tensor, windows_px: torch.Tensor, out_size: int) -> torch.Tensor:
    """Cut square crops from `images` (B, C, H, W) and resize them bilinearly to out_size, all at once.

    image_index (M,) says which image each crop comes from; windows_px (M, 4) = [y0, x0, y1, x1] in
    pixels. roi_align with one sample per output pixel is bilinear resampling at the same positions as
    F.interpolate(align_corners=False); it differs only within half an output pixel of the crop border,
    where it reads the neighbouring image pixels instead of repeating the crop's edge."""
    rois = torch.cat([image_index[:, None].to(images.dtype),
                      windows_px[:, [1, 0, 3, 2]].to(images.dtype)], dim=1).to(images.device)
    return roi_align(images, rois, (out_size, out_size), spatial_scale=1.0, sampling_ratio=1, aligned=True)


@torch.no_grad()
def crop_features(backbone, images: torch.Tensor, windows: torch.Tensor, crop_size: int,
                  crop_batch: int = 256, things_only: bool = False, thing_fraction: float = 0.5,
                  stuff_fraction: float = 0.8, precision: str = "fp32"):
    """Crop [CLS] features for a batch of normalised images at 2R (B, 3, 2R, 2R).

    Returns two lists of length B: per image a (n_thing, D) and a (n_stuff, D) float32 tensor (stuff
    empty when things_only). precision 'bf16': the crop forwards run in bf16 autocast (crops cut from the
    float32 images). The attention map that selects the windows is always float32: in bf16, 0.4-3.8 % of
    the window decisions flip on random weights (a patch near the mean-attention threshold changes side)."""
    B, _, H, W = images.shape
    p = backbone.patch_size
    attn = backbone.cls_attention(images)
    grid = H // p
    thing, stuff = select_crops(attn.view(B, grid, grid), windows, thing_fraction, stuff_fraction)
    if things_only:
        stuff = torch.zeros_like(stuff)
    results = []
    for keep in (thing, stuff):
        img_idx, win_idx = keep.nonzero(as_tuple=True)
        feats = []
        for start in range(0, len(img_idx), crop_batch):
            sl = slice(start, start + crop_batch)
            crops = cut_crops(images, img_idx[sl], windows.to(images.device)[win_idx[sl]] * p, crop_size)
            with autocast(precision, images.device):
                feats.append(backbone(crops)[:, 0].float())
        feats = torch.cat(feats) if feats else torch.zeros((0, backbone.embed_dim))
        counts = keep.sum(1).tolist()
        results.append(list(feats.cpu().split(counts)))
    return results[0], results[1]
