"""Concept centroids by k-means of the crop [CLS] features (METHOD.md section 2)."""
from __future__ import annotations

import faiss
import numpy as np
import torch


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def kmeans(x: np.ndarray, k: int, niter: int = 100, seed: int = 0, use_gpu: bool | None = None,
           name: str = "features", nredo: int = 1) -> np.ndarray:
    """k-means (squared L2) of x (N, D) into k centres with faiss, on the GPU when faiss-gpu sees one.

    Every point is used (no subsampling). nredo > 1 runs that many initialisations and keeps the one
    with the lowest objective (the published method uses one). The returned centres are the means of the points assigned
    to them by a final assignment step (a centre left empty keeps its faiss position)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means of {name}: {n} vectors cannot make {k} clusters; "
                         f"use more images or a smaller granularity")
    if use_gpu is None:
        use_gpu = gpu_available()
    km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, gpu=bool(use_gpu), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(n // k + 1, 1) * 2)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    counts = np.bincount(assign, minlength=k)
    sums = torch.zeros(k, d, dtype=torch.float64).index_add_(
        0, torch.from_numpy(assign), torch.from_numpy(x).double()).numpy()
    centres = km.centroids.astype(np.float64).copy()
    filled = counts > 0
    centres[filled] = sums[filled] / counts[filled, None]
    return centres.astype(np.float32)
