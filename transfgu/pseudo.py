"""Pseudo masks by gradient-weighted attention (docs/method.md section 3), for all concepts at once.

For concept k with centre c_k the loss is L_k = 1 - cos(z, c_k) on the final [CLS] token z, and the
map needs G_k = dL_k / dA at the [CLS] row of the last block's attention. z depends on A only through
that row, and all K losses share one forward: so one forward computes the row, and one vectorised
vector-Jacobian product (torch.func.vmap over the K cotangents dL_k/dz) gives every G_k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from .devices import to_device
from .precision import autocast


def cosine_loss_cotangents(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """d(1 - cos(z_b, c_k)) / dz_b for every concept: (K, B, D)."""
    z_norm = z.norm(dim=1, keepdim=True)
    z_hat = z / z_norm
    c_hat = F.normalize(centroids, dim=1)
    cos = z_hat @ c_hat.T  # (B, K)
    grad = (cos.T[:, :, None] * z_hat[None] - c_hat[:, None, :]) / z_norm[None]
    return grad


def keep_top_mass(g: torch.Tensor, mass: float = 0.8) -> torch.Tensor:
    """Boolean mask of the entries of g (..., n) >= 0 holding the top `mass` of its total: sort
    ascending, normalise to sum 1, keep where the cumulative sum exceeds 1 - mass."""
    values, order = g.sort(dim=-1)
    total = values.sum(dim=-1, keepdim=True)
    cum = (values / total.clamp_min(torch.finfo(g.dtype).tiny)).cumsum(dim=-1)
    keep_sorted = (cum > 1 - mass) & (total > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def attention_gradients(backbone, images: torch.Tensor, centroids: torch.Tensor, precision: str = "fp32"):
    """G (B, K, hw): dL_k/dA at the [CLS] row and patch columns, averaged over heads, for
    L_k = 1 - cos(z, c_k) of each image; and the head-averaged attention row a (B, hw). Register / storage
    tokens (DINOv2 with registers, DINOv3) take part in the attention but are left out of both maps.

    precision 'bf16' runs the trunk (every block but the last) in bf16 autocast; the last block, the
    attention row and its gradient stay in the input's precision (float32)."""
    with torch.no_grad():
        with autocast(precision, images.device):
            t = backbone.trunk(images)
        t = t.to(images.dtype)  # the last block in the input's precision (float32, or float64 in tests)
        attn_cls, v = backbone.last_block_attention(t, backbone.grid(images))
        z = backbone.cls_from_attention(t, attn_cls, v)
    cotangents = cosine_loss_cotangents(z.float(), centroids.float()).to(z.dtype)
    _, pullback = vjp(lambda a: backbone.cls_from_attention(t, a, v), attn_cls)
    grads = vmap(pullback)(cotangents)[0]  # (K, B, heads, N)
    n = backbone.num_prefix_tokens  # [CLS] and the registers
    G = grads[..., n:].mean(2).transpose(0, 1)  # (B, K, hw)
    return G, attn_cls[:, :, n:].mean(1)


def pseudo_mask_parts(backbone, images: torch.Tensor, centroids: torch.Tensor, grad_scale: float = 1.0,
                      mass: float = 0.8, precision: str = "fp32"):
    """The two parts of the pseudo maps: the normalised attention a (B, h, w), shared by all concepts,
    and per concept q (B, K, h, w) = the kept part of relu(-G_k), or -1 where G_k > 0.

    P_k = a + q_k where q_k >= 0, else 0 (`assemble_pseudo_masks`). Stored this way, a low-precision
    copy of q keeps the relative precision of the gradient term, which is what separates concepts:
    rounding P itself to fp16 would round away differences that are small next to a.
    grad_scale multiplies G (the original code differentiates the loss averaged over its batch, i.e.
    grad_scale = 1 / published batch size). precision: see `attention_gradients`."""
    B, _, H, W = images.shape
    h, w = H // backbone.patch_size, W // backbone.patch_size
    G, a = attention_gradients(backbone, images, centroids, precision)
    G = G * grad_scale
    a = a / a.amax(dim=1, keepdim=True)
    g = torch.relu(-G)
    g = g * keep_top_mass(g, mass)
    q = g.masked_fill(G > 0, -1.0)
    return a.reshape(B, h, w), q.reshape(B, -1, h, w)


def assemble_pseudo_masks(a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P (B, K, h, w) from the parts of `pseudo_mask_parts`."""
    q = q.to(a.dtype)
    return torch.where(q >= 0, a[:, None] + q, torch.zeros_like(q))


def maps_on(maps, device) -> torch.Tensor:
    """A batch of pseudo maps (B, K, h, w) float32 on `device`: a tensor is moved; the stored parts
    {"attention": (B, h, w), "gradient": (B, K, h, w) float16} (a collated `PseudoMaskReader` batch) are moved
    and assembled there. Elementwise, so the values are those of assembling on the host."""
    if isinstance(maps, torch.Tensor):
        return to_device(maps, device)
    return assemble_pseudo_masks(to_device(maps["attention"], device), to_device(maps["gradient"], device))


def pseudo_masks(backbone, images: torch.Tensor, centroids: torch.Tensor, grad_scale: float = 1.0,
                 mass: float = 0.8, precision: str = "fp32") -> torch.Tensor:
    """Pseudo maps (B, K, h, w) for normalised images (B, 3, R, R) and concept centres (K, D):
    P_k = a + (top-mass part of relu(-G_k)), zero where G_k > 0."""
    return assemble_pseudo_masks(*pseudo_mask_parts(backbone, images, centroids, grad_scale, mass, precision))
