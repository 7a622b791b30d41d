"""evaluate.protocol: stego. The val transforms against a reference written from STEGO's published code
(src/utils.py get_transform(320, is_label, "center"): T.Resize(res, Image.NEAREST), T.CenterCrop(res), for images
and labels alike), COCO-Stuff-27's grouping against STEGO's fine_to_coarse (src/data.py, class Coco), and the
evaluate stage scoring what that protocol reads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import yaml
from PIL import Image
from scipy.optimize import linear_sum_assignment

import dataset_trees as trees
from tiny_project import default_params, run_stage_here
from transfgu.config import dataset_config
from transfgu.data.images import load_label, load_rgb
from transfgu.data.tasks import resolve_task

REPO = Path(__file__).resolve().parent.parent


def stego_transform(size: int):
    """STEGO's get_transform(size, ..., "center") without ToTensor / normalize (the same for images and labels)."""
    return T.Compose([T.Resize(size, Image.NEAREST), T.CenterCrop(size)])


# (width, height): shorter side already at the size (odd and .5 crop offsets), portrait, landscape, square,
# smaller than the size (enlarged)
SHAPES = [(31, 20), (33, 20), (20, 45), (37, 29), (13, 9), (20, 20), (64, 48)]


@pytest.mark.parametrize("w, h", SHAPES)
def test_stego_transforms_match_the_published_code(tmp_path, w, h):
    rng = np.random.default_rng(w * 100 + h)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    label = Image.fromarray(rng.integers(0, 30, (h, w), dtype=np.uint8), mode="L")
    rgb.save(tmp_path / "image.png")
    label.save(tmp_path / "label.png")
    size = 20
    expected_rgb = np.asarray(stego_transform(size)(rgb))
    expected_label = np.asarray(stego_transform(size)(label))
    got_rgb = load_rgb(tmp_path / "image.png", size, "stego").permute(1, 2, 0).numpy()
    got_label = load_label(tmp_path / "label.png", size, np.arange(256), "stego").numpy()
    np.testing.assert_array_equal(got_rgb, expected_rgb)
    np.testing.assert_array_equal(got_label, expected_label)
    # TransFGU's own protocol is another picture of the image unless it is square at the size already
    if (w, h) != (size, size):
        assert not np.array_equal(load_rgb(tmp_path / "image.png", size).permute(1, 2, 0).numpy(), expected_rgb)


# STEGO's src/data.py, class Coco: fine_to_coarse (COCO-Stuff PNG id -> its 27 classes, in its own order)
STEGO_FINE_TO_COARSE = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8, 13: 8, 14: 8, 15: 7,
    16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7, 25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6,
    32: 6, 33: 10, 34: 10, 35: 10, 36: 10, 37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5,
    46: 5, 47: 5, 48: 5, 49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2, 60: 2, 61: 3,
    62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0, 73: 0, 74: 0, 75: 0, 76: 0, 77: 1,
    78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4, 85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17,
    93: 22, 94: 20, 95: 20, 96: 22, 97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23,
    106: 15, 107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13, 117: 13,
    118: 22, 119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24, 127: 20, 128: 22, 129: 15,
    130: 17, 131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17, 137: 25, 138: 16, 139: 21, 140: 17, 141: 22,
    142: 16, 143: 21, 144: 21, 145: 25, 146: 21, 147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21,
    154: 26, 155: 15, 156: 23, 157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20,
    166: 17, 167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18, 177: 26,
    178: 26, 179: 19, 180: 19, 181: 24}


def test_cocostuff27_groups_the_png_ids_as_stego_does():
    """Same partition of the 182 PNG ids into 27 classes (the class order may differ: matching makes it
    irrelevant); 255 (unlabelled) is ignored by both."""
    lut = resolve_task(dataset_config({"name": "cocostuff", "root": "data/MSCOCO", "R": 320}), 27).label_lut
    ours = {int(i): int(lut[i]) for i in range(182)}
    assert all(0 <= c < 27 for c in ours.values())
    pairs = {(ours[i], STEGO_FINE_TO_COARSE[i]) for i in range(182)}
    assert len(pairs) == 27 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 27
    assert not 0 <= int(lut[255]) < 27


def test_evaluate_scores_what_the_stego_protocol_reads(tmp_path, monkeypatch):
    """On the COCO fixture tree (images of other aspects than 1:1), evaluate's miou with protocol stego equals
    a Hungarian-matched score computed here from images and labels transformed by the reference above."""
    from transfgu.models.decoder import build_decoder, load_decoder
    from transfgu.models.vit import build_backbone
    from transfgu.segmenter import Segmenter

    R = 32
    root = trees.make_coco(tmp_path / "coco", n_train=2, n_val=2)
    params = default_params({"granularity": 27, "dataset": {"name": "cocostuff", "root": str(root), "R": R},
                             "train": {"batch_size": 1},
                             "evaluate": {"batch_size": 2, "n_pictures": 1, "patch_kmeans_baseline": False,
                                          "crf": False, "protocol": "stego"}})
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    monkeypatch.chdir(project)
    monkeypatch.delenv("TRANSFGU_PARAMS", raising=False)
    run_stage_here("prepare")
    task = resolve_task(dataset_config(params["dataset"]), 27)
    torch.save(build_decoder(task.n_outputs, 192, seed=2).state_dict(), project / "outputs" / "decoder.pt")
    run_stage_here("evaluate")
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())

    index = json.loads((project / "outputs" / "index.json").read_text())
    entries = index["splits"]["val"]
    images, labels, shapes = [], [], set()
    for e in entries:
        with Image.open(Path(params["dataset"]["root"]) / e["image"]) as im:
            shapes.add(im.size[0] == im.size[1])
            images.append(torch.from_numpy(np.asarray(stego_transform(R)(im.convert("RGB"))).copy()))
        with Image.open(Path(params["dataset"]["root"]) / e["label"]) as im:
            labels.append(task.label_lut[np.asarray(stego_transform(R)(im)).astype(np.int64)])
    seg = Segmenter(build_backbone("vit_mini", 8, None, seed=0),
                    load_decoder(build_decoder(task.n_outputs, 192), project / "outputs" / "decoder.pt").eval())
    assert False in shapes  # an image of another aspect than 1:1
    pred = seg.predict(torch.stack(images).permute(0, 3, 1, 2).float() / 255).numpy()
    label = np.stack(labels)
    ok = (label >= 0) & (label < 27)
    conf = np.bincount(pred[ok] * 27 + label[ok], minlength=27 * 27).reshape(27, 27)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    matched = np.zeros_like(conf)
    matched[cols] = conf[rows]
    tp = np.diag(matched)
    union = matched.sum(0) + matched.sum(1) - tp
    assert metrics["miou"] == pytest.approx(100 * np.mean(tp[union > 0] / union[union > 0]), abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(100 * tp.sum() / conf.sum(), abs=1e-9)
    for e in entries:
        with Image.open(project / "outputs" / "predictions" / f"{e['id']}.png") as im:
            assert im.size == (R, R)
