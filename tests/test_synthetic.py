"""Tests for the synthetic scene generator and dataset writer."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from transfgu.data import synthetic
from transfgu.data.synthetic import (
    COARSE_CLASS_NAMES,
    FINE_CLASS_NAMES,
    GENERATOR_VERSION,
    generate_scene,
    write_synthetic_dataset,
)

N_FINE = 12
N_THING = 6


def _scenes(seed, n, size=64):
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, size) for _ in range(n)]


def _pixels(scenes):
    """Stack scenes into (N, 3) int RGB and (N,) labels."""
    rgb = np.concatenate([img.reshape(-1, 3) for img, _ in scenes]).astype(np.int64)
    lab = np.concatenate([label.ravel() for _, label in scenes]).astype(np.int64)
    return rgb, lab


def test_class_names():
    assert len(FINE_CLASS_NAMES) == N_FINE and len(set(FINE_CLASS_NAMES)) == N_FINE
    assert len(COARSE_CLASS_NAMES) == N_FINE // 2 and len(set(COARSE_CLASS_NAMES)) == N_FINE // 2
    assert all(isinstance(n, str) and n for n in FINE_CLASS_NAMES + COARSE_CLASS_NAMES)


def test_scene_shapes_dtypes_and_labels():
    scenes = _scenes(0, 20)
    with_both = 0
    for img, label in scenes:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert label.shape == (64, 64) and label.dtype == np.uint8
        assert label.max() < N_FINE
        has_thing = (label < N_THING).any()
        has_stuff = (label >= N_THING).any()
        with_both += has_thing and has_stuff
    assert with_both >= 18
    # Images are not flat: they span a good part of the intensity range.
    assert all(int(img.max()) - int(img.min()) > 60 for img, _ in scenes)


@pytest.mark.parametrize("size", [17, 48, 100])
def test_odd_sizes(size):
    img, label = generate_scene(np.random.default_rng(5), size)
    assert img.shape == (size, size, 3) and label.shape == (size, size)


def test_deterministic():
    a_img, a_lab = generate_scene(np.random.default_rng(123), 64)
    b_img, b_lab = generate_scene(np.random.default_rng(123), 64)
    c_img, c_lab = generate_scene(np.random.default_rng(124), 64)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_layout_independent_of_resolution():
    for seed in range(3):
        _, big = generate_scene(np.random.default_rng(seed), 128)
        _, small = generate_scene(np.random.default_rng(seed), 64)
        assert (big[::2, ::2] == small).mean() > 0.9


def test_every_fine_class_appears():
    seen = np.zeros(N_FINE, dtype=bool)
    for _, label in _scenes(1, 50, size=48):
        seen[np.unique(label)] = True
    assert seen.all(), [FINE_CLASS_NAMES[i] for i in np.flatnonzero(~seen)]


def test_things_are_a_third_of_the_pixels_and_in_every_scene():
    """Objects large enough to fill the smallest crop window (0.2 of the side) and to span several patches:
    things cover 25-45 % of all pixels, at least 5 % of every scene."""
    labels = np.stack([label for _, label in _scenes(2, 100, size=64)])
    per_scene = (labels < N_THING).mean(axis=(1, 2))
    assert 0.25 < per_scene.mean() < 0.45, per_scene.mean()
    assert per_scene.min() > 0.05, per_scene.min()


def test_colour_alone_is_not_sufficient():
    train_rgb, train_lab = _pixels(_scenes(10, 40))
    test_rgb, test_lab = _pixels(_scenes(11, 40))
    majority = np.bincount(test_lab).max() / test_lab.size

    # Nearest class mean in RGB, fitted on train scenes, scored on held-out scenes.
    means = np.stack([train_rgb[train_lab == c].mean(0) for c in range(N_FINE)])
    pred = np.argmin(((test_rgb[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    nearest_mean_acc = (pred == test_lab).mean()
    assert majority < nearest_mean_acc < 0.6

    # Colour-histogram lookup (16 bins per channel): the best colour-only per-pixel
    # rule for the data it is fitted on.  Even scored in-sample it stays well below 0.9.
    def bins(rgb):
        return (rgb // 16) @ np.array([256, 16, 1])

    hist = np.zeros((16**3, N_FINE))
    np.add.at(hist, (bins(train_rgb), train_lab), 1)
    lookup = hist.argmax(1)
    in_sample_acc = (lookup[bins(train_rgb)] == train_lab).mean()
    held_out_acc = (lookup[bins(test_rgb)] == test_lab).mean()
    assert in_sample_acc < 0.9
    assert majority + 0.2 < held_out_acc < 0.85  # colour helps, but is far from enough


def _snapshot(root):
    return {
        p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()
    }


def test_write_synthetic_dataset(tmp_path):
    root = tmp_path / "ds"
    meta = write_synthetic_dataset(root, n_train=5, n_val=3, size=32, seed=7)

    expected = {
        "generator_version": GENERATOR_VERSION,
        "n_train": 5,
        "n_val": 3,
        "size": 32,
        "seed": 7,
        "class_names": FINE_CLASS_NAMES,
    }
    assert meta == expected
    assert json.loads((root / "meta.json").read_text()) == expected

    for split, n in (("train", 5), ("val", 3)):
        names = [f"{i:05d}.png" for i in range(n)]
        assert sorted(p.name for p in (root / "images" / split).iterdir()) == names
        assert sorted(p.name for p in (root / "labels" / split).iterdir()) == names
        for name in names:
            with Image.open(root / "images" / split / name) as img:
                assert img.mode == "RGB" and img.size == (32, 32)
            with Image.open(root / "labels" / split / name) as lab:
                assert lab.mode == "L" and lab.size == (32, 32)
                assert np.asarray(lab).max() < N_FINE

    # Files hold the scenes of the documented independent streams.
    for split, stream in (("train", 0), ("val", 1)):
        img0, lab0 = generate_scene(np.random.default_rng([7, stream]), 32)
        np.testing.assert_array_equal(np.asarray(Image.open(root / "images" / split / "00000.png")), img0)
        np.testing.assert_array_equal(np.asarray(Image.open(root / "labels" / split / "00000.png")), lab0)
    train0 = np.asarray(Image.open(root / "images" / "train" / "00000.png"))
    val0 = np.asarray(Image.open(root / "images" / "val" / "00000.png"))
    assert not np.array_equal(train0, val0)

    # No temporary directory is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]

    # Second call with the same arguments rewrites nothing (backdate files to make
    # any rewrite visible regardless of filesystem timestamp resolution).
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(root)
    assert write_synthetic_dataset(root, n_train=5, n_val=3, size=32, seed=7) == expected
    assert _snapshot(root) == before

    # Different arguments rebuild the dataset from scratch.
    meta2 = write_synthetic_dataset(root, n_train=2, n_val=1, size=16, seed=7)
    assert meta2["n_train"] == 2 and json.loads((root / "meta.json").read_text()) == meta2
    assert len(list((root / "images" / "train").iterdir())) == 2
    assert len(list((root / "labels" / "val").iterdir())) == 1
    with Image.open(root / "images" / "val" / "00000.png") as img:
        assert img.size == (16, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.generate_scene

    def flaky(rng, size, layout="scenes"):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(rng, size, layout)

    monkeypatch.setattr(synthetic, "generate_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path / "ds", n_train=5, n_val=2, size=16, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_object_layout_one_large_central_thing():
    """layout='objects' (pretraining only): exactly one thing kind per image, covering more of it than the largest
    thing kind of a scene does, its pixels centred; the same stuff kinds around it; deterministic; the default layout
    is the scenes' (same draws as before the option existed)."""
    rng = np.random.default_rng(5)
    objects = [generate_scene(rng, 64, "objects") for _ in range(60)]
    for _, label in objects:
        kinds = np.unique(label[label < N_THING])
        assert len(kinds) == 1
    share = np.mean([(label < N_THING).mean() for _, label in objects])
    largest = np.mean([max((label == k).mean() for k in range(N_THING)) for _, label in _scenes(5, 60)])
    assert share > 0.2 and share > largest + 0.03, (share, largest)  # the scenes' largest thing kind: about 0.21
    centre = np.mean([np.argwhere(label < N_THING).mean(0) for _, label in objects], axis=0)
    assert np.all(np.abs(centre - 31.5) < 4), centre
    assert {int(k) for _, label in objects for k in np.unique(label[label >= N_THING])} == set(range(N_THING, N_FINE))
    again = generate_scene(np.random.default_rng(5), 64, "objects")
    np.testing.assert_array_equal(again[0], objects[0][0])
    a, b = generate_scene(np.random.default_rng(9), 32), generate_scene(np.random.default_rng(9), 32, "scenes")
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="layout must be one of"):
        generate_scene(np.random.default_rng(0), 32, "mosaic")


def test_write_object_layout_dataset(tmp_path):
    """write_synthetic_dataset(layout='objects'): meta.json names the layout (and a scenes set of the same size
    and seed is rebuilt, not reused); the files hold the object scenes of the usual streams."""
    meta = write_synthetic_dataset(tmp_path / "o", n_train=2, n_val=0, size=32, seed=3, layout="objects")
    assert meta["layout"] == "objects"
    img0, _ = generate_scene(np.random.default_rng([3, 0]), 32, "objects")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "images" / "train" / "00000.png")), img0)
    scenes = write_synthetic_dataset(tmp_path / "o", n_train=2, n_val=0, size=32, seed=3)
    assert "layout" not in scenes and json.loads((tmp_path / "o" / "meta.json").read_text()) == scenes
    img0, _ = generate_scene(np.random.default_rng([3, 0]), 32)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "images" / "train" / "00000.png")), img0)
    with pytest.raises(ValueError, match="layout must be one of"):
        write_synthetic_dataset(tmp_path / "x", n_train=1, n_val=0, size=16, seed=0, layout="mosaic")
    assert not (tmp_path / "x").exists()
