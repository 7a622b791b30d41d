"""Batched training augmentation on the device (docs/method.md section 4).

Every random choice is drawn per sample from a generator seeded by (seed, epoch, sample index), so a
sample's augmentation does not depend on which batch or process it lands in."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .devices import to_device

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_GRAY = {}  # (device, dtype) -> the weights as a (1, 3, 1, 1) tensor there, made once


@dataclass
class AugmentParams:
    jitter: torch.Tensor      # (B,) bool
    factors: torch.Tensor     # (B, 4) brightness, contrast, saturation, hue
    gray: torch.Tensor        # (B,) bool
    blur: torch.Tensor        # (B,) bool
    sigma: torch.Tensor       # (B,)
    box: torch.Tensor         # (B, 4) x0, y0, x1, y1 in pixels of the R image
    flip: torch.Tensor        # (B,) bool


def draw_params(seed: int, epoch: int, indices, size: int, jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.3,
                p_gray=0.2, p_blur=0.2, sigma=(1.0, 2.0), scales=(0.4, 0.9), p_flip=0.5) -> AugmentParams:
    rows = []
    for i in indices:
        rng = np.random.default_rng([seed, epoch, int(i)])
        u = rng.random(12)
        b, c, s, h = jitter
        factors = [1 - b + 2 * b * u[1], 1 - c + 2 * c * u[2], 1 - s + 2 * s * u[3], -h + 2 * h * u[4]]
        n_scales = int(round((scales[1] - scales[0]) * 10)) + 1  # 0.4, 0.5, ..., 0.9
        scale = scales[0] + 0.1 * min(int(u[7] * n_scales), n_scales - 1)
        side = int(size * scale)
        y0, x0 = int((size - side) * u[8]), int((size - side) * u[9])
        rows.append([u[0] < p_jitter, *factors, u[5] < p_gray, u[6] < p_blur,
                     sigma[0] + (sigma[1] - sigma[0]) * u[10], x0, y0, x0 + side, y0 + side, u[11] < p_flip])
    t = torch.tensor(rows, dtype=torch.float64)
    return AugmentParams(jitter=t[:, 0].bool(), factors=t[:, 1:5].float(), gray=t[:, 5].bool(),
                         blur=t[:, 6].bool(), sigma=t[:, 7].float(), box=t[:, 8:12].float(), flip=t[:, 12].bool())


def grayscale(img: torch.Tensor) -> torch.Tensor:
    key = (img.device, img.dtype)
    if key not in _GRAY:  # a copy from a Python list per call would wait for the GPU each time
        _GRAY[key] = torch.tensor(GRAY_WEIGHTS, dtype=img.dtype).view(1, 3, 1, 1).to(img.device)
    return (img * _GRAY[key]).sum(1, keepdim=True)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    maxc, minc = img.max(1).values, img.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h % 1.0, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(img: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (multiplicative factors) and hue shift (fraction of a turn),
    one set per image, applied in that order to RGB in [0, 1]."""
    f = to_device(factors, img.device).view(-1, 4, 1, 1, 1).unbind(1)
    img = (img * f[0]).clamp(0, 1)
    mean = grayscale(img).mean((1, 2, 3), keepdim=True)
    img = (f[1] * img + (1 - f[1]) * mean).clamp(0, 1)
    img = (f[2] * img + (1 - f[2]) * grayscale(img)).clamp(0, 1)
    hsv = rgb_to_hsv(img)
    hsv = torch.stack([(hsv[:, 0] + f[3][:, 0]) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def gaussian_blur3(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with one sigma per image (reflect padding)."""
    B, C, H, W = img.shape
    x = torch.arange(-1.0, 2.0, device=img.device)  # -1, 0, 1, made on the device
    k1 = torch.exp(-(x[None] ** 2) / (2 * to_device(sigma, img.device)[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).to(img.dtype)  # (B, 3, 3)
    weight = k2.repeat_interleave(C, 0)[:, None]
    out = F.conv2d(F.pad(img.reshape(1, B * C, H, W), (1, 1, 1, 1), mode="reflect"), weight, groups=B * C)
    return out.view(B, C, H, W)


def augment(images: torch.Tensor, maps: torch.Tensor, params: AugmentParams, out_size: int, map_size: int):
    """images (B, 3, R, R) RGB in [0, 1], maps (B, K, h, h) -> augmented images (B, 3, out, out) and the
    same crop of the maps (B, K, map_size, map_size) via roi_align."""
    dev = images.device
    B, _, R, _ = images.shape
    sel = lambda m: to_device(m, dev).view(-1, 1, 1, 1)  # noqa: E731
    if params.jitter.any():
        images = torch.where(sel(params.jitter), color_jitter(images, params.factors), images)
    if params.gray.any():
        images = torch.where(sel(params.gray), grayscale(images).expand_as(images), images)
    if params.blur.any():
        images = torch.where(sel(params.blur), gaussian_blur3(images, params.sigma), images)
    idx = torch.arange(B, dtype=images.dtype, device=dev)[:, None]
    box = to_device(params.box, dev).to(images.dtype)
    images = roi_align(images, torch.cat([idx, box], 1), (out_size, out_size), 1.0, sampling_ratio=1, aligned=True)
    scale = maps.shape[-1] / R
    maps = roi_align(maps, torch.cat([idx.to(maps.dtype), box.to(maps.dtype)], 1), (map_size, map_size), scale,
                     sampling_ratio=0, aligned=True)
    flip = to_device(params.flip, dev)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    maps = torch.where(flip.view(-1, 1, 1, 1), maps.flip(-1), maps)
    return images, maps
