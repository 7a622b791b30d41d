"""The frozen DINO ViT backbone: a timm VisionTransformer, DINO's positional-embedding resampling,
a loader for the official DINO checkpoints, and access to the last block's [CLS] attention.

Only the last block is computed by hand; every other block runs timm's own (fused-attention) forward.
The final [CLS] token depends on the last block's attention only through its [CLS] row, so that row
is all the pseudo-mask stage needs to differentiate (see `cls_from_attention`).
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..errors import InputFileNotFound, InputValueError
from .archs import ARCHS
from .weights import load_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINO_CHECKPOINTS = {
    ("vit_small", 8): "dino_deitsmall8_pretrain.pth",
    ("vit_small", 16): "dino_deitsmall16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain.pth",
}
DINO_URL = "https://dl.fbaipublicfiles.com/dino/"


def interpolate_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Resample a (1, 1 + n*n, D) positional embedding to a rows x cols patch grid exactly as DINO does:
    bicubic, scale factor (grid + 0.1) / n per axis, align_corners=False, no antialias."""
    n = int(math.sqrt(pos_embed.shape[1] - 1))
    if rows == n and cols == n:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic",
                         align_corners=False)
    assert grid.shape[-2:] == (rows, cols), (grid.shape, rows, cols)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


class DinoViT(nn.Module):
    """A DINO ViT on any input whose sides are multiples of the patch size."""

    def __init__(self, arch: str = "vit_small", patch_size: int = 8):
        super().__init__()
        if arch not in ARCHS:
            raise InputValueError(f"backbone.arch: unknown '{arch}', expected one of {sorted(ARCHS)}")
        size = ARCHS[arch]
        self.arch, self.patch_size, self.embed_dim, self.num_heads = arch, patch_size, size.embed_dim, size.num_heads
        self.vit = VisionTransformer(
            img_size=224, patch_size=patch_size, embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads,
            mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- input -------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> ImageNet-normalised input."""
        return (images - self.mean) / self.std

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> [CLS] + patch tokens with positions (B, 1 + hw, D)."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        patches = self.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tok = torch.cat([self.vit.cls_token.expand(B, -1, -1), patches], dim=1)
        return tok + interpolate_pos_embed(self.vit.pos_embed, H // p, W // p)

    # -- forwards ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed tokens (B, 1 + hw, D); every block uses fused attention."""
        t = self.tokens(x)
        for blk in self.vit.blocks:
            t = blk(t)
        return self.vit.norm(t)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering the last block (B, N, D): every block but the last, fused attention."""
        t = self.tokens(x)
        for blk in self.vit.blocks[:-1]:
            t = blk(t)
        return t

    def last_block_attention(self, t: torch.Tensor):
        """The last block's [CLS]-row attention and values for the tokens t (B, N, D) entering it.

        Returns (attn_cls, v): attn_cls (B, heads, N) softmax weights of the [CLS] query over all N
        tokens, v (B, heads, N, head_dim)."""
        attn = self.vit.blocks[-1].attn
        B, N, D = t.shape
        qkv = attn.qkv(self.vit.blocks[-1].norm1(t)).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q_cls = q[:, :, :1] * attn.scale
        attn_cls = (q_cls @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
        return attn_cls, v

    def last_block_inputs(self, x: torch.Tensor):
        """Tokens entering the last block, plus that block's [CLS]-row attention and values:
        (t, attn_cls, v) as in `trunk` and `last_block_attention`."""
        t = self.trunk(x)
        return (t, *self.last_block_attention(t))

    def cls_from_attention(self, t: torch.Tensor, attn_cls: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Final normed [CLS] token (B, D) as a function of the last block's [CLS] attention row."""
        blk = self.vit.blocks[-1]
        B = t.shape[0]
        out = (attn_cls.unsqueeze(2) @ v).reshape(B, -1)  # (B, heads*head_dim), heads outermost
        c = t[:, 0] + blk.drop_path1(blk.ls1(blk.attn.proj(blk.attn.norm(out))))
        c = c + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(c))))
        return self.vit.norm(c)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention of [CLS] to the patch tokens, averaged over heads: (B, hw)."""
        _, attn_cls, _ = self.last_block_inputs(x)
        return attn_cls[:, :, 1:].mean(1)


# -- checkpoints ------------------------------------------------------------------------------------
def _unwrap_state_dict(obj) -> dict:
    for key in ("teacher", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):  # DINO projection head, not part of the backbone
            continue
        out[k] = v
    return out


def load_dino_checkpoint(model: DinoViT, path: str | Path) -> None:
    """Load an official DINO checkpoint (plain, `teacher`-wrapped, `module.`/`backbone.`-prefixed)
    with strict key matching."""
    path = Path(path)
    if not path.is_file():
        name = DINO_CHECKPOINTS.get((model.arch, model.patch_size), "the DINO checkpoint for this arch")
        raise InputFileNotFound(
            f"backbone checkpoint not found: {path}. Expected the official DINO weights ({name}), "
            f"published at {DINO_URL} (see docs/usage.md, 'Backbone weights'); nothing is downloaded at run time.")
    load_strict(model.vit, _unwrap_state_dict(load_tensors(path)),
                f"{path}: does not match backbone {model.arch}/{model.patch_size}")


def load_tensors(path: Path):
    """The contents of a checkpoint read with torch.load(weights_only=True): tensors, containers and plain
    values, plus the argparse.Namespace of `args` that DINO's full training checkpoints
    (dino_<arch><patch>_full_checkpoint.pth, `teacher` / `student` / `args` ...) hold. Any other pickled object
    is an InputValueError: no code from the file runs."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:
            raise
        raise InputValueError(f"{path}: holds pickled objects other than tensors ({found.group(1)}); if you trust "
                              "the file, load it with torch.load(path, weights_only=False) and torch.save its "
                              "state_dict (or its 'teacher' entry)") from None


def build_backbone(arch: str, patch_size: int, checkpoint: str | Path | None, seed: int = 0) -> DinoViT:
    """The frozen backbone in eval mode. Without a checkpoint the weights are random (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DinoViT(arch, patch_size)
    if checkpoint:
        load_dino_checkpoint(model, checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
