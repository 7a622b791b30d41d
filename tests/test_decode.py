"""`decode: device` (extract, pseudo, train): the DataLoader workers only read the JPEG files and the batch is
decoded and resized where it is used (nvJPEG on a GPU; here libjpeg on the CPU), against PIL in the workers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dataset_trees as trees
from test_datasets_dag import STAGES, check_common_outputs, run_pipeline, stage_modules  # noqa: F401
from transfgu.data.dataset import SplitDataset, images_on
from transfgu.data.images import decode_resize, read_bytes
from transfgu.errors import InputValueError


def jpeg_tree(tmp_path, shapes):
    """JPEG files of the given (h, w) with smooth content (so that decoders agree closely), and an index."""
    rng = np.random.default_rng(0)
    entries = []
    for i, (h, w) in enumerate(shapes):
        y, x = np.mgrid[0:h, 0:w]
        base = rng.random(3) * 255
        img = np.stack([(base[c] + 60 * np.sin(x / (7 + 3 * c)) + 40 * np.cos(y / 11)) for c in range(3)], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / f"{i}.jpg", quality=95)
        entries.append({"id": str(i), "image": f"{i}.jpg"})
    return {"root": str(tmp_path), "splits": {"train": entries}}


def pil_reference(path, size):
    """PIL's decode and its (antialiasing) bilinear resize, what the host path does."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)


def test_decode_resize_matches_pil_within_a_grey_level(tmp_path):
    """Images of three shapes in one batch (grouped by shape inside, returned in order), shrunk and enlarged."""
    index = jpeg_tree(tmp_path, [(48, 64), (30, 40), (48, 64), (20, 20)])
    paths = [tmp_path / e["image"] for e in index["splits"]["train"]]
    for size in (16, 40):
        out = decode_resize([read_bytes(p) for p in paths], size, "cpu")
        assert out.dtype == torch.uint8 and out.shape == (4, 3, size, size)
        ref = torch.stack([pil_reference(p, size) for p in paths])
        diff = (out.int() - ref.int()).abs().float()
        assert diff.mean() < 1.0, diff.mean()
        assert diff.max() <= 12, diff.max()
        # image i is image i: each matches its own reference far better than the others'
        for i in range(4):
            own = (out[i].int() - ref[i].int()).abs().float().mean()
            assert all(own < (out[i].int() - ref[j].int()).abs().float().mean() for j in range(4) if j != i
                       and not torch.equal(ref[i], ref[j]))


def test_split_dataset_device_decode_through_workers(tmp_path):
    """Workers return the bytes, the collate keeps them as a list, images_on decodes them at the dataset's size:
    the same images as decoding the files directly, and close to the host path's."""
    index = jpeg_tree(tmp_path, [(48, 64), (30, 40), (48, 64), (20, 20), (36, 36)])
    data = SplitDataset(index, "train", 24, decode="device", root=tmp_path)
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2, collate_fn=data.collate)
    batches = list(loader)
    assert [len(b["jpeg"]) for b in batches] == [3, 2]
    # arrays travel inside the batch's message; tensors would each take a shared-memory file descriptor
    assert all(type(j) is np.ndarray and j.dtype == np.uint8 for b in batches for j in b["jpeg"])
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(5))
    images = torch.cat([images_on(b, torch.device("cpu")) for b in batches])
    paths = [tmp_path / e["image"] for e in index["splits"]["train"]]
    assert torch.equal(images, decode_resize([read_bytes(p) for p in paths], 24, "cpu"))
    host = SplitDataset(index, "train", 24, root=tmp_path)
    host_images = torch.cat([images_on(b, "cpu") for b in torch.utils.data.DataLoader(host, batch_size=3,
                                                                                      collate_fn=host.collate)])
    assert host_images.shape == images.shape
    assert (images.int() - host_images.int()).abs().float().mean() < 1.0


def test_device_decode_refuses_other_files_naming_the_file(tmp_path):
    index = jpeg_tree(tmp_path, [(20, 20)])
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    index["splits"]["train"].append({"id": "x", "image": "x.png"})
    with pytest.raises(InputValueError, match=r"decode: device decodes JPEG files only, and .*x\.png is not one "
                                              r"\(use decode: host\)"):
        SplitDataset(index, "train", 16, decode="device", root=tmp_path)
    SplitDataset(index, "train", 16, root=tmp_path)  # the host path reads any image


def test_stages_with_device_decode(tmp_path, monkeypatch, stage_modules):  # noqa: F811
    """extract, pseudo and train with `decode: device` on a JPEG dataset (VOC tree) run end to end, and their
    images are the device-decoded ones: the pseudo stage's masks differ from a host-decoded run's."""
    decode = {"extract": {"decode": "device"}, "pseudo": {"decode": "device"}, "train": {"decode": "device"}}
    project, params, task = run_pipeline(tmp_path / "device", monkeypatch, stage_modules, "voc", 21, trees.make_voc,
                                         {}, decode)
    check_common_outputs(project, task)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["decode"] == "device"
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 100
    import h5py
    with h5py.File(project / "outputs" / "pseudo_masks.h5", "r") as h5:
        device_attention = h5["attention"][...]
    project_h, _, _ = run_pipeline(tmp_path / "host", monkeypatch, stage_modules, "voc", 21, trees.make_voc, {}, {})
    with h5py.File(project_h / "outputs" / "pseudo_masks.h5", "r") as h5:
        host_attention = h5["attention"][...]
    assert device_attention.shape == host_attention.shape
    assert not np.array_equal(device_attention, host_attention)
    assert np.abs(device_attention - host_attention).mean() < 0.1


def test_stage_with_device_decode_on_png_files_fails_in_one_line(tmp_path, monkeypatch, stage_modules, capsys):  # noqa: F811
    """A folder dataset holds PNG files: extract with decode: device stops before any forward, naming the
    parameter and a file."""
    with pytest.raises(SystemExit) as e:
        run_pipeline(tmp_path, monkeypatch, stage_modules, "folder", 4, trees.make_folder, {},
                     {"extract": {"decode": "device"}})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "decode: device decodes JPEG files only" in err and ".png is not one (use decode: host)" in err
