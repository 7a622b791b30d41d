"""Dense CRF refinement of per-pixel class probabilities, as STEGO, HP and CAUSE apply it before scoring
(docs/method.md, "Dense CRF"): the fully connected CRF of Kraehenbuehl and Koltun through the `pydensecrf`
module of the maintained `pydensecrf2` package (the `crf` install extra), with the published kernel parameters.

    with CrfPool(workers) as pool:
        labels = pool.labels(images, logits)      # (B, H, W): argmax of the CRF of softmax(upsampled logits)
        marginals = list(pool.refine(jobs))       # or (C, H, W) float32 per (image, probabilities) job, in order

Only numpy and pydensecrf run in the worker processes; the pool forks where the platform can (as STEGO's
`multiprocessing.Pool` does), so the workers start without importing anything again."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .errors import BadInput

EXTRA = "pip install 'transfgu[crf]'"


class MissingExtra(BadInput, ImportError):
    """An optional dependency of a requested feature is not installed."""


@dataclass(frozen=True)
class CrfKernels:
    """The CRF's parameters: STEGO's src/crf.py (MAX_ITER, POS_W, POS_XY_STD, Bi_W, Bi_XY_STD, Bi_RGB_STD), the
    same numbers in HP's utils/seg_utils.py and CAUSE's utils/utils.py. Distances in pixels and 8-bit levels."""
    iterations: int = 10       # mean-field steps
    pos_weight: float = 3      # smoothness kernel: weight (Potts compatibility) ...
    pos_xy_std: float = 1      # ... and its spatial standard deviation
    bi_weight: float = 4       # appearance (bilateral) kernel: weight ...
    bi_xy_std: float = 67      # ... spatial standard deviation ...
    bi_rgb_std: float = 3      # ... and colour standard deviation


PUBLISHED = CrfKernels()


def require_pydensecrf(what: str = "evaluate.crf: true", instead: str = "or set evaluate.crf: false"):
    """The pydensecrf modules (densecrf, utils), or a one-line MissingExtra naming the install extra."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as e:
        raise MissingExtra(f"{what} needs the dense CRF package, which is not installed ({e}): {EXTRA} "
                           f"(pydensecrf2, built from source with a C++ compiler), {instead}") from None
    return densecrf, utils


def dense_crf(image: np.ndarray, probs: np.ndarray, kernels: CrfKernels = PUBLISHED) -> np.ndarray:
    """The CRF's marginals Q (C, H, W) float32 for an RGB uint8 image (H, W, 3) and class probabilities
    (C, H, W) at the image's size. Unary = -log p (p clipped at 1e-5, pydensecrf's unary_from_softmax); the
    bilateral kernel reads the image in BGR channel order, as the published code passes it."""
    densecrf, utils = require_pydensecrf()
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    C, H, W = probs.shape
    if image.shape != (H, W, 3) or image.dtype != np.uint8:
        raise ValueError(f"image {image.shape} {image.dtype}: expected uint8 ({H}, {W}, 3) for probabilities {probs.shape}")
    crf = densecrf.DenseCRF2D(W, H, C)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=kernels.pos_xy_std, compat=kernels.pos_weight)
    crf.addPairwiseBilateral(sxy=kernels.bi_xy_std, srgb=kernels.bi_rgb_std,
                             rgbim=np.ascontiguousarray(image[:, :, ::-1]), compat=kernels.bi_weight)
    return np.asarray(crf.inference(kernels.iterations), dtype=np.float32).reshape(C, H, W)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _exit_with_parent(parent: int) -> None:
    """In a worker: end this process when the process that started the pool is gone (killed with SIGKILL, say),
    so that no worker outlives it holding its output pipes. Linux asks the kernel (PR_SET_PDEATHSIG); elsewhere a
    thread checks every half second."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # gone before the request took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _refine(job) -> np.ndarray:  # in a worker process
    return dense_crf(*job)


def probabilities(logits, size) -> Iterator[np.ndarray]:
    """Per image, class probabilities (C, H, W) float32: the softmax over channels of `logits` (B, C, h, w)
    upsampled bilinearly (align_corners=False) to `size`, computed where the logits are, one image at a time."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        for i in range(len(logits)):
            up = F.interpolate(logits[i:i + 1].float(), size=tuple(size), mode="bilinear", align_corners=False)
            yield up.softmax(1)[0].cpu().numpy()


class CrfPool:
    """`refine(jobs)`: dense_crf of each (image, probs) job, over `workers` processes (1: in this process), in
    the order given, with at most 2 x workers jobs in flight (a batch of 171-class probability maps need not
    all exist at once)."""

    def __init__(self, workers: int = 1, kernels: CrfKernels = PUBLISHED):
        require_pydensecrf()
        self.workers, self.kernels = max(1, int(workers)), kernels
        self.executor = None
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_exit_with_parent,
                                                initargs=(os.getpid(),))

    def refine(self, jobs: Iterable) -> Iterator[np.ndarray]:
        jobs = ((image, probs, self.kernels) for image, probs in jobs)
        if self.executor is None:
            yield from map(_refine, jobs)
            return
        pending = deque()
        for job in jobs:
            pending.append(self.executor.submit(_refine, job))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def labels(self, images: np.ndarray, logits) -> np.ndarray:
        """Per-pixel labels (B, H, W) int64: the argmax of the refined marginals of uint8 images (B, H, W, 3)
        with the `probabilities` of their logits (B, C, h, w) at the images' size."""
        B, H, W = images.shape[:3]
        out = np.zeros((B, H, W), np.int64)
        for i, q in enumerate(self.refine(zip(images, probabilities(logits, (H, W))))):
            out[i] = q.argmax(0)
        return out

    def close(self):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
