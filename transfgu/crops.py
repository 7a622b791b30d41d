"""Crop windows on the patch grid, their thing/stuff selection from the [CLS] attention, and the
crop [CLS] feature bank (docs/method.md section 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast

THING_STUFF_WINDOW_SIZES = (0.5, 0.4, 0.3, 0.2)
THINGS_ONLY_WINDOW_SIZES = (0.6, 0.5, 0.4, 0.3)


def window_span(grid: int, size: float) -> int:
    """The span b = int(grid * size) of a relative window size (Python's float product, truncated: the
    published rule, e.g. int(32 * 0.3) = 9)."""
    return int(grid * size)


def window_centres(grid: int, span: int) -> list[int]:
    """Allowed centre cells, ascending, along one axis of a `grid`-cell axis for windows of span b.

    A window holds the cells within b/2 of its centre c, so it must satisfy c - b/2 >= 0 and
    c + b/2 < grid. The centres are the integer multiples of b/2 that satisfy both (for odd b the
    integer multiples of b/2 are the multiples of b, and the condition c >= b/2 rules out c = 0), plus
    the far-edge centre grid - 1 - b/2 when that is an integer (even b) and not already listed.
    Empty when no window of that span fits."""
    if span < 1:
        return []
    half, odd = divmod(span, 2)  # b / 2 = half + odd / 2
    if odd:  # c - half - 1/2 >= 0 and c + half + 1/2 < grid, c integer: c in [half + 1, grid - 1 - half]
        lo, hi, step = half + 1, grid - 1 - half, span
    else:  # c in [half, grid - 1 - half], multiples of half
        lo, hi, step = half, grid - 1 - half, half
    if hi < lo:
        return []
    first = -(-lo // step) * step
    centres = list(range(first, hi + 1, step))
    if not odd and (not centres or centres[-1] != hi):
        centres.append(hi)  # the far-edge centre
    return centres


def crop_windows(grid: int, sizes=THING_STUFF_WINDOW_SIZES) -> torch.Tensor:
    """Square windows (W, 4) as [y0, x0, y1, x1] in patches (end exclusive) on a grid x grid patch grid.

    For each relative size s in `sizes`, in that order: span b = int(grid * s), windows of side
    2 * (b // 2) + 1 (b + 1 cells for even b, b for odd b) centred on every pair (row centre, column
    centre) of `window_centres`, row-major. Raises ValueError when a size gives no window on the grid."""
    boxes = []
    for s in sizes:
        span = window_span(grid, s)
        centres = window_centres(grid, span)
        if not centres:
            raise ValueError(f"window size {s} gives no window on a {grid}-patch grid (span int({grid} * {s}) = "
                             f"{span}: no centre c with c - {span}/2 >= 0 and c + {span}/2 < {grid})")
        half = span // 2
        starts = [c - half for c in centres]
        side = 2 * half + 1
        boxes += [(y, x, y + side, x + side) for y in starts for x in starts]
    return torch.tensor(boxes, dtype=torch.long)


def window_pixel_boxes(windows: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The published pixel slices (M, 4) [y0, x0, y1, x1] (end exclusive) of patch windows (M, 4).

    A window of cells [y0, y1) covers pixels p * y0 .. p * y1 - 1; the published cut stops one pixel
    earlier, at p * y1 - 1 exclusive (and the same on x): slices of p * side - 1 pixels."""
    start = windows[:, :2] * patch_size
    return torch.cat([start, windows[:, 2:] * patch_size - 1], dim=1)


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


# On the CPU one F.interpolate call resizes at most this many output values (8 MB of float32): larger calls
# were slower there than a loop over single crops (big fresh buffers, which the CPU kernel also copies).
CPU_CUT_VALUES = 2 ** 21


def cut_crops(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, out_size: int) -> torch.Tensor:
    """Cut pixel boxes from `images` (B, C, H, W) and resize each to out_size x out_size: (M, C, out, out).

    image_index (M,) says which image each crop comes from; boxes (M, 4) = [y0, x0, y1, x1] in pixels,
    end exclusive, inside the image. Each crop equals
    F.interpolate(images[i, :, y0:y1, x0:x1], (out_size, out_size), bilinear, align_corners=False) of
    its slice alone (edge pixels repeated, nothing read outside the slice). Batched: the boxes of one
    shape are gathered and resized together (one F.interpolate call on an accelerator; calls of at
    most CPU_CUT_VALUES output values on the CPU); the crops come back in the order of the boxes."""
    M = len(boxes)
    B, C, H, W = images.shape
    dev = images.device
    out = images.new_empty((M, C, out_size, out_size))
    if M == 0:
        return out
    boxes = boxes.to(dev, torch.long)
    image_index = image_index.to(dev, torch.long)
    hw = boxes[:, 2:] - boxes[:, :2]
    bad = (hw < 1).any(1) | (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > H) | (boxes[:, 3] > W)
    if bad.any():
        raise ValueError(f"cut_crops: empty box or box outside the {H} x {W} image: {boxes[bad][:4].tolist()}")
    shapes, group = torch.unique(hw, dim=0, return_inverse=True)
    step = max(1, CPU_CUT_VALUES // (C * out_size * out_size)) if dev.type == "cpu" else M
    for g, (h, w) in enumerate(shapes.tolist()):
        # every h x w slice of every image as a view (B, C, H-h+1, W-w+1, h, w); indexing it by
        # (image, y0, x0) copies the slices out at once: (m, C, h, w)
        views = images.unfold(2, h, 1).unfold(3, w, 1)
        members = (group == g).nonzero().flatten()
        for start in range(0, len(members), step):
            sel = members[start:start + step]
            slices = views[image_index[sel], :, boxes[sel, 0], boxes[sel, 1]]
            out[sel] = F.interpolate(slices, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def crop_features(backbone, images: torch.Tensor, windows: torch.Tensor, crop_size: int,
                  crop_batch: int = 256, things_only: bool = False, thing_fraction: float = 0.5,
                  stuff_fraction: float = 0.8, precision: str = "fp32"):
    """Crop [CLS] features for a batch of normalised images at 2R (B, 3, 2R, 2R).

    Each selected window (per image, in window order) is cut with the published slice
    (`window_pixel_boxes`) and resized to crop_size x crop_size (`cut_crops`), crop_batch crops per
    forward. Returns two lists of length B: per image a (n_thing, D) and a (n_stuff, D) float32 tensor
    (stuff empty when things_only). precision 'bf16': the crop forwards run in bf16 autocast (crops cut
    from the float32 images). The attention map that selects the windows is always float32: in bf16,
    0.4-3.8 % of the window decisions flip on random weights (a patch near the mean-attention threshold
    changes side)."""
    B, _, H, W = images.shape
    p = backbone.patch_size
    attn = backbone.cls_attention(images)
    grid = H // p
    thing, stuff = select_crops(attn.view(B, grid, grid), windows, thing_fraction, stuff_fraction)
    boxes = window_pixel_boxes(windows.to(images.device), p)
    if things_only:
        stuff = torch.zeros_like(stuff)
    results = []
    for keep in (thing, stuff):
        img_idx, win_idx = keep.nonzero(as_tuple=True)
        feats = []
        for start in range(0, len(img_idx), crop_batch):
            sl = slice(start, start + crop_batch)
            crops = cut_crops(images, img_idx[sl], boxes[win_idx[sl]], crop_size)
            with autocast(precision, images.device):
                feats.append(backbone(crops)[:, 0].float())
        feats = torch.cat(feats) if feats else torch.zeros((0, backbone.embed_dim))
        counts = keep.sum(1).tolist()
        results.append(list(feats.cpu().split(counts)))
    return results[0], results[1]
