"""Bottom-up reference point: k-means of the backbone's patch tokens, no training (the baseline the
top-down method must beat)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cluster import kmeans
from .metrics import confusion_matrix
from .progress import progress


@torch.no_grad()
def patch_tokens(backbone, images_01: torch.Tensor) -> torch.Tensor:
    """L2-normalised final patch tokens (B, h, w, D)."""
    B, _, H, W = images_01.shape
    p = backbone.patch_size
    tokens = backbone(backbone.normalize(images_01))[:, 1:]
    return F.normalize(tokens.float(), dim=-1).reshape(B, H // p, W // p, -1)


@torch.no_grad()
def patch_kmeans_confusion(backbone, loader, n_clusters: int, n_classes: int, device, seed: int = 0,
                           max_vectors: int = 2_000_000, niter: int = 100) -> np.ndarray:
    """Cluster x class confusion of k-means over the patch tokens of a labelled loader: tokens clustered
    (a seeded random subset when there are more than max_vectors), each patch labelled by its nearest centre,
    patch labels upsampled (nearest) to the image size."""
    chunks = []
    for batch in progress(loader, desc="patch tokens", leave=False):
        chunks.append(patch_tokens(backbone, batch["image"].to(device).float() / 255).flatten(0, 2).cpu())
    x = torch.cat(chunks).numpy()
    if len(x) > max_vectors:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_vectors, replace=False))]
    centres = torch.from_numpy(kmeans(x, n_clusters, niter=niter, seed=seed, name="patch tokens")).to(device)
    conf = np.zeros((n_clusters, n_classes), dtype=np.int64)
    for batch in progress(loader, desc="patch k-means", leave=False):
        images = batch["image"].to(device).float() / 255
        tokens = patch_tokens(backbone, images)
        assign = torch.cdist(tokens.flatten(1, 2), centres[None].expand(len(tokens), -1, -1)).argmin(-1)
        assign = assign.reshape(tokens.shape[:3])[:, None].float()
        pred = F.interpolate(assign, size=images.shape[-2:], mode="nearest")[:, 0].long()
        conf += confusion_matrix(pred, batch["label"].to(device), n_clusters, n_classes)
    return conf
