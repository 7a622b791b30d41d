"""DINO pretraining: loss, centre, EMA teacher, multi-crop, checkpoint format, the `transfgu pretrain` command
(resume, time budget, torch.compile, the shipped teacher file)."""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from transfgu.data.synthetic import generate_scene
from transfgu import pretrain
from transfgu.dino import (DINOHead, DINOLoss, DINOTrainer, MultiCrop, cosine_schedule, random_resized_boxes,
                           save_dino_checkpoint)
from transfgu.errors import InputValueError
from transfgu.models.vit import DinoViT, _unwrap_state_dict, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


def scenes(n: int, size: int = 32) -> torch.Tensor:
    """n synthetic scenes as RGB in [0, 1] (n, 3, size, size)."""
    arr = np.stack([generate_scene(np.random.default_rng(i), size)[0] for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def tiny_trainer(seed: int = 0, steps: int = 30, **kw) -> DINOTrainer:
    torch.manual_seed(seed)
    backbone = DinoViT("vit_mini", 8)
    head = DINOHead(backbone.embed_dim, out_dim=64, hidden=128, bottleneck=32)
    return DINOTrainer(backbone, head, MultiCrop(global_size=32, local_size=16, n_local=2), epochs=1,
                       steps_per_epoch=steps, generator=torch.Generator().manual_seed(seed), **kw)


def test_pretraining_lowers_the_dino_loss():
    """30 steps on one fixed batch with fixed views (the augmentation generator is reset every step).

    The centre starts at the teacher's mean output on that batch: with the official zero start, the
    uncentred teacher of a random network is sharp and nearly the same for every image, which makes the
    first steps' loss artificially low and then rise while the centre catches up (observed: 2.6 -> 3.7)."""
    images = scenes(16)
    tr = tiny_trainer(lr=1e-3, min_lr=1e-3, freeze_last_layer=0)
    with torch.no_grad():
        views = tr.multicrop(images, torch.Generator().manual_seed(0))
        tr.loss_fn.center.copy_(tr.embed(tr.teacher, views[:2]).mean(0, keepdim=True))
    losses = []
    for step in range(30):
        tr.generator = torch.Generator().manual_seed(0)
        losses.append(tr.train_step(images, step))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert np.isfinite(losses).all()
    assert last < first - 0.5, (first, last, np.round(losses, 3))
    assert len(tr.history) == 30 and tr.history[-1]["loss"] == losses[-1]


def test_teacher_is_the_ema_of_the_student():
    images = scenes(4)
    tr = tiny_trainer(steps=2, momentum_teacher=0.5, momentum_teacher_end=0.5, freeze_last_layer=0)
    tr.train_step(images, 0)  # after this the teacher differs from the student
    before = [p.detach().clone() for p in tr.teacher.parameters()]
    tr.train_step(images, 1)
    m = tr.momentum_schedule[1]
    assert m == 0.5
    moved = 0
    for t_before, t_after, s_after in zip(before, tr.teacher.parameters(), tr.student.parameters()):
        expected = m * t_before + (1 - m) * s_after.detach()
        assert torch.allclose(t_after, expected, atol=1e-6, rtol=0)
        moved += not torch.equal(t_after, t_before)
        assert not t_after.requires_grad and t_after.grad is None
    assert moved > 10


def test_last_layer_frozen_in_the_first_epoch():
    images = scenes(4)
    tr = tiny_trainer(steps=1, freeze_last_layer=1)
    last = tr.student["head"].last_layer.weight_v.detach().clone()
    mlp = tr.student["head"].mlp[0].weight.detach().clone()
    tr.train_step(images, 0)
    assert torch.equal(tr.student["head"].last_layer.weight_v, last)
    assert not torch.equal(tr.student["head"].mlp[0].weight, mlp)


def test_checkpoint_loads_with_build_backbone(tmp_path):
    tr = tiny_trainer(steps=1)
    tr.train_step(scenes(4), 0)
    path = save_dino_checkpoint(tmp_path / "sub" / "dino.pth", tr.teacher["backbone"], tr.student["backbone"],
                                tr.teacher["head"], tr.student["head"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["dino.pth"]  # no temporary file left
    obj = torch.load(path, map_location="cpu", weights_only=True)
    teacher_vit = tr.teacher["backbone"].vit.state_dict()
    assert {k for k in obj["teacher"] if k.startswith("backbone.")} == {f"backbone.{k}" for k in teacher_vit}
    head_keys = {f"head.{k}" for k in tr.teacher["head"].state_dict()}
    assert {k for k in obj["teacher"] if k.startswith("head.")} == head_keys
    assert "backbone.cls_token" in obj["teacher"] and "backbone.blocks.0.attn.qkv.weight" in obj["teacher"]
    assert "head.last_layer.weight_g" in obj["teacher"] and "head.last_layer.weight_v" in obj["teacher"]
    assert set(_unwrap_state_dict(obj)) == set(teacher_vit)

    loaded = build_backbone("vit_mini", 8, checkpoint=path)  # strict: raises on missing / unexpected keys
    for k, v in loaded.vit.state_dict().items():
        assert torch.equal(v, teacher_vit[k]), k
    student = tr.student["backbone"].vit.state_dict()
    assert torch.equal(obj["student"]["backbone.cls_token"], student["cls_token"])
    assert not torch.equal(obj["student"]["backbone.norm.weight"], obj["teacher"]["backbone.norm.weight"])


def test_dino_loss_equals_a_loop_over_view_pairs():
    g = torch.Generator().manual_seed(1)
    n_crops, B, K = 4, 3, 7
    student = torch.randn(n_crops * B, K, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2 * B, K, generator=g, dtype=torch.float64) * 0.3
    loss_fn = DINOLoss(K, n_crops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    loss_fn = loss_fn.double()
    center = torch.randn(1, K, generator=g, dtype=torch.float64) * 0.1
    loss_fn.center.copy_(center)
    T = 0.055  # epoch 1 of the 3-epoch linear warm-up 0.04 -> 0.07
    assert loss_fn.teacher_temp_at(1) == pytest.approx(T) and loss_fn.teacher_temp_at(5) == 0.07
    total, terms = 0.0, 0
    for iq in range(2):
        q = F.softmax((teacher[iq * B:(iq + 1) * B] - center) / T, dim=-1)
        for v in range(n_crops):
            if v == iq:
                continue
            log_p = F.log_softmax(student[v * B:(v + 1) * B] / 0.1, dim=-1)
            for b in range(B):
                total += -sum(float(q[b, k]) * float(log_p[b, k]) for k in range(K)) / B
            terms += 1
    assert terms == 2 * n_crops - 2
    assert loss_fn(student, teacher, epoch=1).item() == pytest.approx(total / terms, rel=1e-12)


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    g = torch.Generator().manual_seed(2)
    B, K = 5, 6
    loss_fn = DINOLoss(K, 3, center_momentum=0.9)
    c0 = torch.randn(1, K, generator=g)
    loss_fn.center.copy_(c0)
    teacher = torch.randn(2 * B, K, generator=g, requires_grad=True)
    student = torch.randn(3 * B, K, generator=g, requires_grad=True)
    loss_fn(student, teacher).backward()
    expected = 0.9 * c0 + 0.1 * teacher.detach().mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected, atol=1e-7)
    assert not loss_fn.center.requires_grad and teacher.grad is None  # the teacher gets no gradient
    assert student.grad is not None


def test_multicrop_views_and_determinism():
    images = scenes(3, 48)
    mc = MultiCrop(global_size=32, local_size=16, n_local=3)
    a = mc(images, torch.Generator().manual_seed(5))
    b = mc(images, torch.Generator().manual_seed(5))
    c = mc(images, torch.Generator().manual_seed(6))
    assert [v.shape for v in a] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert all(v.min() >= 0 and v.max() <= 1 for v in a)


def test_random_resized_boxes_follow_the_area_scale_and_the_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_boxes(4000, 48, 64, (0.1, 0.3), g).double()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 64 + 1e-4).all() and (boxes[:, 3] <= 48 + 1e-4).all()
    area = w * h / (48 * 64)
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 0.3 + 1e-5
    assert area.min() < 0.11 and area.max() > 0.29  # the whole range is drawn
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    # a crop of the whole area fits (almost surely) no ratio drawn: the whole image, as torchvision falls back
    whole = random_resized_boxes(5, 48, 64, (1.0, 1.0), g)
    assert torch.equal(whole, torch.tensor([[0.0, 0.0, 64.0, 48.0]] * 5))


def test_pretrain_crop_scale_options():
    """--global-scale / --local-scale reach the multi-crop, change the run key (a state file of other scales is
    not resumed), default to DINO's, and out-of-range values are one error naming the option."""
    ap = argparse.ArgumentParser()
    pretrain.add_arguments(ap)
    default = ap.parse_args(["--images", "x"])
    explicit = ap.parse_args(["--images", "x", "--global-scale", "0.4", "1", "--local-scale", "0.05", "0.4"])
    other = ap.parse_args(["--images", "x", "--global-scale", "0.5", "1", "--local-scale", "0.1", "0.25"])
    mc, mc_other = pretrain.multicrop_of(default), pretrain.multicrop_of(other)
    assert (mc.global_scale, mc.local_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (mc_other.global_scale, mc_other.local_scale) == ((0.5, 1.0), (0.1, 0.25))
    assert pretrain.run_key(default, ["a.png"]) == pretrain.run_key(explicit, ["a.png"])
    assert pretrain.run_key(default, ["a.png"]) != pretrain.run_key(other, ["a.png"])
    pretrain.check_arguments(other)
    for option, values in (("--local-scale", ["0.5", "0.2"]), ("--global-scale", ["0", "1"]),
                           ("--global-scale", ["0.4", "1.5"])):
        with pytest.raises(InputValueError, match=f"^{option} .*0 < MIN <= MAX <= 1"):
            pretrain.check_arguments(ap.parse_args(["--images", "x", option, *values]))


def test_head_and_schedules():
    head = DINOHead(16, out_dim=10, hidden=8, bottleneck=4, nlayers=3)
    assert head(torch.randn(2, 16)).shape == (2, 10)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10))
    assert not head.last_layer.weight_g.requires_grad and not hasattr(head.last_layer, "bias")
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    lr = cosine_schedule(1e-3, 1e-6, 10, warmup_steps=2)
    assert lr[0] == 0 and lr[1] == pytest.approx(5e-4) and lr[2] == 1e-3 and lr[-1] == pytest.approx(1e-6)
    m = cosine_schedule(0.996, 1.0, 5)
    assert m[0] == 0.996 and m[-1] == pytest.approx(1.0) and (np.diff(m) > 0).all()


def run_pretrain(args, cwd, entry=("-m", "transfgu.cli", "pretrain")):
    """`transfgu pretrain ARGS` (the console command's module, with this checkout first on the path)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, *entry, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def image_folder(tmp_path, n=8, size=24):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(generate_scene(np.random.default_rng(i), size)[0]).save(folder / f"{i}.png")
    return folder


TINY = ["--arch", "vit_mini", "--patch-size", "8", "--global-size", "16", "--local-size", "8", "--n-local", "2",
        "--batch-size", "4", "--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16", "--seed", "0",
        "--device", "cpu", "--no-progress"]


def teacher_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["teacher"]


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_pretrain_command_end_to_end(tmp_path):
    folder = image_folder(tmp_path)
    out = tmp_path / "weights" / "dino.pth"
    proc = run_pretrain(["--images", str(folder), *TINY, "--epochs", "1", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2 (epoch 1/1): loss" in proc.stdout and "images/s" in proc.stdout and "wall time" in proc.stdout
    backbone = build_backbone("vit_mini", 8, checkpoint=out)
    assert backbone.embed_dim == 192
    with open(out.with_name("dino.pth.loss.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [int(r["step"]) for r in rows] == [0, 1]
    assert all(np.isfinite(float(r["loss"])) and float(r["images_per_s"]) > 0 for r in rows)
    summary = json.loads(out.with_name("dino.pth.summary.json").read_text())
    assert summary["steps_done"] == summary["steps_planned"] == 2 and summary["completed"]
    assert summary["images_per_s"] > 0 and f"summary {json.dumps(summary)}" in proc.stdout
    assert not out.with_name("dino.pth.state").exists()  # removed once the planned steps are done

    # the shipped file: the teacher backbone only, loaded by backbone.checkpoint to the same weights
    small = tmp_path / "weights" / "dino_teacher.pth"
    assert summary["teacher_out"] == str(small) and small.stat().st_size < out.stat().st_size / 1.5
    assert set(teacher_of(small)) == {k for k in teacher_of(out) if k.startswith("backbone.")}
    small_backbone = build_backbone("vit_mini", 8, checkpoint=small)
    for (k, v), w in zip(backbone.state_dict().items(), small_backbone.state_dict().values()):
        assert torch.equal(v, w), k

    missing = tmp_path / "no_such_folder"
    proc = run_pretrain(["--images", str(missing), "--out", str(tmp_path / "x.pth")], tmp_path)
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.pth").exists()
    proc = run_pretrain(["--images", str(folder), "--global-size", "12", "--out", str(tmp_path / "x.pth")], tmp_path)
    assert proc.returncode == 2 and "multiple of the patch size" in proc.stderr


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_pretrain_resume_gives_the_uninterrupted_weights(tmp_path):
    """6 steps straight == 3 steps, stopped (as --minutes stops), then the same command again: identical teacher,
    student, head and loss curve; the interrupted run leaves its state file and usable checkpoints."""
    folder = image_folder(tmp_path)
    common = ["--images", str(folder), *TINY, "--steps", "6", "--checkpoint-every", "2"]
    straight, split = tmp_path / "a" / "d.pth", tmp_path / "b" / "d.pth"
    proc = run_pretrain([*common, "--out", str(straight)], tmp_path)
    assert proc.returncode == 0, proc.stderr

    proc = run_pretrain([*common, "--out", str(split), "--stop-after", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = split.with_name("d.pth.state")
    assert state.is_file() and "stopped by --stop-after after step 3 of 6" in proc.stderr
    summary = json.loads(split.with_name("d.pth.summary.json").read_text())
    assert (summary["steps_done"], summary["completed"], summary["stopped_by"]) == (3, False, "stop_after")
    build_backbone("vit_mini", 8, checkpoint=split)  # the stopped run's outputs are complete checkpoints
    saved = torch.load(state, map_location="cpu", weights_only=True)  # no full unpickling: tensors and plain values
    assert saved["step"] == 3 and len(saved["trainer"]["history"]) == 3
    assert {"student", "teacher", "optimizer", "center", "generator", "history"} <= set(saved["trainer"])
    assert len(saved["rng"]) == 1 and {"torch", "numpy", "python"} <= set(saved["rng"][0])  # one process's

    proc = run_pretrain([*common, "--out", str(split), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr and "at step 3 of 6" in proc.stderr
    assert not state.exists()
    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    for part in ("teacher", "student"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert not torch.equal(a["teacher"]["backbone.norm.weight"], a["student"]["backbone.norm.weight"])
    curves = [list(csv.DictReader(open(p.with_name("d.pth.loss.csv")))) for p in (straight, split)]
    assert [r["loss"] for r in curves[0]] == [r["loss"] for r in curves[1]] and len(curves[0]) == 6

    # --resume without a state file (or with another run's) is an error; other arguments start afresh
    proc = run_pretrain([*common, "--out", str(split), "--resume"], tmp_path)
    assert proc.returncode == 2 and "no state file" in proc.stderr
    proc = run_pretrain([*common, "--out", str(split), "--stop-after", "1"], tmp_path)
    assert proc.returncode == 0 and state.is_file()
    proc = run_pretrain([*common, "--lr", "1e-3", "--out", str(split), "--resume"], tmp_path)
    assert proc.returncode == 2 and "state of a run with other arguments" in proc.stderr
    proc = run_pretrain([*common, "--lr", "1e-3", "--out", str(split), "--stop-after", "1"], tmp_path)
    assert proc.returncode == 0 and "starting afresh" in proc.stderr and "resumed" not in proc.stderr


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_pretrain_minutes_budget_stops_after_the_crossing_step(tmp_path):
    folder = image_folder(tmp_path)
    out = tmp_path / "d.pth"
    proc = run_pretrain(["--images", str(folder), *TINY, "--steps", "1000", "--minutes", "0", "--out", str(out)],
                        tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.with_name("d.pth.summary.json").read_text())
    assert (summary["steps_done"], summary["steps_planned"], summary["stopped_by"]) == (1, 1000, "minutes")
    assert out.with_name("d.pth.state").is_file() and "stopped by --minutes after step 1 of 1000" in proc.stderr
    assert summary["lr_last"] == 0.0  # the schedule was planned over the 1000 steps (step 0 of its warm-up)


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_pretrain_compile_flag(tmp_path):
    """--compile runs the backbones through torch.compile (the eager backend: the wiring, without the minutes of
    C++ code generation inductor takes on a CPU) and gives the weights of the plain run."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    folder = image_folder(tmp_path, n=4)
    common = ["--images", str(folder), *TINY, "--steps", "1"]
    plain = run_pretrain([*common, "--out", str(tmp_path / "p.pth")], tmp_path)
    assert plain.returncode == 0, plain.stderr
    proc = run_pretrain([*common, "--compile", "--compile-backend", "eager", "--out", str(tmp_path / "c.pth")],
                        tmp_path)
    if proc.returncode != 0 and "torch._dynamo" in proc.stderr and "Unsupported" in proc.stderr:
        pytest.skip(f"torch.compile cannot trace here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "c.pth.summary.json").read_text())["compile"] is True
    a, b = teacher_of(tmp_path / "p_teacher.pth"), teacher_of(tmp_path / "c_teacher.pth")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_python_m_transfgu_pretrain_is_the_same_command(tmp_path):
    folder = image_folder(tmp_path, n=4)
    proc = run_pretrain(["--images", str(folder), *TINY, "--steps", "1", "--out", str(tmp_path / "d.pth")], tmp_path,
                        entry=("-m", "transfgu.pretrain"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d_teacher.pth").is_file()
    proc = run_pretrain(["--images", str(tmp_path / "nowhere")], tmp_path, entry=("-m", "transfgu.pretrain"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_clip_each_equals_clip_grad_norm_per_parameter():
    """The fused per-parameter clipping gives what one torch clip_grad_norm_ per parameter gives (DINO's rule):
    large gradients scaled to the limit, small ones untouched, parameters without a gradient skipped."""
    from transfgu.optim import clip_each_

    gen = torch.Generator().manual_seed(0)
    shapes, scales = [(3, 4), (7,), (2, 2, 3), (5,)], [10.0, 0.01, 3.0, 1.0]
    fused = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    loop = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, s in zip(fused, loop, scales):
        g = torch.randn(a.shape, generator=gen) * s
        a.grad, b.grad = g.clone(), g.clone()
    fused[3].grad = loop[3].grad = None
    small = fused[1].grad.clone()
    clip_each_(fused, 3.0)
    for p in loop:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_(p, 3.0)
    for a, b in zip(fused[:3], loop[:3]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert fused[3].grad is None
    assert torch.equal(fused[1].grad, small)  # norm below the limit: unchanged
    assert abs(fused[0].grad.norm().item() - 3.0) < 1e-4  # above: scaled to the limit
