"""Concept centroids by k-means of the crop [CLS] features (docs/method.md section 2).

Two backends run the same Lloyd iterations from the same initialisation:

- ``faiss``: faiss.Kmeans (a GPU index when faiss-gpu sees a GPU, else the CPUs);
- ``torch``: the assignment and update steps in PyTorch on a torch device (CUDA when present), for machines
  where only faiss-cpu can be installed but torch sees a GPU.

Initialisation (both backends): restart r (0 <= r < nredo) starts from the k distinct rows
``np.random.default_rng(seed + r).choice(n, k, replace=False)`` of x, in the order choice returns them
(not sorted), so centre i starts at that i-th row. Then ``niter`` iterations of: assign every point to its
nearest centre (squared L2), move each centre to the mean of its points, split clusters left empty (below).
A final assignment to the trained centres gives the restart's objective (sum over points of the squared
distance to the nearest trained centre) and the returned centres: the means of the points so assigned
(a centre left empty keeps its trained position), float32. With nredo > 1 the restart with the lowest
objective is kept (the first one on a tie).

Empty clusters (torch backend; faiss's Clustering.cpp split_clusters does the same up to its random
generator): the centres are visited in index order; an empty centre i takes a copy of centre j, drawn with
probability proportional to max(size_j - 1, 0) (sizes as floats, updated by earlier splits), from
``np.random.default_rng([seed + r, 1])`` (one generator per restart). Then, per dimension t, centre i is
multiplied by (1 + EPS) and centre j by (1 - EPS) for even t, the other way round for odd t, EPS = 1/1024
(in float32), and the sizes become size_i = size_j / 2, size_j = size_j - size_i. When no centre has more
than one point the empty centre is left where it is. (faiss walks the centres cyclically from 0, accepting
j when a uniform draw is below (size_j - 1) / (n - k), which is close to the same distribution.)
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputValueError

try:  # faiss is an install extra: faiss-cpu (`.[cpu]`), or a GPU build (`.[gpu-cu12]`, `.[gpu-cu13]`)
    import faiss
except ImportError:  # the torch backend runs the same k-means without it
    faiss = None

EPS = 1 / 1024  # faiss's perturbation when an empty cluster takes half of another


def gpu_available() -> bool:
    """A GPU build of faiss is installed and sees a GPU."""
    return faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str = "auto") -> str:
    """'faiss' or 'torch'. auto: faiss when faiss has a GPU, else torch when torch sees CUDA, else faiss on the
    CPU when it is installed, else torch on the CPU."""
    if backend == "faiss" and faiss is None:
        raise InputValueError("cluster.backend is 'faiss' but faiss is not installed: pip install -e '.[cpu]' (or the "
                         "GPU build matching your torch's CUDA, docs/usage.md 'Installing'), or use cluster.backend: torch")
    if backend != "auto":
        return backend
    if gpu_available():
        return "faiss"
    if torch.cuda.is_available():
        return "torch"
    return "faiss" if faiss is not None else "torch"


def torch_device(device=None) -> torch.device:
    """The torch backend's device: the one given, else cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_backend(backend: str = "auto", device=None) -> str:
    """For log lines: 'faiss on the GPU', 'faiss on the CPU', 'torch on cuda', ..."""
    if resolve_backend(backend) == "faiss":
        return f"faiss on the {'GPU' if gpu_available() else 'CPU'}"
    return f"torch on {torch_device(device)}"


def init_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Row indices of the initial centres of the restart seeded `seed` (see the module docstring)."""
    return np.random.default_rng(seed).choice(n, k, replace=False)


@dataclass
class KMeansResult:
    centres: np.ndarray  # (k, d) float32: means of the points of the final assignment
    assign: np.ndarray  # (n,) int64: the final assignment (nearest trained centre)
    objective: float  # sum of squared distances of the points to their nearest trained centre
    backend: str  # 'faiss' or 'torch'
    restart: int  # index r of the kept restart


def kmeans(x: np.ndarray, k: int, niter: int = 100, seed: int = 0, backend: str = "auto",
           name: str = "features", nredo: int = 1, device=None) -> np.ndarray:
    """k-means (squared L2) of x (N, D) into k centres, every point used (no subsampling); (k, D) float32.

    backend: 'faiss', 'torch' (on `device`, default cuda if available else cpu) or 'auto' (see
    resolve_backend). nredo > 1 runs that many initialisations and keeps the one with the lowest objective
    (the published method uses one). The returned centres are the means of the points assigned to them by a
    final assignment step (a centre left empty keeps its trained position). See the module docstring for
    the initialisation and the handling of empty clusters."""
    return kmeans_fit(x, k, niter, seed, backend, name, nredo, device).centres


def kmeans_fit(x: np.ndarray, k: int, niter: int = 100, seed: int = 0, backend: str = "auto",
               name: str = "features", nredo: int = 1, device=None) -> KMeansResult:
    """kmeans, returning the centres with the final assignment, the objective and the kept restart."""
    backend = resolve_backend(backend)
    x = np.ascontiguousarray(x, dtype=np.float32)  # no copy when x is already C-contiguous float32
    if x.ndim != 2:
        raise ValueError(f"k-means of {name}: expected a (N, D) array, got shape {x.shape}")
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means of {name}: {n} vectors cannot make {k} clusters; "
                         f"use more images or a smaller granularity")
    if n == k:  # every point its own centre (what faiss does too)
        return KMeansResult(x.copy(), np.arange(n, dtype=np.int64), 0.0, backend, 0)
    runner = _FaissRunner(x, gpu_available()) if backend == "faiss" else _TorchRunner(x, torch_device(device))
    best = None
    for r in range(max(int(nredo), 1)):
        init = x[init_rows(n, k, seed + r)]
        centres, assign, objective = runner.run(init, int(niter), seed + r)
        if best is None or objective < best.objective:
            best = KMeansResult(centres, assign, objective, backend, r)
    return best


# -- shared pieces --------------------------------------------------------------------------------------
def _host_tensor(x: np.ndarray) -> torch.Tensor:
    """A torch view of x without a copy (x is only read, so a read-only array is fine)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(x)


def _chunk_rows(k: int, d: int, budget: int = 1 << 30) -> int:
    """Rows per chunk so that the (rows, k) float32 distances and the (rows, d) float64 copy used for the
    sums each stay within `budget` bytes."""
    return max(1, min(budget // (4 * k), budget // (8 * d)))


def _accumulate(sums: torch.Tensor, counts: torch.Tensor, xc: torch.Tensor, a: torch.Tensor):
    sums.index_add_(0, a, xc.double())
    counts += torch.bincount(a, minlength=len(counts))


def _final_means(sums: torch.Tensor, counts: torch.Tensor, trained: torch.Tensor) -> np.ndarray:
    """Means of the assigned points; an empty centre keeps its trained position."""
    centres = trained.double().clone()
    filled = counts > 0
    centres[filled] = sums[filled] / counts[filled, None]
    return centres.float().cpu().numpy()


@contextlib.contextmanager
def _full_fp32_matmul():
    """float32 matmuls in full precision (no TF32 on CUDA, no bf16 on oneDNN), restored on exit."""
    saved = []
    for backend in (torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
        if backend is None:
            continue
        try:
            saved.append((backend, backend.fp32_precision))
            backend.fp32_precision = "ieee"
        except (AttributeError, RuntimeError):  # an older torch without the fp32_precision API
            pass
    legacy = None
    if not saved:
        legacy = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        for backend, value in reversed(saved):
            backend.fp32_precision = value
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy


def split_empty(centres: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> int:
    """Give every empty centre half of another cluster, in place (rule in the module docstring).

    centres: (k, d) float32, sizes: (k,) float64 cluster sizes. Returns the number of splits."""
    k, d = centres.shape
    sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    up, down = (1 + EPS * sign).astype(np.float32), (1 - EPS * sign).astype(np.float32)
    nsplit = 0
    for i in range(k):
        if sizes[i] != 0:
            continue
        w = np.maximum(sizes - 1, 0)
        if w.sum() <= 0:
            continue
        j = int(rng.choice(k, p=w / w.sum()))
        centres[i] = centres[j] * up
        centres[j] = centres[j] * down
        sizes[i] = sizes[j] / 2
        sizes[j] -= sizes[i]
        nsplit += 1
    return nsplit


# -- backends ---------------------------------------------------------------------------------------------
class _FaissRunner:
    def __init__(self, x: np.ndarray, gpu: bool):
        self.x, self.gpu = x, gpu
        self.xt = _host_tensor(x)

    def run(self, init: np.ndarray, niter: int, seed: int):
        n, d = self.x.shape
        k = len(init)
        km = faiss.Kmeans(d, k, niter=niter, nredo=1, seed=seed, gpu=bool(self.gpu), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(n // k + 1, 1) * 2)
        km.train(self.x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        dist, assign = km.index.search(self.x, 1)  # the index holds the trained centres
        assign = assign[:, 0]
        sums = torch.zeros(k, d, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.int64)
        at = torch.from_numpy(assign)
        rows = _chunk_rows(k, d, 1 << 26)
        for i0 in range(0, n, rows):
            _accumulate(sums, counts, self.xt[i0:i0 + rows], at[i0:i0 + rows])
        trained = torch.from_numpy(np.asarray(km.centroids, dtype=np.float32).reshape(k, d))
        return _final_means(sums, counts, trained), assign.astype(np.int64), float(dist.sum(dtype=np.float64))


class _TorchRunner:
    def __init__(self, x: np.ndarray, device: torch.device):
        self.device = device
        self.xt = _host_tensor(x).to(device)  # one copy to the accelerator; none on the CPU
        n, d = x.shape
        self.xnorm = torch.empty(n, dtype=torch.float32, device=device)
        step = _chunk_rows(1, d, 1 << 29)
        for i0 in range(0, n, step):
            xc = self.xt[i0:i0 + step]
            self.xnorm[i0:i0 + step] = (xc * xc).sum(1)
        if not torch.isfinite(self.xnorm).all():
            raise ValueError("k-means input contains NaN or Inf values")

    @torch.no_grad()
    def sweep(self, centres: torch.Tensor, keep_assign: bool = False):
        """Nearest centre of every row, per-centre float64 sums and int64 counts of the assigned rows,
        and the objective (float64 sum of the squared distances to the nearest centre)."""
        n, d = self.xt.shape
        k = len(centres)
        rows = _chunk_rows(k, d, 1 << 30 if self.device.type == "cuda" else 1 << 26)
        sums = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        obj = torch.zeros((), dtype=torch.float64, device=self.device)
        assign = torch.empty(n, dtype=torch.int64, device=self.device) if keep_assign else None
        cnorm = (centres * centres).sum(1)
        with _full_fp32_matmul():
            for i0 in range(0, n, rows):
                xc = self.xt[i0:i0 + rows]
                # ||x||^2 - 2 x.c + ||c||^2, float32, clamped at 0 like faiss
                dist = torch.addmm(cnorm, xc, centres.t(), alpha=-2).add_(self.xnorm[i0:i0 + rows, None])
                mind, a = dist.clamp_min_(0).min(1)
                del dist
                obj += mind.sum(dtype=torch.float64)
                _accumulate(sums, counts, xc, a)
                if keep_assign:
                    assign[i0:i0 + rows] = a
        return sums, counts, obj, assign

    @torch.no_grad()
    def run(self, init: np.ndarray, niter: int, seed: int):
        rng = np.random.default_rng([seed, 1])
        centres = torch.from_numpy(np.array(init, dtype=np.float32)).to(self.device)
        for _ in range(niter):
            sums, counts, _, _ = self.sweep(centres)
            new = (sums / counts.clamp_min(1)[:, None]).float()
            empty = counts == 0
            if bool(empty.any()):
                c = new.cpu().numpy()
                c[empty.cpu().numpy()] = 0
                split_empty(c, counts.cpu().numpy().astype(np.float64), rng)
                new = torch.from_numpy(c).to(self.device)
            centres = new
        sums, counts, obj, assign = self.sweep(centres, keep_assign=True)
        return _final_means(sums, counts, centres), assign.cpu().numpy(), float(obj)
