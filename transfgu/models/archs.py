"""The ViT backbones the pipeline can take (no model code here, so parameter checks can read the names cheaply).

Three families:
- `dino`: DINO (v1), a timm VisionTransformer built here, patch 8 or 16 (`backbone.patch_size` says which);
- `dinov2`: DINOv2, with or without 4 register tokens: timm's `vit_*_patch14[_reg4]_dinov2`, patch 14;
- `dinov3`: DINOv3, timm's `vit_*_patch16_dinov3[_qkvb]` (an Eva with RoPE and 4 storage tokens), patch 16.

Each name is the timm model name; the official file stems (`dinov2_vits14`, `dinov2_vits14_reg4`, `dinov3_vits16`
...) name the same networks. The `vit_mini*` archs are small networks of the same classes for the built-in
synthetic default and the tests, sized for a 2-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputValueError

DINO, DINOV2, DINOV3 = "dino", "dinov2", "dinov3"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"
DINOV3_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


@dataclass(frozen=True)
class ViTArch:
    embed_dim: int
    depth: int
    num_heads: int
    family: str = DINO
    patch_size: int | None = None      # None: DINO's 8 or 16, chosen by backbone.patch_size
    timm_name: str | None = None       # the timm model built (dinov2 / dinov3), with `overrides` to its arguments
    overrides: dict = field(default_factory=dict)
    registers: int = 0                 # register (DINOv2) or storage (DINOv3) tokens between [CLS] and the patches
    file: str | None = None            # the official checkpoint's file name
    url: str | None = None             # where its owners publish it

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens: [CLS] and the registers."""
        return 1 + self.registers


_MINI = dict(embed_dim=192, depth=4, num_heads=3)
_SIZES = {"s": "small", "b": "base"}


def _dinov2(size: str, dim: int, heads: int, reg: bool, **kw) -> ViTArch:
    stem = f"dinov2_vit{size}14" + ("_reg4" if reg else "")
    return ViTArch(embed_dim=dim, depth=kw.pop("depth", 12), num_heads=heads, family=DINOV2, patch_size=14,
                   timm_name=f"vit_{_SIZES[size]}_patch14{'_reg4' if reg else ''}_dinov2",
                   registers=4 if reg else 0, file=f"{stem}_pretrain.pth",
                   url=f"{DINOV2_URL}dinov2_vit{size}14/", **kw)


def _dinov3(size: str, dim: int, heads: int, qkvb: bool = False, **kw) -> ViTArch:
    hashes = {"s": "08c60483", "b": "73cec8be"}
    return ViTArch(embed_dim=dim, depth=kw.pop("depth", 12), num_heads=heads, family=DINOV3, patch_size=16,
                   timm_name=f"vit_{_SIZES[size]}_patch16_dinov3{'_qkvb' if qkvb else ''}", registers=4,
                   file=f"dinov3_vit{size}16_pretrain_lvd1689m-{hashes[size]}.pth",
                   url=DINOV3_URL, **kw)


_V2 = {
    "vit_small_patch14_dinov2": _dinov2("s", 384, 6, False),
    "vit_base_patch14_dinov2": _dinov2("b", 768, 12, False),
    "vit_small_patch14_reg4_dinov2": _dinov2("s", 384, 6, True),
    "vit_base_patch14_reg4_dinov2": _dinov2("b", 768, 12, True),
}
_V3 = {
    "vit_small_patch16_dinov3": _dinov3("s", 384, 6),
    "vit_base_patch16_dinov3": _dinov3("b", 768, 12),
    "vit_small_patch16_dinov3_qkvb": _dinov3("s", 384, 6, qkvb=True),
    "vit_base_patch16_dinov3_qkvb": _dinov3("b", 768, 12, qkvb=True),
}

# vit_small / vit_base are DINO's; vit_mini is the small network of the built-in synthetic default, sized for
# a 2-core CPU; vit_mini_*dinov2 / vit_mini_dinov3 are that size in the DINOv2 / DINOv3 classes (random weights
# only: no official file has their shapes).
ARCHS = {
    "vit_mini": ViTArch(**_MINI),
    "vit_tiny": ViTArch(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTArch(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTArch(embed_dim=768, depth=12, num_heads=12),
    **_V2,
    **_V3,
    "vit_mini_dinov2": ViTArch(**_MINI, family=DINOV2, patch_size=14, timm_name="vit_small_patch14_dinov2",
                               overrides=dict(_MINI)),
    "vit_mini_reg4_dinov2": ViTArch(**_MINI, family=DINOV2, patch_size=14, registers=4,
                                    timm_name="vit_small_patch14_reg4_dinov2", overrides=dict(_MINI)),
    "vit_mini_dinov3": ViTArch(**_MINI, family=DINOV3, patch_size=16, registers=4,
                               timm_name="vit_small_patch16_dinov3", overrides=dict(_MINI)),
}
# the official file stems (and DINOv2's torch.hub names, `_reg` for the register models) name the same networks
ALIASES = {
    "dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vits14_reg4": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg4": "vit_base_patch14_reg4_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov3_vits16": "vit_small_patch16_dinov3", "dinov3_vitb16": "vit_base_patch16_dinov3",
}
ARCHS.update({alias: ARCHS[name] for alias, name in ALIASES.items()})
DINO_V1_ARCHS = tuple(name for name, a in ARCHS.items() if a.family == DINO)


def resolve_patch(arch: str, patch_size: int | None) -> int:
    """The patch size of `arch` given `backbone.patch_size`: DINO archs take 8 or 16 from it; the DINOv2 / DINOv3
    archs have their own (14 / 16), and a patch_size that disagrees is an error (null = the arch's own)."""
    a = ARCHS[arch]
    if a.patch_size is None:
        if patch_size not in (8, 16):
            raise InputValueError(f"backbone.patch_size: {arch} (DINO) has 8- or 16-pixel patches, set 8 or 16, "
                                  f"got {patch_size}")
        return patch_size
    if patch_size is not None and patch_size != a.patch_size:
        raise InputValueError(f"backbone.patch_size: {arch} has {a.patch_size}-pixel patches, got {patch_size}: set "
                              f"backbone.patch_size to {a.patch_size} or null")
    return a.patch_size
