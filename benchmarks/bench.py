"""Stage throughput: this project's path against the straightforward implementation of the same maths,
measured in the same run on random weights and synthetic in-memory batches.

    python benchmarks/bench.py             # published sizes: ViT-S/8, R = 320 (meant for a GPU)
    python benchmarks/bench.py --quick     # tiny sizes on the CPU, well under a minute (smoke check)
    python benchmarks/bench.py --stages pseudo27 extract extract_cut

Prints one JSON line per stage: stage, img_per_s, baseline_img_per_s, speedup, peak_mem_mb, device,
precision. The baselines are what the original code does, in float32: per-window crops resized one by
one, one backward pass per concept through the full attention matrix, the frozen encoder run separately
for student and teacher, explicit (unfused) attention, scikit-learn k-means (the crop and pseudo baselines:
benchmarks/reference.py, the slow references the tests check the fast paths against). The new paths run at the
pipeline's default precision (`auto`: bf16 on a GPU, fp32 on the CPU; pseudo: fp32, and bf16 as the
`*_bf16` stages). extract_cut times the crop cut alone (every window of a batch, the published slice resized
to R): one gather and one F.interpolate per window size against a slice + F.interpolate per window. The
load_* stages time the data loading of the extract, pseudo and train stages on JPEG files (and the
pseudo-mask HDF5 for train): DataLoader workers + pinned memory against one process; load_device_decode
times the `decode: device` loader at R (workers read JPEG bytes, torchvision decodes them on the device)
against the host loader.

--no-baseline times only this project's path (benchmarks/gpu.sh, the GPU target table); --batch and
--train-batch set the pseudo and train batches; --tf32 on|off sets CUDA's float32 matmul / convolution mode
(default: torch's), recorded in every line with the fp32 pseudo lines' `tf32_label_agreement`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import h5py

import numpy as np
from PIL import Image
import torch

from transfgu.augment import augment, draw_params  # noqa: E402
from transfgu.crops import (THING_STUFF_WINDOW_SIZES, crop_features, crop_windows, cut_crops,  # noqa: E402
                            select_crops, window_pixel_boxes)
from transfgu.data.dataset import SplitDataset, images_on  # noqa: E402
from transfgu.data.synthetic import generate_scene  # noqa: E402
from transfgu.models.decoder import build_decoder  # noqa: E402
from transfgu.models.vit import build_backbone  # noqa: E402
from transfgu.pieces import PieceWriter, merge_batches, piece_name  # noqa: E402
from transfgu.precision import resolve_precision  # noqa: E402
from transfgu.pseudo import maps_on, pseudo_mask_parts, pseudo_masks  # noqa: E402
from transfgu.pseudo_store import PseudoMaskReader  # noqa: E402
from transfgu.metrics import confusion_matrix  # noqa: E402
from transfgu.segmenter import Segmenter  # noqa: E402
from transfgu.train import TrainConfig, decoder_step, features_and_teacher, train_step  # noqa: E402

from reference import reference_concept_gradients, reference_crop_features, reference_cut_crops  # noqa: E402

SIZES = {  # arch, R, image batch, crop batch, cluster (n, d, k, iterations)
    "full": dict(full=True, arch="vit_small", R=320, batch=8, crop_batch=512, train_batch=256, cluster=(5_000_000, 384, 171, 100),
                 load_images=256, workers=min(8, os.cpu_count() or 1), extract_batch=16, eval_batch=32),
    "quick": dict(full=False, arch="vit_mini", R=32, batch=2, crop_batch=64, train_batch=4, cluster=(20_000, 64, 16, 10),
                  load_images=16, workers=2, extract_batch=2, eval_batch=8),
}


BASELINES = True  # --no-baseline: time only this project's path (a GPU session's target table)


def baseline(fn):
    """fn() (seconds per call of the straightforward path), or None under --no-baseline."""
    return fn() if BASELINES else None


def per_s(n, seconds):
    return n / seconds if seconds else None


def _tf32_switches():
    """(object, attribute, value for TF32, value for full float32) of the CUDA matmul and cuDNN convolution
    switches: the fp32_precision API where this torch has it (reading the legacy allow_tf32 after it was used
    raises), else allow_tf32."""
    out = []
    for new, legacy in ((torch.backends.cuda.matmul, torch.backends.cuda.matmul),
                        (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn)):
        if new is not None and hasattr(new, "fp32_precision"):
            out.append((new, "fp32_precision", "tf32", "ieee"))
        else:
            out.append((legacy, "allow_tf32", True, False))
    return out


def tf32_settings() -> dict:
    """The float32 matmul / convolution settings the run used (CUDA: TF32 or full float32; 'none' = torch's
    default: matmul full float32, cuDNN convolutions TF32)."""
    try:
        (m, ma, *_), (c, ca, *_) = _tf32_switches()
        return {"tf32_matmul": getattr(m, ma), "tf32_cudnn": getattr(c, ca)}
    except RuntimeError as e:  # mixed legacy / new API
        return {"tf32_matmul": f"unreadable: {e}"[:80], "tf32_cudnn": None}


def set_tf32(on: bool) -> list:
    """TF32 on (True) or off for CUDA float32 matmuls and convolutions; returns what to pass to restore_tf32."""
    saved = []
    for obj, attr, yes, no in _tf32_switches():
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, yes if on else no)
    return saved


def restore_tf32(saved: list) -> None:
    for obj, attr, value in reversed(saved):
        setattr(obj, attr, value)


def tf32_agreement(compute) -> float:
    """Share of the elements of compute() identical with TF32 off and on (1.0 on a CPU, where TF32 does not
    exist); the caller's TF32 setting is restored."""
    out = []
    for on in (False, True):
        saved = set_tf32(on)
        try:
            out.append(compute())
        finally:
            restore_tf32(saved)
    return (out[0] == out[1]).float().mean().item()


def tf32_label_agreement(backbone, images, centroids) -> float:
    """Share of pseudo labels (per-pixel argmax over the concepts) identical with TF32 on and off, fp32 path:
    what allowing TF32 in the pseudo stage would change."""
    return tf32_agreement(lambda: pseudo_masks(backbone, images, centroids, 1 / 8, precision="fp32").argmax(1))


def tf32_window_agreement(backbone, images, windows) -> float:
    """Share of extract's window decisions (thing crop, stuff crop, per window and image) identical with TF32 on
    and off in the float32 attention forward that selects them (1.0 on a CPU, where TF32 does not exist)."""
    B, _, H, _ = images.shape
    grid = H // backbone.patch_size
    return tf32_agreement(lambda: torch.stack(select_crops(backbone.cls_attention(images).view(B, grid, grid),
                                                           windows)))


def auto(device) -> str:
    """The pipeline's `precision: auto` on this device."""
    return resolve_precision("auto", device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats: int) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unfused(backbone):
    """The same network with explicit softmax attention everywhere (the original DINO code path)."""
    for blk in backbone.vit.blocks:
        blk.attn.fused_attn = False
    return backbone


def fused(backbone):
    for blk in backbone.vit.blocks:
        blk.attn.fused_attn = True
    return backbone


# -- stages -------------------------------------------------------------------------------------------
def bench_extract(s, device, repeats):
    backbone = build_backbone(s["arch"], 8, None).to(device)
    B = s["extract_batch"]
    images = torch.randn(B, 3, 2 * s["R"], 2 * s["R"], device=device)
    windows = crop_windows(2 * s["R"] // 8, THING_STUFF_WINDOW_SIZES)
    run = lambda: crop_features(backbone, images, windows, s["R"], s["crop_batch"], precision=auto(device))  # noqa: E731
    with torch.no_grad():
        n_crops = sum(len(f) for part in run() for f in part)
        agree = tf32_window_agreement(backbone, images, windows.to(device))
        new = timeit(run, device, repeats)
        unfused(backbone)
        old = baseline(lambda: timeit(lambda: reference_crop_features(backbone, images, windows.to(device), s["R"]),
                                      device, repeats))
    fused(backbone)
    # crop_features forwards the selected crops of all B images together, crop_batch at a time
    return B / new, per_s(B, old), {"crops_per_image": n_crops / B, "crops_per_s": n_crops / new, "batch": B,
                                    "crop_batch": s["crop_batch"], "precision": auto(device),
                                    "tf32_window_agreement": agree}


def bench_extract_cut(s, device, repeats):
    """The cut alone, on every window of every image of a batch, crop_batch crops at a time (the extract stage
    cuts the selected ones): cut_crops against reference_cut_crops, on the same boxes; the largest difference too."""
    images = torch.randn(s["batch"], 3, 2 * s["R"], 2 * s["R"], device=device)
    windows = crop_windows(2 * s["R"] // 8, THING_STUFF_WINDOW_SIZES)
    boxes = window_pixel_boxes(windows, 8).repeat(s["batch"], 1).to(device)
    image_index = torch.arange(s["batch"], device=device).repeat_interleave(len(windows))
    chunks = [slice(i, i + s["crop_batch"]) for i in range(0, len(boxes), s["crop_batch"])]

    def run(cut):
        return [cut(images, image_index[c], boxes[c], s["R"]) for c in chunks]

    diff = None
    if BASELINES:
        diff = max((a - b).abs().max().item() for a, b in zip(run(cut_crops), run(reference_cut_crops)))
    new = timeit(lambda: run(cut_crops), device, repeats)
    old = baseline(lambda: timeit(lambda: run(reference_cut_crops), device, repeats))
    return s["batch"] / new, per_s(s["batch"], old), {"crops_per_image": len(windows), "crops_per_s": len(boxes) / new,
                                                "crop_px": s["R"], "max_abs_diff": diff}


def write_mask_file(path: Path, parts: dict) -> None:
    """Pseudo-mask parts (attention float32, gradient float16) stored the pseudo stage's way: a piece whose
    gradient rows the PieceWriter packs, merged into the file at `path`."""
    with tempfile.TemporaryDirectory() as tmp:
        with PieceWriter(tmp, packed=["gradient"]) as w:
            w.write(0, parts)
        with h5py.File(path, "w") as h5:
            merge_batches([Path(tmp) / piece_name(0)], h5, {"attention": 1, "gradient": 1}, compressed=["gradient"])


def stored_mb_per_image(a, q) -> float:
    """Size on disk of pseudo-mask parts written the way the pseudo stage writes them, per image."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "masks.h5"
        write_mask_file(out, {"attention": a.float().cpu().numpy(), "gradient": q.half().cpu().numpy()})
        return out.stat().st_size / 2 ** 20 / len(a)


def bench_pseudo(K, precision="fp32"):
    def run(s, device, repeats):
        backbone = build_backbone(s["arch"], 8, None).to(device)
        images = torch.randn(s["batch"], 3, s["R"], s["R"], device=device)
        with torch.no_grad():  # concepts where the images' features are, as k-means would put them
            feats = backbone(images)[:, 0]
        centroids = feats[torch.arange(K, device=device) % len(feats)] + 0.1 * torch.randn(K, feats.shape[1],
                                                                                            device=device)
        new = timeit(lambda: pseudo_masks(backbone, images, centroids, 1 / 8, precision=precision), device, repeats)
        mb = stored_mb_per_image(*pseudo_mask_parts(backbone, images, centroids, 1 / 8, precision=precision))
        agree = tf32_label_agreement(backbone, images, centroids) if precision == "fp32" else None
        unfused(backbone)
        old = baseline(lambda: timeit(lambda: reference_concept_gradients(backbone, images, centroids), device,
                                      max(repeats // 2, 1)))
        fused(backbone)
        return s["batch"] / new, per_s(s["batch"], old), {"concepts": K, "precision": precision, "batch": s["batch"],
                                                    "stored_mb_per_image": round(mb, 4),
                                                    "tf32_label_agreement": agree}
    return run


def bench_train(s, device, repeats):
    """One bootstrapping step (augmentation included) at batch train_batch, 27 concepts."""
    backbone = build_backbone(s["arch"], 8, None).to(device)
    K, B, R = 27, s["train_batch"], s["R"]
    student = build_decoder(K, backbone.embed_dim).to(device)
    teacher = build_decoder(K, backbone.embed_dim, seed=1).to(device).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    images = torch.rand(B, 3, R, R, device=device)
    maps = torch.rand(B, K, R // 8, R // 8, device=device)
    cfg = TrainConfig(epochs=1, batch_size=B, precision=auto(device))
    params = draw_params(0, 0, range(B), R)
    perm = torch.randperm(K, device=device)

    def new():
        x, m = augment(images, maps, params, R // 2, R // 16)
        train_step(backbone, student, teacher, optimizer, x, m, cfg, False, 0.05, perm)

    old_cfg = TrainConfig(epochs=1, batch_size=B)

    def old():  # float32, the frozen encoder forwarded once for the teacher and again for the student
        x, m = augment(images, maps, params, R // 2, R // 16)
        _, teacher_logits = features_and_teacher(backbone, x, teacher, m.shape[-2:])
        patches, _ = features_and_teacher(backbone, x)
        decoder_step(student, optimizer, patches, m, teacher_logits, old_cfg, False, 0.05, perm)

    return B / timeit(new, device, repeats), per_s(B, baseline(lambda: timeit(old, device, repeats))), {
        "batch": B, "precision": cfg.precision, "augment_on": device.type, "bootstrap": True}


def bench_evaluate(s, device, repeats):
    """What the evaluate stage does per batch (Segmenter.confusion): forward, logits upsampled to the image,
    argmax, confusion matrix against the labels (27 clusters x 27 classes, 255 = ignore) copied to the host."""
    backbone = build_backbone(s["arch"], 8, None).to(device)
    decoder = build_decoder(27, backbone.embed_dim).to(device).eval()
    B = s["eval_batch"]
    images = torch.rand(B, 3, s["R"], s["R"], device=device)
    labels = torch.randint(0, 28, (B, s["R"], s["R"]), device=device)
    labels[labels == 27] = 255
    segmenter = Segmenter(backbone, decoder)

    def run(precision):
        with torch.no_grad():
            pred = segmenter.predict(images, precision)
            return confusion_matrix(pred, labels, segmenter.n_outputs, 27)

    total = int(run(auto(device)).sum())
    assert total == int((labels != 255).sum()), "confusion counts every labelled pixel"
    new = timeit(lambda: run(auto(device)), device, repeats)
    unfused(backbone)
    old = baseline(lambda: timeit(lambda: run("fp32"), device, repeats))
    fused(backbone)
    return B / new, per_s(B, old), {"precision": auto(device), "batch": B,
                                    "measures": "forward+upsample+argmax+confusion"}


def fake_pseudo_parts(n: int, K: int, h: int, seed: int = 0) -> dict:
    """Pseudo-mask parts of n images shaped and as sparse as the stage's: gradient about half -1, a fifth 0,
    the rest small positive float16; attention float32 in [0, 1)."""
    rng = np.random.default_rng(seed)
    g = rng.random((n, K, h, h))
    return {"attention": rng.random((n, h, h)).astype(np.float32),
            "gradient": np.where(g < 0.5, -1.0, np.where(g < 0.7, 0.0, g * 1e-3)).astype(np.float16)}


def bench_pieces(s, device, repeats):
    """The cost of resumability: each batch stored as its own durable piece (PieceWriter: a file per batch,
    written by a background thread under a temporary name, fsynced, renamed), the pieces then merged into the
    final file. Pseudo-stage batches of 32 images (171 concepts, 40 x 40 maps; quick: 16 concepts, 4 x 4), host
    work only.

    - `ms_per_batch`: writing and merging, back to back (all the host work); `no_fsync_ms_per_batch`: the same
      without fsync (what the fsync costs on this disk);
    - `stage_ms_per_batch`: the time the stage's loop spends storing a batch when `compute_ms` of device work
      (a sleep) separates the batches (the background writer overlaps it);
    - `disk_kb_per_batch`: bytes kept in pieces while the stage runs."""
    K, h = (171, s["R"] // 8) if s["full"] else (16, 4)
    n_batches, B = (16, 32) if s["full"] else (32, 32)
    compute_s = 0.16 if s["full"] else 0.02  # pseudo171, batch 32 at ~200 img/s (H100)
    batches = [fake_pseudo_parts(B, K, h, seed=b) for b in range(n_batches)]

    def pieces(durable=True, compute=0.0, merge=True):
        with tempfile.TemporaryDirectory() as tmp:
            folder, busy = Path(tmp) / "pieces", 0.0
            folder.mkdir()
            with PieceWriter(folder, packed=["gradient"], durable=durable) as w:
                for b, arrays in enumerate(batches):
                    time.sleep(compute)
                    t0 = time.perf_counter()
                    w.write(b, arrays)
                    busy += time.perf_counter() - t0
                t0 = time.perf_counter()
            busy += time.perf_counter() - t0  # the last pieces, stored at close
            size = sum(p.stat().st_size for p in folder.iterdir())
            if merge:
                with h5py.File(Path(tmp) / "out.h5", "w") as h5:
                    merge_batches([folder / piece_name(b) for b in range(n_batches)], h5,
                                  {"attention": 1, "gradient": 1}, compressed=["gradient"])
            return size, busy

    size = pieces()[0]
    cpu = torch.device("cpu")
    reps = max(repeats // 2, 1)
    new, no_fsync = (timeit(fn, cpu, reps) for fn in (pieces, lambda: pieces(False)))
    stage = np.median([pieces(compute=compute_s, merge=False)[1] for _ in range(reps)])
    n = n_batches * B
    ms = lambda t: round(1000 * t / n_batches, 3)  # noqa: E731
    return n / new, None, {
        "concepts": K, "maps": f"{h}x{h}", "batches": n_batches, "batch": B, "compute_ms": 1000 * compute_s,
        "ms_per_batch": ms(new), "no_fsync_ms_per_batch": ms(no_fsync), "stage_ms_per_batch": ms(stage),
        "disk_kb_per_batch": round(size / 1024 / n_batches, 2)}


# -- data loading -------------------------------------------------------------------------------------
def jpeg_split(folder: Path, n: int) -> dict:
    """n JPEG scenes of COCO's typical size (640 x 480, quality 90) and an index of them."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        rgb = generate_scene(rng, 160)[0]
        Image.fromarray(rgb).resize((640, 480), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
        entries.append({"id": f"{i:06d}", "image": f"{i:06d}.jpg"})
    return {"root": str(folder), "splits": {"train": entries}}


def loader_throughput(dataset, batch: int, workers: int, device, passes: int = 2) -> float:
    """Images per second a DataLoader delivers to `device` (workers started before the clock runs)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         collate_fn=getattr(dataset, "collate", None))
    for b in loader:  # warm-up pass: workers started, files in the page cache
        images_on(b, device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(passes):
        for b in loader:
            images_on(b, device)  # decoded there with decode="device"
            if "maps" in b:
                maps_on(b["maps"], device)
    sync(device)
    return passes * len(dataset) / (time.perf_counter() - t0)


def bench_load(kind, decode: str = "host"):
    """extract: images at 2R; pseudo: images at R; train: images at R + their 171 pseudo maps from HDF5.
    decode="device": the stages' `decode: device` (workers read the files, the batch is decoded on the device)."""
    def run(s, device, repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            index = jpeg_split(tmp, s["load_images"])
            size = 2 * s["R"] if kind == "extract" else s["R"]
            maps = None
            if kind == "train":
                maps = tmp / "pseudo_masks.h5"
                K, h = (171 if s["full"] else 16), s["R"] // 8
                write_mask_file(maps, fake_pseudo_parts(len(index["splits"]["train"]), K, h))
            data = SplitDataset(index, "train", size, maps=PseudoMaskReader(maps) if maps else None, decode=decode,
                                root=index["root"])
            batch = s["batch"] * (4 if kind != "extract" else 1)
            new = loader_throughput(data, batch, s["workers"], device)
            old = loader_throughput(data, batch, 0, device, passes=1) if BASELINES else None
        return new, old, {"size": size, "workers": s["workers"], "batch": batch, "decode": decode,
                          "cpus": os.cpu_count(), "unit": "images/s delivered to the device"}
    return run


def random_vectors(n: int, d: int, device) -> np.ndarray:
    """n x d standard normal float32 vectors on the host (the k-means input). With CUDA they are drawn on the
    device and copied back: numpy takes about 45 s for 5M x 384 on one core, the GPU well under a second."""
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, d, generator=g, device=device).cpu().numpy()
        torch.cuda.empty_cache()
        return x
    return np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)


def bench_load_device_decode(s, device, repeats):
    """The pseudo and evaluate loader at R with `decode: device`: DataLoader workers read the JPEG bytes only,
    the device decodes them (torchvision.io.decode_jpeg, nvJPEG on CUDA) and resizes to R
    (transfgu.data.images.decode_resize); against the host loader (PIL decode + resize in the workers, pinned
    memory) on the same files. `mean_abs_diff`: mean absolute difference to the PIL images in uint8 levels."""
    from transfgu.data.images import decode_resize, load_rgb, read_bytes
    with tempfile.TemporaryDirectory() as tmp:
        index = jpeg_split(Path(tmp), s["load_images"])
        batch, size = s["batch"] * 4, s["R"]
        data = SplitDataset(index, "train", size, decode="device", root=tmp)
        new = loader_throughput(data, batch, s["workers"], device)
        paths = [Path(tmp) / e["image"] for e in index["splits"]["train"][-batch:]]
        decoded = decode_resize([read_bytes(p) for p in paths], size, device)
        pil = torch.stack([load_rgb(p, size) for p in paths])
        diff = (decoded.cpu().float() - pil.float()).abs().mean().item()
        host = SplitDataset(index, "train", size, root=tmp)
        old = loader_throughput(host, batch, s["workers"], device) if BASELINES else None
    return new, old, {"size": size, "workers": s["workers"], "batch": batch, "cpus": os.cpu_count(),
                      "mean_abs_diff": round(diff, 3), "baseline": "PIL in the workers (decode: host)",
                      "unit": "images/s delivered to the device"}


def bench_cluster(s, device, repeats, niter=None, backend="auto", vectors=None):
    """k-means with the backend the cluster stage picks (cluster.backend auto: faiss with a GPU index when
    faiss-gpu sees one, else torch on the bench device when torch sees CUDA, else faiss on the CPUs).
    Baseline: faiss on the CPUs when the new path is torch (none, and `baseline` says so, where faiss is not
    installed, as on a GPU machine without its wheel), else scikit-learn. Above 1M vectors scikit-learn
    is skipped (far too slow) and faiss-cpu runs min(niter, 3) iterations, its time extrapolated to niter
    (each run also pays one final assignment: time x (niter + 1) / (timed + 1)).
    Throughput = vectors x iterations / s."""
    from sklearn.cluster import KMeans

    from transfgu import cluster
    from transfgu.cluster import describe_backend, gpu_available, kmeans, resolve_backend
    n, d, k, default_iter = s["cluster"]
    n, niter = vectors or n, niter or default_iter
    backend = resolve_backend(backend)
    t0 = time.perf_counter()
    x = random_vectors(n, d, device)
    data_s = time.perf_counter() - t0
    kmeans(x[:4 * k], k, niter=1, seed=0, backend=backend, device=device)  # warm-up (CUDA context, cuBLAS)
    t0 = time.perf_counter()
    kmeans(x, k, niter=niter, seed=0, backend=backend, device=device)
    new = time.perf_counter() - t0
    old, baseline, timed = None, None, None
    if not BASELINES:
        pass
    elif backend == "torch" and cluster.faiss is None:
        baseline = "faiss-cpu: not installed here"
    elif backend == "torch":
        baseline, timed = "faiss-cpu", niter if n <= 1_000_000 else min(niter, 3)
        t0 = time.perf_counter()
        kmeans(x, k, niter=timed, seed=0, backend="faiss")
        old = (time.perf_counter() - t0) * (niter + 1) / (timed + 1)
    elif n <= 1_000_000:
        baseline, timed = "scikit-learn", niter
        t0 = time.perf_counter()
        KMeans(k, n_init=1, max_iter=niter, tol=0, random_state=0).fit(x)
        old = time.perf_counter() - t0
    return n * niter / new, (n * niter / old if old else None), {
        "vectors": n, "dim": d, "k": k, "iterations": niter, "seconds": round(new, 2),
        "data_seconds": round(data_s, 2),
        "unit": "vector-iterations/s", "backend": describe_backend(backend, device), "faiss_gpu": gpu_available(),
        "baseline": baseline, "baseline_seconds": round(old, 2) if old else None,
        "baseline_iterations_timed": timed, "baseline_extrapolated": bool(timed is not None and timed < niter)}


STAGES = {"extract": bench_extract, "extract_cut": bench_extract_cut, "pseudo27": bench_pseudo(27),
          "pseudo171": bench_pseudo(171),
          "pseudo27_bf16": bench_pseudo(27, "bf16"), "pseudo171_bf16": bench_pseudo(171, "bf16"),
          "pieces": bench_pieces, "train": bench_train, "evaluate": bench_evaluate, "cluster": bench_cluster,
          "load_extract": bench_load("extract"), "load_pseudo": bench_load("pseudo"), "load_train": bench_load("train"),
          "load_train_device": bench_load("train", "device"), "load_extract_device": bench_load("extract", "device"),
          "load_device_decode": bench_load_device_decode}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=list(STAGES))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cluster-niter", type=int, default=None, help="k-means iterations (default: 100, quick: 10)")
    ap.add_argument("--cluster-backend", choices=["auto", "faiss", "torch"], default="auto",
                    help="k-means backend timed (torch is compared with faiss-cpu)")
    ap.add_argument("--cluster-vectors", type=int, default=None, help="k-means vectors (default: 5M, quick: 20k)")
    ap.add_argument("--train-batch", type=int, default=None, help="train step batch (default: 256, quick: 4)")
    ap.add_argument("--batch", type=int, default=None, help="pseudo* and extract_cut images per batch (default: 8, quick: 2)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers of the load_* stages (default: min(8, CPUs), the stages' auto; quick: 2)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="time only this project's path (baseline fields null): the GPU target table")
    ap.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                    help="CUDA float32 matmuls and convolutions: torch's default, TF32, or full float32")
    args = ap.parse_args(argv)
    if args.tf32 != "default":
        set_tf32(args.tf32 == "on")
    global BASELINES
    BASELINES = not args.no_baseline
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    sizes = SIZES["quick" if args.quick else "full"]
    if args.train_batch:
        sizes = {**sizes, "train_batch": args.train_batch}
    if args.batch:
        sizes = {**sizes, "batch": args.batch}
    if args.workers is not None:
        sizes = {**sizes, "workers": args.workers}
    repeats = args.repeats or (2 if args.quick else 10)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for stage in args.stages:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        extra_args = {"niter": args.cluster_niter, "backend": args.cluster_backend,
                      "vectors": args.cluster_vectors} if stage == "cluster" else {}
        new, old, extra = STAGES[stage](sizes, device, repeats, **extra_args)
        print(json.dumps({"stage": stage, "img_per_s": round(new, 2),
                          "baseline_img_per_s": round(old, 2) if old else None,
                          "speedup": round(new / old, 2) if old else None, "peak_mem_mb": round(peak_mb(device), 1),
                          "device": name, "tf32": args.tf32, **tf32_settings(), **extra}), flush=True)


if __name__ == "__main__":
    main()
