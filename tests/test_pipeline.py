"""The whole DAG through DVC on a tiny synthetic configuration, in a temporary git repository."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_project import copy_project, default_params
from tiny_project import run as run_in_project

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "dataset": {"R": 32, "synthetic": {"n_train": 12, "n_val": 6, "size": 64}},
    "extract": {"batch_size": 4, "crop_batch": 64},
    "pseudo": {"batch_size": 4},
    "train": {"epochs": 3, "batch_size": 4, "bootstrap_start": 1, "bootstrap_intervals": [2]},
    "evaluate": {"batch_size": 4, "n_pictures": 2},
    "probe": {"epochs": 2, "batch_size": 4},
}


def run(args, cwd):
    proc = run_in_project(args, cwd)
    return proc.stdout + proc.stderr


def dvc(*args, cwd):
    return run([sys.executable, "-m", "dvc", *args], cwd)


def ran_stages(output: str) -> set:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    copy_project(root, default_params(TINY))
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    run(["git", "init", "-q"], root)
    dvc("init", "-q", cwd=root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "code"], root)  # as a clone has: dvclive follows a repository with a commit
    out = dvc("repro", cwd=root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "tiny run"], root)
    return root, out


def read_metrics(root):
    return json.loads((root / "outputs" / "metrics.json").read_text())


def test_repro_runs_every_stage_and_reports_metrics(project):
    root, out = project
    assert ran_stages(out) == {"prepare", "extract", "cluster", "pseudo", "train", "evaluate", "probe"}
    shown = json.loads(dvc("metrics", "show", "--json", cwd=root))
    files = {path: f["data"] for rev in shown.values() for path, f in rev["data"].items()}
    values = files["outputs/metrics.json"]  # the headline, in this order, and nothing else
    assert list(values) == ["miou", "pixel_accuracy", "baseline_miou", "baseline_pixel_accuracy", "miou_things",
                            "miou_stuff", "crf_miou", "crf_pixel_accuracy", "crf_miou_things", "crf_miou_stuff"]
    assert all(0 <= v <= 100 for v in values.values())
    probe = files["outputs/probe_metrics.json"]  # the linear probe: a metric of its own stage
    assert list(probe) == ["linear_miou", "linear_pixel_accuracy"] and all(0 <= v <= 100 for v in probe.values())
    assert "outputs/pseudo_metrics.json" not in files  # diagnostics: not a DVC metric
    assert 0 <= json.loads((root / "outputs" / "pseudo_metrics.json").read_text())["pseudo_miou"] <= 100
    assert json.loads((root / "outputs" / "eval_details.json").read_text()) == {"n_images": 6, "n_classes": 6,
                                                                                "labelled": True}
    assert len(list((root / "outputs" / "pictures").glob("*.png"))) == 2
    log = (root / "outputs" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + 3 and log[0].startswith("epoch,loss")
    per_class = (root / "outputs" / "per_class_iou.csv").read_text().splitlines()
    assert len(per_class) == 1 + 6


def encodings(spec):
    """Every (channel, encoding) of a Vega-Lite spec, layers and facets included."""
    if isinstance(spec, dict):
        for channel, enc in (spec.get("encoding") or {}).items():
            yield channel, enc
        for key, value in spec.items():
            if key != "encoding" and key != "data":
                yield from encodings(value)
    elif isinstance(spec, list):
        for item in spec:
            yield from encodings(item)


def test_every_plot_renders_with_data_named_fields_and_axis_titles(project):
    """`dvc plots show --json` with the installed DVC: each Vega-Lite plot has data, its x / y fields are in the
    data (numbers where the axis is quantitative: the old per-class bar put the class names on a quantitative x
    and drew blank axes), its axes have titles (not "y"); the pictures are image plots."""
    root, _ = project
    shown = json.loads(dvc("plots", "show", "--json", cwd=root))
    assert not shown.get("errors"), shown.get("errors")
    plots = shown["data"]
    expected = {"Training loss (per step)", "Training losses (per epoch)", "Validation during training",
                "outputs/per_class_iou.csv", "outputs/confusion_plot.csv"}
    assert expected <= set(plots), sorted(plots)
    images = {name: p for name, ps in plots.items() for p in ps if p["type"] == "image"}
    assert sorted(images) == sorted(f"outputs/pictures/{p.name}" for p in (root / "outputs" / "pictures").glob("*.png"))
    assert len(images) == 2 and all(Path(p["url"]).is_file() for p in images.values())
    for name in expected:
        (plot,) = plots[name]
        assert plot["type"] == "vega", name
        spec = plot["content"]
        rows = spec["data"]["values"]
        assert rows, f"{name}: no data"
        axes = [(c, e) for c, e in encodings(spec) if c in ("x", "y") and "field" in e and "aggregate" not in e]
        assert {c for c, _ in axes} == {"x", "y"}, name
        for channel, enc in axes:
            assert enc.get("title") not in (None, "", "x", "y"), (name, channel, enc.get("title"))
            values = [r[enc["field"]] for r in rows if enc["field"] in r]
            assert values, (name, channel, enc["field"])
            if enc["type"] == "quantitative":
                numbers = [float(v) for v in values if v != ""]  # ValueError: a name on a numeric axis
                assert numbers, (name, channel)
    bars = plots["outputs/per_class_iou.csv"][0]["content"]
    assert {r["class"] for r in bars["data"]["values"]} == {
        "round", "boxy", "pointy", "fluid", "ground", "structure"}
    loss = plots["Training loss (per step)"][0]["content"]["data"]["values"]
    assert [int(r["step"]) for r in loss] == list(range(1, 10))  # 3 epochs x 3 steps: a point per step here
    live = json.loads((root / "outputs" / "dvclive" / "metrics.json").read_text())
    assert live["epoch"] == 2 and live["step"] == 9 and set(live["val"]) == {"miou", "pixel_accuracy", "miou_things", "miou_stuff", "things_predicted"}


def test_thing_stuff_split_of_the_scores(project):
    """miou_things / miou_stuff average the per-class IoUs of the three thing and three stuff classes; the pseudo
    stage's thing_share is the share of thing pixels in the train labels at R."""
    import numpy as np
    from transfgu.data.images import load_label
    from transfgu.config import dataset_config
    from transfgu.data.tasks import resolve_task

    root, _ = project
    metrics = read_metrics(root)
    rows = [line.split(",") for line in (root / "outputs" / "per_class_iou.csv").read_text().splitlines()[1:]]
    iou = [float(v) if v else None for _, v in rows]
    for key, part in (("miou_things", iou[:3]), ("miou_stuff", iou[3:])):
        present = [v for v in part if v is not None]
        assert metrics[key] == pytest.approx(sum(present) / len(present), abs=1e-3)  # the csv rounds to 1e-4
    pseudo = json.loads((root / "outputs" / "pseudo_metrics.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    task = resolve_task(dataset_config(params["dataset"]), params["granularity"])
    labels = np.stack([load_label(path, params["dataset"]["R"], task.label_lut).numpy()
                       for path in sorted((root / "data" / "synthetic" / "labels" / "train").glob("*.png"))])
    assert pseudo["thing_share"] == pytest.approx(100 * (labels < 3).mean(), abs=1e-9)
    assert 0 <= pseudo["attention_foreground_thing_share"] <= 100
    assert pseudo["pseudo_miou_things"] <= 100 and 0 <= pseudo["pseudo_miou_stuff"] <= 100


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_rerun_gives_identical_results(project):
    """Same params and seed on the same machine: the same centroids, decoder weights and metrics."""
    root, _ = project
    before = read_metrics(root)
    files = {n: (root / "outputs" / n).read_bytes() for n in ("centroids.npz", "decoder.pt")}
    out = dvc("repro", "-f", "-s", "cluster", "pseudo", "train", "evaluate", cwd=root)
    assert ran_stages(out) == {"cluster", "pseudo", "train", "evaluate"}
    assert read_metrics(root) == before
    for name, data in files.items():
        assert (root / "outputs" / name).read_bytes() == data, name


def test_granularity_experiment_reruns_cluster_onward_only(project):
    root, _ = project
    out = dvc("exp", "run", "-S", "granularity=12", cwd=root)
    # prepare runs on every repro (it re-reads the dataset) and writes the same index: extract is not re-run; the
    # probe is, as granularity fixes its label set (6 coarse / 12 fine synthetic classes)
    assert ran_stages(out) == {"prepare", "cluster", "pseudo", "train", "evaluate", "probe"}
    assert len(json.loads((root / "outputs" / "cluster_classes.json").read_text())["clusters"]) == 12
    shown = json.loads(dvc("exp", "show", "--json", cwd=root))
    text = json.dumps(shown)
    assert '"miou"' in text and '"granularity": 12' in text


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_things_only_dataset_runs_with_background_channel(project):
    root, _ = project
    out = dvc("exp", "run", "-S", "dataset.name=synthetic-things", "-S", "granularity=4", cwd=root)
    assert {"extract", "cluster", "pseudo", "train", "evaluate"} <= ran_stages(out)
    assert json.loads((root / "outputs" / "eval_details.json").read_text())["n_classes"] == 4
    import torch
    state = torch.load(root / "outputs" / "decoder.pt", weights_only=True)
    assert state["cls_emb"].shape[1] == 4  # background + 3 things


def test_invalid_granularity_fails_before_any_work(project):
    root, _ = project
    env = dict(os.environ, TRANSFGU_PARAMS=str(root / "bad.yaml"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["granularity"] = 5
    (root / "bad.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "stages/prepare.py"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "granularity: 5 is not valid" in proc.stderr and "synthetic: granularity [6, 12]" in proc.stderr


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_evaluate_only_with_a_given_decoder(project):
    """`stages/evaluate.py --decoder` scores a decoder file without training, into outputs/published/<name>/;
    on the trained decoder it reproduces the stage's own metrics. A decoder of other shapes is refused."""
    root, _ = project
    dvc("repro", cwd=root)  # back in sync with the workspace params
    shutil.copy(root / "outputs" / "decoder.pt", root / "copy_decoder.pt")
    run([sys.executable, "stages/evaluate.py", "--decoder", "copy_decoder.pt"], root)
    published = json.loads((root / "outputs" / "published" / "copy_decoder" / "metrics.json").read_text())
    own = read_metrics(root)
    assert published["miou"] == own["miou"] and published["pixel_accuracy"] == own["pixel_accuracy"]
    assert (root / "outputs" / "published" / "copy_decoder" / "per_class_iou.csv").is_file()
    import torch
    from transfgu.models.decoder import build_decoder
    torch.save(build_decoder(9, 192).state_dict(), root / "wrong_decoder.pt")
    proc = subprocess.run([sys.executable, "stages/evaluate.py", "--decoder", "wrong_decoder.pt"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "wrong_decoder.pt" in proc.stderr and "cls_emb" in proc.stderr


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_real_dataset_layout_through_dvc_exp_run(project, tmp_path):
    """`dvc exp run -S dataset.name=voc -S dataset.root=... -S granularity=21` on a fixture tree in the exact
    Pascal VOC layout runs all six stages (every other pair runs in-process in test_datasets_dag.py)."""
    from dataset_trees import make_voc
    root, _ = project
    voc = make_voc(tmp_path / "PascalVOC")
    out = dvc("exp", "run", "-S", "dataset.name=voc", "-S", f"dataset.root={voc}", "-S", "granularity=21",
              "-S", "train.batch_size=2", cwd=root)
    assert ran_stages(out) == {"prepare", "extract", "cluster", "pseudo", "train", "evaluate", "probe"}
    metrics = read_metrics(root)
    assert json.loads((root / "outputs" / "eval_details.json").read_text())["n_classes"] == 21
    assert 0 <= metrics["miou"] <= 100
