"""benchmarks/backbone_probe.py: the quick signals of a backbone (attention foreground's thing share, thing-crop
precision and k-means purity) against direct computations on tiny scenes, and its one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
import backbone_probe
from transfgu.models.vit import build_backbone

N_THING = 6


def test_window_majority_matches_a_count_per_box():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 12, (3, 16, 16)))
    boxes = torch.tensor([[0, 0, 7, 7], [4, 2, 15, 9], [8, 8, 16, 16], [1, 1, 2, 2]])
    index = torch.tensor([0, 2, 1, 2])
    got = backbone_probe.window_majority(labels, boxes, index, 12)
    for m, ((y0, x0, y1, x1), i) in enumerate(zip(boxes.tolist(), index.tolist())):
        counts = np.bincount(labels[i, y0:y1, x0:x1].numpy().ravel(), minlength=12)
        assert got[m] == counts.argmax()


def test_purity_of_separated_and_of_mixed_groups():
    """Three well separated groups: purity 100; labels that ignore the groups: purity near the chance share."""
    rng = np.random.default_rng(1)
    centres = np.eye(3, 8, dtype=np.float32) * 20
    x = np.concatenate([c + rng.normal(size=(50, 8)).astype(np.float32) for c in centres])
    labels = np.repeat([0, 1, 2], 50)
    assert backbone_probe.purity(x, labels, 3) == (100.0, pytest.approx(100 / 3))
    shuffled = rng.permutation(labels)
    p, chance = backbone_probe.purity(x, shuffled, 3)
    assert chance == pytest.approx(100 / 3) and p < 50


def test_probe_signals_against_direct_counts():
    data = backbone_probe.scenes(6, 64, seed=3)
    big, big_lab, small, small_lab = data
    assert big.shape == (6, 3, 64, 64) and small.shape == (6, 3, 32, 32) and small_lab.shape == (6, 32, 32)
    backbone = build_backbone("vit_mini", 8, None)
    row = backbone_probe.probe(backbone, data, batch=4)
    assert row["thing_share"] == pytest.approx(100 * (small_lab < N_THING).float().mean().item(), abs=0.01)
    assert row["thing_share_2r"] == pytest.approx(100 * (big_lab < N_THING).float().mean().item(), abs=0.01)
    with torch.no_grad():  # the foreground: patches above their map's mean attention, as extract selects them
        a = backbone.cls_attention(backbone.normalize(small)).view(6, 4, 4)
    fg = (a > a.mean((1, 2), keepdim=True)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    expected = 100 * ((small_lab < N_THING) & fg).sum().item() / fg.sum().item()
    assert row["attention_foreground_thing_share"] == pytest.approx(expected, abs=0.01)
    assert 0 < row["thing_crops_per_image"] <= row["crops_per_image"]
    for key in ("thing_crop_precision", "thing_crop_purity", "crop_purity"):
        assert 0 <= row[key] <= 100
    assert row["crop_purity"] >= row["crop_purity_chance"]  # k clusters never do worse than one


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_cli_one_line_per_backbone_and_clear_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "benchmarks" / "backbone_probe.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    missing = run("random", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and f"checkpoint not found: {tmp_path / 'nope.pth'}" in missing.stderr
    assert missing.stdout == ""
    bad = run("random", "--size", "60")
    assert bad.returncode == 2 and "--size 60: expected a multiple of 2 x patch size (16)" in bad.stderr
    ckpt = tmp_path / "teacher.pth"
    torch.save(build_backbone("vit_mini", 8, None, seed=5).vit.state_dict(), ckpt)
    out = run("random", str(ckpt), "--images", "4", "--size", "64")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["checkpoint"] for r in rows] == ["random", str(ckpt)]
    assert rows[0]["thing_share"] == rows[1]["thing_share"]  # the same scenes for every backbone
    assert rows[0]["attention_foreground_thing_share"] != rows[1]["attention_foreground_thing_share"]
