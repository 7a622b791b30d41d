"""Inference: the frozen backbone and the mask-transformer decoder as one Segmenter (docs/method.md
sections 4 and 5). Used by evaluate, `transfgu predict`, the validation during training and the benchmarks;
training code lives in train.py."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .metrics import confusion_matrix, upsample_argmax
from .precision import autocast
from .progress import progress


def encode(backbone, images_01: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The frozen backbone's patch tokens (B, hw, D) of RGB images in [0, 1], without gradients; bf16 under
    precision 'bf16'."""
    with torch.no_grad(), autocast(precision, images_01.device):
        return backbone(backbone.normalize(images_01))[:, 1:]


class Segmenter(nn.Module):
    """Backbone + decoder: images in [0, 1] -> logits at the patch grid -> per-pixel cluster ids."""

    def __init__(self, backbone, decoder):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    @property
    def n_outputs(self) -> int:
        return self.decoder.n_cls

    def forward(self, images_01: torch.Tensor, precision: str = "fp32"):
        """Logits at the patch grid (B, C, h, w) and class features, both float32; precision 'bf16':
        backbone and decoder in bf16 autocast."""
        p = self.backbone.patch_size
        patches = encode(self.backbone, images_01, precision)
        with autocast(precision, images_01.device):
            logits, class_feat = self.decoder(patches, (images_01.shape[-2] // p, images_01.shape[-1] // p))
        return logits.float(), class_feat.float()

    @torch.no_grad()
    def predict(self, images_01: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Per-pixel cluster ids (B, H, W): logits upsampled bilinearly to the image size, argmax."""
        logits, _ = self(images_01, precision)
        return upsample_argmax(logits, images_01.shape[-2:])

    @torch.no_grad()
    def confusion(self, loader, n_classes: int, device, desc: str = "eval", precision: str = "fp32") -> np.ndarray:
        """Cluster x class confusion matrix over a loader of {"image", "label"} batches. Puts the decoder in
        eval mode."""
        self.decoder.eval()
        conf = np.zeros((self.n_outputs, n_classes), dtype=np.int64)
        for batch in progress(loader, desc=desc, leave=False):
            images = batch["image"].to(device).float() / 255
            pred = self.predict(images, precision)
            conf += confusion_matrix(pred, batch["label"].to(device), self.n_outputs, n_classes)
        return conf
