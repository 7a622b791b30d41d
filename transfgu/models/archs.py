"""The ViT sizes the backbone can take (no model code here, so parameter checks can read the names cheaply)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTArch:
    embed_dim: int
    depth: int
    num_heads: int


# vit_small / vit_base are DINO's; vit_mini is the small network of the built-in synthetic default, sized for
# a 2-core CPU.
ARCHS = {
    "vit_mini": ViTArch(embed_dim=192, depth=4, num_heads=3),
    "vit_tiny": ViTArch(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTArch(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTArch(embed_dim=768, depth=12, num_heads=12),
}
