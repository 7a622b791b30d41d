"""Random-weight checkpoints in the exact layout of the official DINOv2 and DINOv3 files, written by hand from the
state dicts of their owners' code (not from this project's or timm's models):

- DINOv2 (github.com/facebookresearch/dinov2, dinov2/models/vision_transformer.py, DinoVisionTransformer with
  block_chunks=0, ffn_layer 'mlp', init_values set): `cls_token` (1, 1, D), `pos_embed` (1, 1 + n*n, D) with the
  [CLS] position first, `register_tokens` (1, 4, D) for the _reg4 files, `mask_token` (1, D),
  `patch_embed.proj.{weight,bias}`, per block `norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`,
  `mlp.fc2`, `ls2.gamma`, then `norm`.
- DINOv3 (github.com/facebookresearch/dinov3, dinov3/models/vision_transformer.py with the hub's ViT-S/16 and
  ViT-B/16 settings: qkv_bias, mask_k_bias, 4 storage tokens, layer scale, 'mlp' FFN): `cls_token`,
  `storage_tokens` (1, 4, D), `mask_token` (1, D), `patch_embed.proj.{weight,bias}`, `rope_embed.periods`
  (D_head / 4, persistent), per block `norm1`, `attn.qkv.weight`, `attn.qkv.bias` (3D), `attn.qkv.bias_mask` (3D:
  1 on q and v, 0 on k; LinearKMaskedBias), `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`, `mlp.fc2`, `ls2.gamma`,
  then `norm`.

Values: weights ~ N(0, 1 / fan_in), norms near 1, layer scales in [0.5, 1.5] (the published ones are far from
timm's 1e-5 start, so the blocks matter)."""
from __future__ import annotations

import torch


def _common(D: int, depth: int, patch: int, g: torch.Generator, mlp: int = 4) -> dict:
    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def near1(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    def small(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    sd = {"cls_token": torch.randn(1, 1, D, generator=g), "mask_token": torch.zeros(1, D),
          "patch_embed.proj.weight": torch.randn(D, 3, patch, patch, generator=g) / (3 * patch * patch) ** 0.5,
          "patch_embed.proj.bias": small(D)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": near1(D), b + "norm1.bias": small(D),
            b + "attn.qkv.weight": w(3 * D, D), b + "attn.qkv.bias": small(3 * D),
            b + "attn.proj.weight": w(D, D), b + "attn.proj.bias": small(D),
            b + "ls1.gamma": 0.5 + torch.rand(D, generator=g),
            b + "norm2.weight": near1(D), b + "norm2.bias": small(D),
            b + "mlp.fc1.weight": w(mlp * D, D), b + "mlp.fc1.bias": small(mlp * D),
            b + "mlp.fc2.weight": w(D, mlp * D), b + "mlp.fc2.bias": small(D),
            b + "ls2.gamma": 0.5 + torch.rand(D, generator=g),
        })
    sd["norm.weight"], sd["norm.bias"] = near1(D), small(D)
    return sd


def dinov2_state_dict(D: int, depth: int, registers: int = 0, grid: int = 37, patch: int = 14,
                      seed: int = 0) -> dict:
    """A DINOv2 file's state dict (dinov2_vit*14[_reg4]_pretrain.pth layout): 518-px position grid (37 x 37)."""
    g = torch.Generator().manual_seed(seed)
    sd = _common(D, depth, patch, g)
    sd["pos_embed"] = 0.5 * torch.randn(1, 1 + grid * grid, D, generator=g)
    if registers:
        sd["register_tokens"] = torch.randn(1, registers, D, generator=g)
    return sd


def dinov3_state_dict(D: int, depth: int, heads: int, qkv_bias: bool = False, patch: int = 16,
                      seed: int = 0) -> dict:
    """A DINOv3 file's state dict (dinov3_vit*16_pretrain_lvd1689m-*.pth layout). qkv_bias False: the q and v
    biases are zero (the distilled ViT-S/B files timm loads into its models without biases); the k bias is random
    either way (the file's bias_mask zeroes it, so it must not matter). The RoPE periods are base 100, rounded to
    bfloat16 as the official files keep them."""
    g = torch.Generator().manual_seed(seed)
    sd = _common(D, depth, patch, g)
    sd["storage_tokens"] = torch.randn(1, 4, D, generator=g)
    head = D // heads
    sd["rope_embed.periods"] = (100.0 ** (2 * torch.arange(head // 4) / (head // 2))).bfloat16().float()
    mask = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    for i in range(depth):
        b = f"blocks.{i}.attn.qkv."
        if not qkv_bias:
            sd[b + "bias"] = torch.cat([torch.zeros(D), 0.1 * torch.randn(D, generator=g), torch.zeros(D)])
        sd[b + "bias_mask"] = mask.clone()
    return sd
