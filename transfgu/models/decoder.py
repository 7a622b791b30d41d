"""The Segmenter mask-transformer decoder (docs/method.md section 4), with the state-dict names of the
published TransFGU decoders (`weight/trained/*_decoder.pt`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import load_strict


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        out = (self.drop(attn) @ v).transpose(1, 2).reshape(B, N, D)
        return self.drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = Mlp(dim, mlp_dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskTransformer(nn.Module):
    """Patch tokens (B, hw, d_encoder) -> mask logits (B, K, h, w) and normalised class features (B, K, d)."""

    def __init__(self, n_cls: int, d_encoder: int = 384, d_model: int = 384, n_layers: int = 2,
                 n_heads: int = 6, mlp_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        self.n_cls = n_cls
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, d_model))
        nn.init.orthogonal_(self.cls_emb.data[0])
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_dim or 4 * d_model, dropout)
                                    for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        scale = d_model ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.mask_norm = nn.LayerNorm(n_cls)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]):
        B, N, _ = patches.shape
        x = self.proj_dec(patches)
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patch_feat = F.normalize(x[:, :N] @ self.proj_patch, dim=-1)
        class_feat = F.normalize(x[:, N:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patch_feat @ class_feat.transpose(1, 2))  # (B, hw, K)
        return masks.transpose(1, 2).reshape(B, self.n_cls, *grid), class_feat


def build_decoder(n_cls: int, d_encoder: int, seed: int = 0, dropout: float = 0.1) -> MaskTransformer:
    """The decoder with seeded initial weights; d_model = d_encoder, heads of 64 dims."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskTransformer(n_cls, d_encoder=d_encoder, d_model=d_encoder, n_heads=max(d_encoder // 64, 1),
                               dropout=dropout)


def load_decoder(decoder: MaskTransformer, path) -> MaskTransformer:
    """Load a decoder state dict (ours, or a published `*_decoder.pt`) with strict key and shape matching."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    load_strict(decoder, state, f"{path}: not a decoder for {decoder.n_cls} output channels of width "
                                f"{decoder.proj_dec.in_features}")
    return decoder
