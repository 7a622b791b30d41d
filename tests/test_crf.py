"""The dense CRF (transfgu/crf.py) against direct pydensecrf calls written from STEGO's src/crf.py, its process
pool, the one-line error without the `crf` extra, evaluate's crf_* scores and pictures, and `transfgu predict --crf`."""
from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy.optimize import linear_sum_assignment

from tiny_project import default_params, predict_files, run_stage_here
from transfgu import crf as crf_module
from transfgu.cli import main as cli_main

dcrf = pytest.importorskip("pydensecrf.densecrf")  # the `crf` extra: `make test` installs it
crf_utils = pytest.importorskip("pydensecrf.utils")

REPO = Path(__file__).resolve().parent.parent


def stego_dense_crf(image_rgb: np.ndarray, logits: torch.Tensor) -> np.ndarray:
    """STEGO's src/crf.py dense_crf, with its constants written out: BGR image, logits upsampled bilinearly to the
    image and soft-maxed, unary from softmax, Gaussian (sxy 1, compat 3) and bilateral (sxy 67, srgb 3, compat 4)
    kernels, 10 iterations. Marginals (C, H, W)."""
    image = np.ascontiguousarray(image_rgb[:, :, ::-1])
    H, W = image.shape[:2]
    probs = F.softmax(F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0],
                      dim=0).numpy()
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(crf_utils.unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    return np.array(d.inference(10)).reshape((c, h, w))


def two_region_image(size=32, seed=0):
    """A left / right image of two flat colours with a little noise, and noisy logits at a quarter of its size
    that favour the right class on each side only weakly."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    image[:, : size // 2] = (200, 40, 40)
    image[:, size // 2:] = (30, 60, 210)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    q = size // 4
    side = (np.arange(q) >= q // 2).astype(np.int64)[None, :].repeat(q, 0)
    logits = rng.normal(0, 1.0, (3, q, q)).astype(np.float32)
    logits[side, np.arange(q)[:, None], np.arange(q)[None, :]] += 0.8
    return image, torch.from_numpy(logits), np.repeat(np.repeat(side, 4, 0), 4, 1)


def test_crf_equals_a_direct_pydensecrf_call_with_the_published_kernels():
    image, logits, _ = two_region_image()
    expected = stego_dense_crf(image, logits)
    probs = next(crf_module.probabilities(logits[None], image.shape[:2]))
    np.testing.assert_array_equal(crf_module.dense_crf(image, probs), expected.astype(np.float32))
    with crf_module.CrfPool(1) as pool:
        np.testing.assert_array_equal(pool.labels(image[None], logits[None])[0], expected.argmax(0))


def test_pool_of_processes_gives_the_in_process_result_in_order():
    jobs = [two_region_image(seed=s) for s in range(5)]
    images = np.stack([j[0] for j in jobs])
    logits = torch.stack([j[1] for j in jobs])
    with crf_module.CrfPool(1) as one, crf_module.CrfPool(2) as two:
        np.testing.assert_array_equal(one.labels(images, logits), two.labels(images, logits))
    expected = np.stack([stego_dense_crf(images[i], logits[i]).argmax(0) for i in range(5)])
    with crf_module.CrfPool(2) as two:
        np.testing.assert_array_equal(two.labels(images, logits), expected)


def test_crf_follows_the_colour_edge():
    """What the CRF is for: noisy probabilities on a two-colour image come out closer to the colour regions."""
    image, logits, side = two_region_image(seed=3)
    plain = F.interpolate(logits[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0)
    with crf_module.CrfPool(1) as pool:
        refined = pool.labels(image[None], logits[None])[0]
    assert (refined == side).mean() > (plain.numpy() == side).mean()


def hide_pydensecrf(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    hide_pydensecrf(monkeypatch)
    with pytest.raises(crf_module.MissingExtra) as e:
        crf_module.CrfPool(1)
    assert "pip install 'transfgu[crf]'" in str(e.value) and "\n" not in str(e.value)
    assert "evaluate.crf: true" in str(e.value)


# -- evaluate ------------------------------------------------------------------------------------------------
TINY = {"dataset": {"R": 32, "synthetic": {"n_train": 2, "n_val": 5, "size": 48}}, "train": {"batch_size": 2},
        "evaluate": {"batch_size": 2, "n_pictures": 3, "patch_kmeans_baseline": False, "num_workers": 2}}


@pytest.fixture
def evaluate_project(tmp_path, monkeypatch):
    """prepare run in a tiny synthetic project, and a seeded decoder in outputs/: evaluate can run."""
    from transfgu.models.decoder import build_decoder

    def setup(**evaluate):
        params = default_params({**TINY, "dataset": {**TINY["dataset"], "root": str(tmp_path / "data")},
                                 "evaluate": {**TINY["evaluate"], **evaluate}})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return params
    setup()
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSFGU_PARAMS", raising=False)
    run_stage_here("prepare")
    torch.save(build_decoder(6, 192, seed=1).state_dict(), tmp_path / "outputs" / "decoder.pt")
    return tmp_path, setup


def reference_crf_scores(root: Path, R: int) -> dict:
    """crf_miou / crf_pixel_accuracy computed here: the library's logits (tested elsewhere), STEGO's CRF as written
    above, a confusion by np.bincount and scipy's Hungarian matching of the CRF's own confusion."""
    from transfgu.data.dataset import SplitDataset
    from transfgu.data.tasks import resolve_task
    from transfgu.config import load_params
    from transfgu.models.decoder import build_decoder, load_decoder
    from transfgu.models.vit import build_backbone
    from transfgu.segmenter import Segmenter

    params = load_params(root / "params.yaml")
    task = resolve_task(params.dataset, params.granularity)
    index = json.loads((root / "outputs" / "index.json").read_text())
    data = SplitDataset(index, "val", R, lut=task.label_lut, root=params.dataset.root)
    backbone = build_backbone("vit_mini", 8, None, seed=params.seed)
    decoder = load_decoder(build_decoder(6, 192), root / "outputs" / "decoder.pt").eval()
    seg = Segmenter(backbone, decoder)
    conf = np.zeros((6, 6), np.int64)
    for batch in torch.utils.data.DataLoader(data, batch_size=params.evaluate.batch_size):  # evaluate's batches
        with torch.no_grad():
            logits, _ = seg(batch["image"].float() / 255)
        for image, lg, label in zip(batch["image"], logits, batch["label"].numpy()):
            pred = stego_dense_crf(image.permute(1, 2, 0).numpy(), lg).argmax(0)
            ok = (label >= 0) & (label < 6)
            conf += np.bincount(pred[ok] * 6 + label[ok], minlength=36).reshape(6, 6)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    tp = conf[rows, cols]
    matched = np.zeros((6, 6), np.int64)
    matched[cols] = conf[rows]
    union = matched.sum(0) + matched.sum(1) - np.diag(matched)
    return {"crf_miou": 100 * np.mean(np.diag(matched)[union > 0] / union[union > 0]),
            "crf_pixel_accuracy": 100 * tp.sum() / conf.sum()}


def test_evaluate_reports_crf_scores_beside_the_plain_ones(evaluate_project):
    root, setup = evaluate_project
    run_stage_here("evaluate")
    metrics = json.loads((root / "outputs" / "metrics.json").read_text())
    assert list(metrics) == ["miou", "pixel_accuracy", "miou_things", "miou_stuff",
                             "crf_miou", "crf_pixel_accuracy", "crf_miou_things", "crf_miou_stuff"]
    reference = reference_crf_scores(root, 32)
    for k, v in reference.items():
        assert metrics[k] == pytest.approx(v, abs=1e-9), k
    pictures = sorted((root / "outputs" / "pictures").glob("*.png"))
    assert len(pictures) == 3
    with_crf = [Image.open(p).size for p in pictures]
    plain_metrics = {k: v for k, v in metrics.items() if not k.startswith("crf_")}
    setup(crf=False)
    run_stage_here("evaluate")
    metrics = json.loads((root / "outputs" / "metrics.json").read_text())
    assert metrics == plain_metrics  # the CRF adds its scores and changes nothing else
    without = [Image.open(p).size for p in sorted((root / "outputs" / "pictures").glob("*.png"))]
    # image | prediction | prediction + CRF | ground truth against image | prediction | ground truth
    assert all(a[0] * 3 == b[0] * 4 and a[1] == b[1] for a, b in zip(with_crf, without)), (with_crf, without)


def test_missing_extra_stops_prepare_and_evaluate_with_one_line(evaluate_project, monkeypatch, capsys):
    root, _ = evaluate_project
    hide_pydensecrf(monkeypatch)
    for stage in ("prepare", "evaluate"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_stage_here(stage)
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "pip install 'transfgu[crf]'" in err[0], err
    assert not (root / "outputs" / "metrics.json").exists()


# -- transfgu predict --crf ---------------------------------------------------------------------------------
def test_predict_crf_refines_at_the_working_size_then_upsamples(tmp_path):
    from transfgu.data.images import load_rgb
    from transfgu.models.decoder import build_decoder
    from transfgu.models.vit import build_backbone

    predict_files(tmp_path)  # params.yaml with R = 32, decoder.pt with 6 outputs
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    common = ["predict", str(tmp_path / "a.png"), "--decoder", str(tmp_path / "decoder.pt"),
              "--params", str(tmp_path / "params.yaml")]
    cli_main([*common, "--out", str(tmp_path / "crf"), "--crf", "--crf-workers", "1"])
    bb = build_backbone("vit_mini", 8, None, seed=0)
    dec = build_decoder(6, 192)
    dec.load_state_dict(torch.load(tmp_path / "decoder.pt", weights_only=True))
    dec.eval()
    x = load_rgb(tmp_path / "a.png", 32)
    with torch.no_grad():
        logits, _ = dec(bb(bb.normalize(x[None].float() / 255))[:, 1:], (4, 4))
    q = torch.from_numpy(stego_dense_crf(x.permute(1, 2, 0).numpy(), logits[0]).astype(np.float32))
    expected = F.interpolate(q[None], size=(40, 56), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "crf" / "a_label.png")), expected)


def test_predict_crf_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys):
    predict_files(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    hide_pydensecrf(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli_main(["predict", str(tmp_path / "a.png"), "--decoder", str(tmp_path / "decoder.pt"),
                  "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out"), "--crf"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--crf needs" in err[0] and "pip install 'transfgu[crf]'" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # starts a Python process
def test_workers_end_with_a_killed_parent(tmp_path):
    """A process killed with SIGKILL while its pool is up leaves no worker behind holding its output pipe (which
    kept `subprocess.run(capture_output=True)` of a killed evaluate waiting)."""
    import os
    import subprocess
    import sys
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, numpy as np\n"
        "from transfgu.crf import CrfPool\n"
        "pool = CrfPool(2)\n"
        "list(pool.refine([(np.zeros((16, 16, 3), np.uint8), np.full((2, 16, 16), 0.5, np.float32))] * 4))\n"
        "print(*[p.pid for p in pool.executor._processes.values()], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -9, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    import time
    time.sleep(1.5)
    for pid in pids:  # gone, or a zombie waiting for whatever process adopted it to reap it
        status = Path(f"/proc/{pid}/status")
        state = status.read_text().split("State:")[1].split()[0] if status.exists() else "gone"
        assert state in ("gone", "Z", "X"), (pid, state)
