"""The cluster -> class matching: evaluate saves it (outputs/cluster_classes.json), `transfgu predict` names and
colours its outputs with it, in the colours of evaluate's pictures."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import transfgu.segmenter
from tiny_project import default_params, run_stage_here
from transfgu import cli
from transfgu.matching import match_clusters, read_cluster_classes, unmatched_clusters, write_cluster_classes
from transfgu.models.decoder import build_decoder
from transfgu.viz import TITLE_HEIGHT, palette

REPO = Path(__file__).resolve().parent.parent
NAMES = ["round", "boxy", "pointy", "fluid", "ground", "structure"]  # synthetic, granularity 6
PERM = [3, 0, 5, 1, 4, 2]  # cluster c is class PERM[c]
INV = [PERM.index(k) for k in range(6)]  # the cluster of class k


def test_match_clusters_names_colours_and_unmatched_clusters():
    m = match_clusters([2, -1, 0, 1, -1], ["a", "b", "c"], [50.0, None, 25.0])
    assert m.names == ["c", "cluster 1", "a", "b", "cluster 4"]
    assert m.classes == [2, None, 0, 1, None] and m.iou == [25.0, None, 50.0, None, None]
    assert m.legend_names == ["a", "b", "c", "cluster 1", "cluster 4"]
    np.testing.assert_array_equal(m.colors, palette(5)[[2, 3, 0, 1, 4]])
    none = unmatched_clusters(3)
    assert none.names == ["cluster 0", "cluster 1", "cluster 2"] and not none.matched
    np.testing.assert_array_equal(none.colors, palette(3))


def test_matching_file_round_trip_and_checks(tmp_path):
    decoder = tmp_path / "decoder.pt"
    torch.save(build_decoder(6, 192, seed=1).state_dict(), decoder)
    m = match_clusters(PERM, NAMES, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    record = write_cluster_classes(tmp_path / "cluster_classes.json", m, NAMES, decoder=decoder)
    assert record["clusters"][0] == {"cluster": 0, "class_id": 3, "name": "fluid", "iou": 40.0,
                                     "color": "#%02x%02x%02x" % tuple(palette(6)[3])}
    back = read_cluster_classes(tmp_path / "cluster_classes.json", 6, decoder)
    assert back.names == m.names and back.iou == m.iou
    np.testing.assert_array_equal(back.colors, m.colors)
    with pytest.raises(ValueError, match="names 6 clusters, the decoder has 7"):
        read_cluster_classes(tmp_path / "cluster_classes.json", 7)
    other = tmp_path / "other.pt"
    torch.save(build_decoder(6, 192, seed=2).state_dict(), other)
    with pytest.raises(ValueError, match="another decoder"):
        read_cluster_classes(tmp_path / "cluster_classes.json", 6, other)


class PermutedEvalSegmenter:
    """evaluate's Segmenter, replaced: predicts cluster INV[k] wherever the ground truth is class k. It knows the
    ground truth of each val image through LABELS (image bytes at R -> label map), which the test fills."""
    LABELS: dict = {}

    def __init__(self, backbone, decoder):
        pass

    def predict(self, images_01, precision="fp32"):
        images = (images_01 * 255).round().to(torch.uint8)
        labels = torch.stack([self.LABELS[image.numpy().tobytes()] for image in images])
        return torch.tensor(INV)[labels.clamp(0, len(INV) - 1)]

    def __call__(self, images_01, precision="fp32"):  # one-hot logits at the image's size: their argmax is predict's
        return F.one_hot(self.predict(images_01, precision), len(INV)).permute(0, 3, 1, 2).float() * 10, None


class RedCodeSegmenter:
    """predict's Segmenter, replaced: cluster c wherever the image's red channel is 40 c (one-hot logits)."""

    def __init__(self, backbone, decoder):
        self.n = decoder.n_cls

    def __call__(self, images_01, precision="fp32"):
        code = (images_01[:, 0] * 255 / 40).round().long().clamp(0, self.n - 1)
        return F.one_hot(code, self.n).permute(0, 3, 1, 2).float() * 10, None


@pytest.fixture
def evaluate_module(monkeypatch, tmp_path):
    """A project folder after stages/prepare.py (run in this process), with dvc.yaml."""
    monkeypatch.delenv("TRANSFGU_PARAMS", raising=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"].update(root=str(tmp_path / "data"), R=32, synthetic={"n_train": 2, "n_val": 8, "size": 32})
    params["evaluate"].update(patch_kmeans_baseline=False, n_pictures=8, batch_size=4, crf=False)  # 3 panels
    params["train"].update(batch_size=2)  # prepare checks the batch against the 2 train images
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    monkeypatch.chdir(project)
    run_stage_here("prepare")
    return project


def test_predict_names_and_colours_are_the_matched_classes(evaluate_module, monkeypatch, tmp_path):
    """A run where the answer is known: clusters are a known permutation of the classes. evaluate saves exactly
    that permutation (IoU 100); predict then names every cluster after its class and paints it in the colour
    that class has in evaluate's pictures."""
    project = evaluate_module
    out = project / "outputs"
    torch.save(build_decoder(6, 192, seed=1).state_dict(), out / "decoder.pt")
    from transfgu.data.images import load_label, load_rgb
    from transfgu.config import DatasetConfig
    from transfgu.data.tasks import resolve_task
    lut = resolve_task(DatasetConfig(name="synthetic", root="x", R=64), 6).label_lut
    data = project.parent / "data"
    monkeypatch.setattr(PermutedEvalSegmenter, "LABELS", {
        load_rgb(image, 32).numpy().tobytes(): load_label(data / "labels" / "val" / image.name, 32, lut)
        for image in sorted((data / "images" / "val").glob("*.png"))})
    monkeypatch.setattr(transfgu.segmenter, "Segmenter", PermutedEvalSegmenter)  # what stages/evaluate.py imports
    run_stage_here("evaluate")

    matching = json.loads((out / "cluster_classes.json").read_text())
    assert matching["split"] == "val" and matching["classes"] == NAMES
    assert [(e["cluster"], e["class_id"], e["name"], e["iou"]) for e in matching["clusters"]] == \
        [(c, PERM[c], NAMES[PERM[c]], 100.0) for c in range(6)]
    assert json.loads((out / "metrics.json").read_text())["miou"] == 100.0

    # the colour of each class in the pictures: prediction panel == ground-truth panel (a perfect prediction)
    class_colour = {}
    for picture in sorted((out / "pictures").glob("*.png")):
        a = np.asarray(Image.open(picture).convert("RGB"))
        zoom = 160 // 32
        pred_panel = a[TITLE_HEIGHT:TITLE_HEIGHT + 32 * zoom, 32 * zoom:64 * zoom]
        gt_panel = a[TITLE_HEIGHT:TITLE_HEIGHT + 32 * zoom, 64 * zoom:96 * zoom]
        np.testing.assert_array_equal(pred_panel, gt_panel)
        i = int(picture.name[:3])
        fine = np.asarray(Image.open(project.parent / "data" / "labels" / "val" / f"{i:05d}.png"))  # 32 x 32 = R
        for y, x in [(0, 0), (16, 16), (31, 31), (8, 24), (24, 8)]:
            k = int(fine[y, x]) // 2  # the 12 fine kinds -> the 6 classes of granularity 6
            class_colour.setdefault(k, set()).add(tuple(gt_panel[y * zoom + 2, x * zoom + 2]))
    assert all(len(c) == 1 for c in class_colour.values())

    # predict: image c is uniformly red = 40 c, so the segmenter outputs cluster c everywhere
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for c in range(6):
        Image.fromarray(np.full((20, 28, 3), (40 * c, 0, 0), dtype=np.uint8)).save(imgs / f"c{c}.png")
    monkeypatch.setattr(cli, "Segmenter", RedCodeSegmenter)
    cli.main(["predict", str(imgs), "--decoder", str(out / "decoder.pt"), "--out", str(tmp_path / "pred")])
    rows = [line.split("\t") for line in (tmp_path / "pred" / "classes.txt").read_text().splitlines()]
    assert rows[0] == ["cluster", "name", "class_id", "iou", "color"]
    assert [(int(r[0]), r[1], int(r[2]), float(r[3])) for r in rows[1:]] == \
        [(c, NAMES[PERM[c]], PERM[c], 100.0) for c in range(6)]
    for c in range(6):
        assert (np.asarray(Image.open(tmp_path / "pred" / f"c{c}_label.png")) == c).all()
        colour = np.asarray(Image.open(tmp_path / "pred" / f"c{c}_color.png"))
        assert (colour == palette(6)[PERM[c]]).all()
        assert rows[1 + c][4] == "#%02x%02x%02x" % tuple(palette(6)[PERM[c]])
        if PERM[c] in class_colour:  # the same colour as the class in outputs/pictures
            assert class_colour[PERM[c]] == {tuple(colour[0, 0])}
    assert len(class_colour) >= 4


def test_predict_without_a_matching_calls_the_outputs_clusters(tmp_path, monkeypatch, caplog, capsys):
    decoder = tmp_path / "decoder.pt"
    torch.save(build_decoder(6, 192, seed=1).state_dict(), decoder)
    params = default_params({"dataset": {"R": 32}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Image.fromarray(np.full((16, 16, 3), (80, 0, 0), dtype=np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(cli, "Segmenter", RedCodeSegmenter)
    args = ["predict", str(tmp_path / "a.png"), "--decoder", str(decoder), "--params", str(tmp_path / "params.yaml"),
            "--out", str(tmp_path / "pred")]
    cli.main(args)
    assert "no cluster -> class matching" in caplog.text
    rows = (tmp_path / "pred" / "classes.txt").read_text().splitlines()
    assert rows[1:] == [f"{c}\tcluster {c}\t-\t-\t" + "#%02x%02x%02x" % tuple(palette(6)[c]) for c in range(6)]
    assert (np.asarray(Image.open(tmp_path / "pred" / "a_color.png")) == palette(6)[2]).all()
    # an explicit --classes that is missing, or made for another decoder, is an error
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--classes", str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "missing.json not found" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save(build_decoder(6, 192, seed=2).state_dict(), other)
    write_cluster_classes(tmp_path / "m.json", match_clusters(PERM, NAMES), NAMES, decoder=other)
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--classes", str(tmp_path / "m.json")])
    assert e.value.code == 2 and "another decoder" in capsys.readouterr().err
