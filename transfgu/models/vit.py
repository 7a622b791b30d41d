"""The frozen self-supervised ViT backbone: DINO (v1), DINOv2 (with or without registers) and DINOv3, all timm
models; each family's positional embedding on any patch grid; loaders for the official checkpoints; and access to
the last block's [CLS] attention.

Only the last block is computed by hand; every other block runs timm's own (fused-attention) forward.
The final [CLS] token depends on the last block's attention only through its [CLS] row, so that row
is all the pseudo-mask stage needs to differentiate (see `cls_from_attention`).

Token layout inside the network: [CLS], then the registers (DINOv2 `register_tokens`, DINOv3 `storage_tokens`;
`num_prefix_tokens - 1` of them, none for DINO and plain DINOv2), then the patches row-major. What the pipeline
reads leaves the registers out: `forward` gives [CLS] + patch tokens, `cls_attention` the [CLS] row over the
patch columns only.

Positions: DINO and DINOv2 add a learnt embedding made for one grid (DINO 14 x 14 at 224 px, DINOv2 37 x 37 at
518 px), resampled to other grids as their official code does (`interpolate_pos_embed`): DINO and the DINOv2 hub
models without registers bicubic with scale factor (grid + 0.1) / n, no antialias (`interpolate_offset=0.1`,
`interpolate_antialias=False`); the DINOv2 hub models with registers bicubic to the size, antialiased
(`interpolate_offset=0.0`, `interpolate_antialias=True`). timm's own `dynamic_img_size` resampling is the latter
for every model, so it is not used. DINOv3 has no learnt embedding: RoPE on the patch grid, from timm's
`RotaryEmbeddingDinoV3`.
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
from .archs import ARCHS, DINO, DINOV2, DINOV3, resolve_patch
from .weights import load_strict, wrong_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINO_CHECKPOINTS = {
    ("vit_small", 8): "dino_deitsmall8_pretrain.pth",
    ("vit_small", 16): "dino_deitsmall16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain.pth",
}
DINO_URL = "https://dl.fbaipublicfiles.com/dino/"


def interpolate_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int, prefix: int = 1, offset: float = 0.1,
                          antialias: bool = False) -> torch.Tensor:
    """Resample a (1, prefix + n*n, D) positional embedding to a rows x cols patch grid as DINO and DINOv2 do:
    bicubic, align_corners=False, with scale factor (grid + offset) / n per axis (DINO, DINOv2 without registers:
    offset 0.1, no antialias), or to the size itself when offset is 0 (DINOv2 with registers: antialias); the
    first `prefix` entries (the [CLS] position; 0 for timm's DINOv2-with-registers layout, which has none)
    unchanged."""
    n = int(math.sqrt(pos_embed.shape[1] - prefix))
    if rows == n and cols == n:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :prefix], pos_embed[:, prefix:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    where = dict(scale_factor=((rows + offset) / n, (cols + offset) / n)) if offset else dict(size=(rows, cols))
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=antialias, **where)
    assert grid.shape[-2:] == (rows, cols), (grid.shape, rows, cols)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


def _timm_model(name: str, **overrides) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, num_classes=0, **overrides)


class DinoViT(nn.Module):
    """A DINO / DINOv2 / DINOv3 ViT on any input whose sides are multiples of the patch size."""

    def __init__(self, arch: str = "vit_small", patch_size: int | None = 8):
        super().__init__()
        if arch not in ARCHS:
            raise InputValueError(f"backbone.arch: unknown '{arch}', expected one of {sorted(ARCHS)}")
        spec = ARCHS[arch]
        patch_size = resolve_patch(arch, patch_size)
        self.arch, self.spec, self.family, self.patch_size = arch, spec, spec.family, patch_size
        self.embed_dim, self.num_heads = spec.embed_dim, spec.num_heads
        if spec.family == DINO:
            self.vit = VisionTransformer(
                img_size=224, patch_size=patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                num_classes=0)
        else:
            self.vit = _timm_model(spec.timm_name, **spec.overrides)
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        assert self.num_prefix_tokens == spec.prefix_tokens, (arch, self.num_prefix_tokens)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- input -------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> ImageNet-normalised input."""
        return (images - self.mean) / self.std

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The patch grid (rows, cols) of an input (B, 3, H, W)."""
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        return H // p, W // p

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> [CLS] + registers + patch tokens with positions
        (B, num_prefix_tokens + hw, D); DINOv3's positions (RoPE) come in the blocks instead (`rope`)."""
        B = x.shape[0]
        rows, cols = self.grid(x)
        vit = self.vit
        patches = vit.patch_embed.norm(vit.patch_embed.proj(x).flatten(2).transpose(1, 2))
        prefix = [vit.cls_token.expand(B, -1, -1)]
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(B, -1, -1))
        if self.family == DINOV3:
            return torch.cat([*prefix, patches], dim=1)
        if vit.no_embed_class:  # timm's DINOv2-with-registers layout: the [CLS] position is in cls_token
            # the register models' hub settings: interpolate_offset 0 (to the size), interpolate_antialias True
            pos = interpolate_pos_embed(vit.pos_embed, rows, cols, prefix=0, offset=0, antialias=True)
            return torch.cat([*prefix, patches + pos], dim=1)
        tok = torch.cat([prefix[0], patches], dim=1) + interpolate_pos_embed(vit.pos_embed, rows, cols)
        return torch.cat([tok[:, :1], *prefix[1:], tok[:, 1:]], dim=1)

    def rope(self, grid: tuple[int, int]):
        """DINOv3's rotary embedding of a rows x cols grid (timm's layout, sin and cos concatenated); None for the
        families with learnt positions."""
        if self.family != DINOV3:
            return None
        return self.vit.rope.get_embed(shape=list(grid))

    def _run(self, blocks, t: torch.Tensor, rope) -> torch.Tensor:
        for blk in blocks:
            t = blk(t) if rope is None else blk(t, rope=rope)
        return t

    # -- forwards ----------------------------------------------------------------------------------
    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed tokens, registers included (B, num_prefix_tokens + hw, D); every block uses fused attention."""
        return self.vit.norm(self._run(self.vit.blocks, self.tokens(x), self.rope(self.grid(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed [CLS] + patch tokens (B, 1 + hw, D), the registers left out."""
        t = self.forward_all(x)
        return t if self.num_prefix_tokens == 1 else torch.cat([t[:, :1], t[:, self.num_prefix_tokens:]], dim=1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering the last block (B, N, D), registers included: every block but the last, fused attention."""
        return self._run(self.vit.blocks[:-1], self.tokens(x), self.rope(self.grid(x)))

    def last_block_attention(self, t: torch.Tensor, grid: tuple[int, int] | None = None):
        """The last block's [CLS]-row attention and values for the tokens t (B, N, D) entering it; `grid` (rows,
        cols) of the patches, needed by DINOv3's RoPE (default: square).

        Returns (attn_cls, v): attn_cls (B, heads, N) softmax weights of the [CLS] query over all N
        tokens (registers included), v (B, heads, N, head_dim)."""
        blk = self.vit.blocks[-1]
        attn = blk.attn
        B, N, D = t.shape
        x = blk.norm1(t)
        if getattr(attn, "q_bias", None) is not None:  # DINOv3 _qkvb: q and v biases, k bias fixed at 0
            qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        else:
            qkv = attn.qkv(x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if self.family == DINOV3:
            from timm.layers import apply_rot_embed_cat
            if grid is None:
                side = math.isqrt(N - self.num_prefix_tokens)
                grid = (side, side)
            rope = self.rope(grid)
            n = self.num_prefix_tokens
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=attn.rotate_half)], 2).type_as(v)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=attn.rotate_half)], 2).type_as(v)
        q_cls = q[:, :, :1] * attn.scale
        attn_cls = (q_cls @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
        return attn_cls, v

    def last_block_inputs(self, x: torch.Tensor):
        """Tokens entering the last block, plus that block's [CLS]-row attention and values:
        (t, attn_cls, v) as in `trunk` and `last_block_attention`."""
        t = self.trunk(x)
        return (t, *self.last_block_attention(t, self.grid(x)))

    def _layer_scale(self, blk, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.family == DINOV3:  # timm's Eva block: gamma_1 / gamma_2, or None
            gamma = getattr(blk, f"gamma_{i}")
            return x if gamma is None else gamma * x
        return getattr(blk, f"ls{i}")(x)

    def cls_from_attention(self, t: torch.Tensor, attn_cls: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Final normed [CLS] token (B, D) as a function of the last block's [CLS] attention row."""
        blk = self.vit.blocks[-1]
        B = t.shape[0]
        out = (attn_cls.unsqueeze(2) @ v).reshape(B, -1)  # (B, heads*head_dim), heads outermost
        c = t[:, 0] + blk.drop_path1(self._layer_scale(blk, 1, blk.attn.proj(blk.attn.norm(out))))
        c = c + blk.drop_path2(self._layer_scale(blk, 2, blk.mlp(blk.norm2(c))))
        return self.vit.norm(c)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention of [CLS] to the patch tokens (registers left out), averaged over heads:
        (B, hw)."""
        _, attn_cls, _ = self.last_block_inputs(x)
        return attn_cls[:, :, self.num_prefix_tokens:].mean(1)


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


def official_layout(model: DinoViT) -> dict:
    """Key -> shape of the official checkpoint of a DINOv2 / DINOv3 backbone (the state dict of facebookresearch/
    dinov2's or dinov3's DinoVisionTransformer), derived from the timm model: DINOv2 `register_tokens`, a
    `pos_embed` with the [CLS] position, `mask_token`; DINOv3 `storage_tokens`, `ls1.gamma` / `ls2.gamma`, a
    fused `qkv.bias` with its `bias_mask`, `rope_embed.periods`, `mask_token`."""
    out = {}
    D = model.embed_dim
    for k, v in model.vit.state_dict().items():
        shape = tuple(v.shape)
        if k == "reg_token":
            k = "register_tokens" if model.family == DINOV2 else "storage_tokens"
        elif k == "pos_embed" and model.vit.no_embed_class:
            shape = (1, shape[1] + 1, shape[2])
        elif model.family == DINOV3:
            k = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)
            if k.endswith(("attn.q_bias", "attn.v_bias")):
                continue
        out[k] = shape
    out["mask_token"] = (1, D)
    if model.family == DINOV3:
        for i in range(len(model.vit.blocks)):
            out[f"blocks.{i}.attn.qkv.bias"] = out[f"blocks.{i}.attn.qkv.bias_mask"] = (3 * D,)
        out["rope_embed.periods"] = tuple(model.vit.rope.periods.shape)
    return out


def _where_published(model: DinoViT) -> str:
    spec = model.spec
    if model.family == DINO:
        name = DINO_CHECKPOINTS.get((model.arch, model.patch_size), "the DINO checkpoint for this arch")
        return f"the official DINO weights ({name}), published at {DINO_URL}"
    if spec.file is None:
        return f"a checkpoint of {model.arch}'s shapes (no official file has them; null = random weights)"
    if model.family == DINOV2:
        return f"the official DINOv2 weights ({spec.file}), published at {spec.url} (Apache-2.0)"
    return (f"the official DINOv3 weights ({spec.file}), which Meta gives under the DINOv3 License on request at "
            f"{spec.url}")


def _check_dinov3(model: DinoViT, state: dict, context: str) -> dict:
    """What timm's DINOv3 filter drops without a look: the RoPE periods must be the arch's (to bf16 precision: the
    official files keep them rounded), each `qkv.bias_mask` must mask the k bias only, and an arch without q / v
    biases takes only a file whose (masked) qkv biases are zero. Returns `state` without the qkv biases then, so
    timm's filter has nothing to drop."""
    periods = model.vit.rope.periods.float()
    got = state["rope_embed.periods"].float()
    if not torch.allclose(got, periods, rtol=1e-2, atol=0):
        raise InputValueError(f"{context}: rope_embed.periods {got[:4].tolist()}... are not this arch's RoPE periods "
                              f"{periods[:4].tolist()}... (base 100)")
    D = model.embed_dim
    pattern = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    has_bias = getattr(model.vit.blocks[0].attn, "q_bias", None) is not None
    state = dict(state)
    for i in range(len(model.vit.blocks)):
        mask = state[f"blocks.{i}.attn.qkv.bias_mask"].float()
        if not torch.equal(mask, pattern):
            raise InputValueError(f"{context}: blocks.{i}.attn.qkv.bias_mask is not 1 on q and v, 0 on k")
        if not has_bias:
            bias = state.pop(f"blocks.{i}.attn.qkv.bias")
            if (bias.float() * mask).abs().max() > 0:
                raise InputValueError(f"{context}: blocks.{i}.attn.qkv.bias has non-zero q / v biases, which "
                                      f"{model.arch} has not: use {model.spec.timm_name}_qkvb")
    return state


def load_dino_checkpoint(model: DinoViT, path: str | Path) -> None:
    """Load a checkpoint into the backbone with strict key matching: DINO's official files (plain, `teacher`-
    wrapped, `module.`/`backbone.`-prefixed); DINOv2's and DINOv3's official files (their own layout, converted by
    timm's checkpoint filter after every key and shape is checked against that layout) or timm's layout of them."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(
            f"backbone checkpoint not found: {path}. Expected {_where_published(model)} (see docs/usage.md, "
            f"'Backbone weights'); nothing is downloaded at run time.")
    state = _unwrap_state_dict(load_tensors(path))
    context = f"{path}: does not match backbone {model.arch}/{model.patch_size}"
    if model.family == DINO:
        return load_strict(model.vit, state, context)
    if model.spec.file:
        context += f" (expected {model.spec.file})"
    if set(state) != set(model.vit.state_dict()):  # not timm's layout: the official one, converted by timm
        problem = wrong_layout(state, official_layout(model))
        if problem:
            raise InputValueError(f"{context}: {problem}")
        if model.family == DINOV2:
            from timm.models.vision_transformer import checkpoint_filter_fn
        else:
            from timm.models.eva import checkpoint_filter_fn
            state = _check_dinov3(model, state, context)
        state = checkpoint_filter_fn(dict(state), model.vit)
    load_strict(model.vit, state, context)


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


def build_backbone(arch: str, patch_size: int | None, checkpoint: str | Path | None, seed: int = 0) -> DinoViT:
    """The frozen backbone in eval mode. Without a checkpoint the weights are random (seeded); the DINOv2 / DINOv3
    layer scales, which timm starts at 1e-5 (nearly the identity), are then set to 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DinoViT(arch, patch_size)
    if checkpoint:
        load_dino_checkpoint(model, checkpoint)
    else:
        with torch.no_grad():
            for name, p in model.vit.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                    p.fill_(1.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
