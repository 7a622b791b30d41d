"""The typed configuration (transfgu/config.py): params.yaml and classes.yaml are checked before any work, and a
bad value is one BadInput line naming the file, the key, what is valid and what was given."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

import dataset_trees as trees
from transfgu.config import Params, load_params, validate_params
from transfgu.data.tasks import resolve_task
from transfgu.errors import BadInput, InputFileNotFound, InputValueError

REPO = Path(__file__).resolve().parent.parent
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())
DELETE = object()


def edited(**changes) -> dict:
    """The default params with keys set, a__b for a.b (value DELETE removes the key)."""
    params = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        node = params
        for k in path:
            node = node[k]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return params


def test_the_default_params_pass_with_the_defaults_of_the_code():
    params = validate_params(DEFAULT)
    assert isinstance(params, Params) and params.path == Path("params.yaml")
    assert params.task.n_concepts == params.granularity == 6 and params.things_only is False
    assert params.value("dataset.name") == "synthetic" and params.value("backbone")["arch"] == "vit_mini"
    assert "path" not in params.model_dump()
    bare = validate_params(edited(launcher=DELETE, pseudo__precision=DELETE, cluster__nredo=DELETE,
                                  extract__decode=DELETE, train__num_workers=DELETE, dataset__skip_bad=DELETE))
    assert bare.pseudo.precision == "fp32" and bare.extract.precision == "auto" and bare.cluster.nredo == 1
    assert bare.extract.decode == "host" and bare.train.num_workers == "auto" and bare.dataset.skip_bad is False
    assert bare.launcher.nproc_per_node == 1 and bare.launcher.rdzv_id == "transfgu"


@pytest.mark.parametrize("changes, message", [
    ({"train__epoch": 12}, r"^params.yaml: unknown key train.epoch: did you mean train.epochs\?$"),
    ({"train__epochs": DELETE, "train__epoch": 12}, r"unknown key train.epoch: did you mean train.epochs\?"),
    ({"dataset__thing_only": True}, r"unknown key dataset.thing_only: did you mean dataset.things_only\?"),
    ({"evaluate__lr": 0.1}, r"unknown key evaluate.lr: did you mean train.lr\?"),
    ({"optimizer": {"lr": 1}}, r"unknown key optimizer"),
    ({"train__lr": DELETE}, r"^params.yaml: missing key train.lr: expected a number > 0$"),
    ({"dataset__synthetic": {"n_trian": 3, "n_val": 2, "size": 32}},
     r"^params.yaml: unknown key dataset.synthetic.n_trian: did you mean dataset.synthetic.n_train\?$"),
    ({"dataset__synthetic": {"n_train": 3, "size": 32}},
     r"^params.yaml: missing key dataset.synthetic.n_val: expected an integer >= 1$"),
    ({"cluster": DELETE}, r"^params.yaml: missing section cluster \(keys: niter, nredo, backend\)$"),
    ({"train__epochs": "12"}, r"^params.yaml: train.epochs: expected an integer >= 1, got '12'$"),
    ({"train__epochs": 0}, r"train.epochs: expected an integer >= 1, got 0"),
    ({"train__epochs": True}, r"train.epochs: expected an integer >= 1, got True"),
    ({"train__lr": True}, r"train.lr: expected a number > 0, got True"),
    ({"pseudo__mass": 1.5}, r"pseudo.mass: expected a number > 0 and <= 1, got 1.5"),
    ({"train__loss_weights": [1, 0.3]}, r"train.loss_weights: expected a list of 3 numbers \(>= 0\), got \[1, 0.3\]"),
    ({"train__loss_weights": [1, -1, 1]}, r"train.loss_weights: expected a list of 3 numbers \(>= 0\), got \[1, -1"),
    ({"train__select_by": "best"}, r"train.select_by: expected one of val, last, got 'best'"),
    ({"extract__precision": "half"}, r"extract.precision: expected one of auto, fp32, bf16, got 'half'"),
    ({"cluster__backend": "gpu"}, r"cluster.backend: expected one of auto, faiss, torch, got 'gpu'"),
    ({"backbone__arch": "vit_huge"}, r"backbone.arch: expected one of vit_mini, vit_tiny, vit_small, vit_base"),
    ({"dataset__name": "imagenet"}, r"dataset.name: expected one of synthetic, synthetic-things, cocostuff"),
    ({"dataset__image_list": {"train": None, "test": "x.txt"}}, r"dataset.image_list: expected null or a string"),
    ({"dataset__image_list": "curated"}, r"dataset.image_list: 'curated' is not a list set shipped for dataset "
                                         r"'synthetic'"),
    ({"dataset__synthetic": DELETE}, r"missing section dataset.synthetic \(keys: n_train, n_val, size\), needed"),
    ({"dataset__R": 60}, r"^params.yaml: dataset.R: expected a multiple of the patch size 8 \(vit_mini\), e.g. 56 "
                         r"or 64, got 60$"),
    ({"backbone__arch": "vit_small_patch14_reg4_dinov2"},
     r"^params.yaml: backbone.patch_size: vit_small_patch14_reg4_dinov2 has 14-pixel patches, got 8: set "
     r"backbone.patch_size to 14 or null$"),
    ({"backbone__arch": "vit_small", "backbone__patch_size": None},
     r"^params.yaml: backbone.patch_size: vit_small \(DINO\) has 8- or 16-pixel patches, set 8 or 16, got None$"),
    ({"backbone__arch": "dinov2_vits14", "backbone__patch_size": None},
     r"^params.yaml: dataset.R: expected a multiple of the patch size 14 \(dinov2_vits14\), e.g. 56 or 70, got 64$"),
    ({"backbone__arch": "vit_small_patch16_dinov3", "backbone__patch_size": 14},
     r"backbone.patch_size: vit_small_patch16_dinov3 has 16-pixel patches, got 14"),
    ({"granularity": 7}, r"^params.yaml: granularity: 7 is not valid for dataset 'synthetic'"),
    ({"train__num_workers": -1}, r"train.num_workers: expected one of auto or an integer >= 0, got -1"),
    ({"extract__window_sizes": []}, r"extract.window_sizes: expected one of auto or a non-empty list of numbers "
                                    r"\(> 0 and <= 1\), got \[\]"),
    ({"train": 3}, r"params.yaml: train must be a mapping of keys \(epochs, batch_size, .*\), got 3"),
    ({"backbone__checkpoint": "weight/dino/nope.pth"},
     r"backbone.checkpoint: weight/dino/nope.pth does not exist \(docs/usage.md, 'Backbone weights'\)"),
])
def test_bad_params_are_one_line_naming_the_key(changes, message):
    with pytest.raises(BadInput, match=message) as e:
        validate_params(edited(**changes))
    assert "\n" not in str(e.value)


def test_the_file_must_be_a_mapping():
    with pytest.raises(InputValueError, match=r"^my.yaml: the file must be a mapping of keys, got \[1\]$"):
        validate_params([1], "my.yaml")


def test_a_folder_root_that_does_not_exist_comes_before_the_granularity(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputFileNotFound, match=rf"^params.yaml: dataset.root: {missing} is not a folder"):
        validate_params(edited(dataset__name="folder", dataset__root=str(missing), granularity=99))
    root = trees.make_folder(tmp_path / "folder", labels=False)
    with pytest.raises(InputValueError, match=r"params.yaml: granularity / dataset.n_things"):
        validate_params(edited(dataset__name="folder", dataset__root=str(root)))
    params = validate_params(edited(dataset__name="folder", dataset__root=str(root), dataset__n_things=2))
    assert (params.task.n_things, params.task.n_stuff) == (2, 4)


def test_split_sizes_against_the_training_batch():
    index = {"splits": {"train": [{}] * 10, "val": [{}] * 3}}
    validate_params(edited(train__batch_size=10)).check_index(index)
    with pytest.raises(InputValueError, match=r"^params.yaml: train.batch_size 11 is larger than the 10 train "
                                              r"images: use at most 10$"):
        validate_params(edited(train__batch_size=11)).check_index(index)
    with pytest.raises(InputValueError, match=r"train.batch_size 9 is not divisible by the 2 processes"):
        validate_params(edited(train__batch_size=9, launcher__nproc_per_node=2)).check_index(index)
    with pytest.raises(InputValueError, match=r"train.batch_size 9 is not divisible by the 4 processes"):
        validate_params(edited(train__batch_size=9)).check_index(index, world_size=4)


@pytest.mark.parametrize("text, message", [
    ("classes: [{name: a, thing: true}, {name: b, thing: false}]\n", r"class 0 \(a\): unknown key 'thing' "
     r"\(valid: name, kind; did you mean kind\?\)"),
    ("classes: [{name: a, kind: thing}, {name: b}]\n", r"class 1 \(b\): missing key 'kind'"),
    ("classes: [{name: a, kind: thing}, {name: b, kind: sky}]\n", r"class 1 \(b\): kind: expected one of thing, "
     r"stuff, background, got 'sky'"),
    ("classes: [{name: a, kind: thing}]\nnames: [a]\n", r"unknown key\(s\) \['names'\]"),
    ("classes: {a: thing}\n", r"expected `classes: \["),
    ("classes: [a, b]\n", r"class 0 is 'a'"),
    ("classes: [{name: a, kind: background}, {name: b, kind: stuff}]\n", r"at most one background class and then "
     r"no stuff classes; got \['background', 'stuff'\]"),
    ("classes: [{name: a, kind: thing\n", r"not valid YAML"),
])
def test_bad_classes_yaml_is_one_line(tmp_path, text, message):
    root = trees.make_folder(tmp_path / "folder")
    (root / "classes.yaml").write_text(text)
    with pytest.raises(BadInput, match=message) as e:
        resolve_task(trees.dataset_cfg("folder", root), 2)
    assert str(e.value).startswith(str(root / "classes.yaml") + ": ") and "\n" not in str(e.value)
    with pytest.raises(BadInput, match=message) as e:  # through params.yaml: no "params.yaml:" in front
        validate_params(edited(dataset__name="folder", dataset__root=str(root), granularity=2))
    assert str(e.value).startswith(str(root / "classes.yaml") + ": ")


def test_load_params_reads_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULT))
    first = load_params(path)
    assert load_params(path) is first and first.path == path
    monkeypatch.chdir(tmp_path)
    assert load_params() is first  # params.yaml of the working directory, the same file
    monkeypatch.setenv("TRANSFGU_PARAMS", str(path))
    assert load_params() is first
    path.write_text(yaml.safe_dump(edited(seed=3)))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    assert load_params(path).seed == 3


def test_load_params_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputFileNotFound, match=rf"^{tmp_path / 'nope.yaml'} not found: run the stages from the "
                                                rf"project root$"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\nseed: 0\n")
    with pytest.raises(InputValueError, match=rf"^{bad}: not valid YAML \(") as e:
        load_params(bad)
    assert "\n" not in str(e.value)
