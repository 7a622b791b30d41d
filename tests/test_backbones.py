"""DINOv2 (with and without registers) and DINOv3 backbones: official-layout files load strictly, the project's
forward and [CLS] attention equal timm's own model loaded through timm's checkpoint filter, the registers stay
out of the maps, the pseudo masks equal the per-concept autograd loop with registers present, DINOv2's position
resampling is the official one, and the one-line errors.

The small networks are the same timm classes and code paths as the published ones (timm's model of that name with
a smaller width and depth); the published sizes are checked in the slow tests."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from official_checkpoints import dinov2_state_dict, dinov3_state_dict
from reference import reference_pseudo_masks
from transfgu.errors import InputFileNotFound, InputValueError
from transfgu.models import archs
from transfgu.models.archs import ARCHS, ViTArch
from transfgu.models.decoder import build_decoder
from transfgu.models.vit import DinoViT, build_backbone, load_dino_checkpoint
from transfgu.pseudo import pseudo_masks
from transfgu.segmenter import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(embed_dim=32, depth=2, num_heads=2)
# test arch -> (timm name, family, registers, patch); each is timm's model of that name at the SMALL size
TINY = {
    "t_dinov2": ("vit_small_patch14_dinov2", archs.DINOV2, 0, 14),
    "t_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", archs.DINOV2, 4, 14),
    "t_dinov3": ("vit_small_patch16_dinov3", archs.DINOV3, 4, 16),
    "t_dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", archs.DINOV3, 4, 16),
}


@pytest.fixture(autouse=True)
def tiny_archs(monkeypatch):
    for name, (timm_name, family, registers, patch) in TINY.items():
        monkeypatch.setitem(ARCHS, name, ViTArch(**SMALL, family=family, patch_size=patch, timm_name=timm_name,
                                                 overrides=dict(SMALL), registers=registers))


def official_file(tmp_path, arch: str, seed: int = 0, **kw):
    timm_name, family, registers, patch = TINY[arch]
    if family == archs.DINOV2:
        sd = dinov2_state_dict(SMALL["embed_dim"], SMALL["depth"], registers, seed=seed, **kw)
    else:
        sd = dinov3_state_dict(SMALL["embed_dim"], SMALL["depth"], SMALL["num_heads"],
                               qkv_bias=timm_name.endswith("qkvb"), seed=seed, **kw)
    path = tmp_path / f"{arch}.pth"
    torch.save(sd, path)
    return path, sd


def timm_reference(arch: str, path, **overrides):
    """timm's own model of that name (SMALL size for the test archs), the file loaded through timm's checkpoint
    filter, strict."""
    timm_name, family = ARCHS[arch].timm_name, ARCHS[arch].family
    if arch in TINY:
        overrides = {**SMALL, **overrides}
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **overrides)
    if family == archs.DINOV2:
        from timm.models.vision_transformer import checkpoint_filter_fn
    else:
        from timm.models.eva import checkpoint_filter_fn
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    return model.eval()


def timm_attention(model, x) -> torch.Tensor:
    """The last block's full attention matrix (B, heads, N, N) as timm's own block computes it (unfused path,
    captured at its attention dropout), and timm's final tokens."""
    blk = model.blocks[-1]
    captured = {}
    fused, blk.attn.fused_attn = blk.attn.fused_attn, False
    hook = blk.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))
    try:
        with torch.no_grad():
            tokens = model.forward_features(x)
    finally:
        hook.remove()
        blk.attn.fused_attn = fused
    return captured["A"], tokens


# -- loading and the forward against timm ---------------------------------------------------------------------
@pytest.mark.parametrize("arch, size", [("t_dinov2", (518, 518)), ("t_reg4_dinov2", (518, 518)),
                                        ("t_dinov3", (96, 64)), ("t_dinov3_qkvb", (64, 80))])
def test_official_file_loads_strictly_and_forward_equals_timm(tmp_path, arch, size):
    """A random file in the official layout loads (strict); all final tokens and the last block's [CLS]
    attention row equal timm's model of that name loaded through timm's filter from the same file, to 1e-5 in
    float32 (DINOv2 at its 518-px grid, where no resampling happens; DINOv3 at any size: RoPE)."""
    path, sd = official_file(tmp_path, arch)
    model = build_backbone(arch, None, path, seed=3)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    ref = timm_reference(arch, path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    A, ref_tokens = timm_attention(ref, x)
    with torch.no_grad():
        tokens = model.forward_all(x)
        attn_cls, _ = model.last_block_attention(model.trunk(x), model.grid(x))
        cls_map = model.cls_attention(x)
        out = model(x)
    n = model.num_prefix_tokens
    assert n == 1 + TINY[arch][2]
    hw = (size[0] // model.patch_size) * (size[1] // model.patch_size)
    assert tokens.shape == ref_tokens.shape == (2, n + hw, 32)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn_cls, A[:, :, 0], atol=1e-5, rtol=0)
    # what the pipeline reads: [CLS] + patches, the registers left out, and the attention over the patches only
    torch.testing.assert_close(out, torch.cat([ref_tokens[:, :1], ref_tokens[:, n:]], 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_map, A[:, :, 0, n:].mean(1), atol=1e-5, rtol=0)
    if n > 1:  # the registers take a share of the attention, which the patch map leaves out
        share = A[:, :, 0, 1:n].sum(-1).mean(1)
        assert (share > 1e-3).all(), share
        torch.testing.assert_close(cls_map.sum(-1), 1 - A[:, :, 0, :n].sum(-1).mean(1), atol=1e-6, rtol=0)
    # and the weights really are the file's (not the random start): the patch embedding, e.g.
    assert torch.equal(model.vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


@pytest.mark.parametrize("arch", ["t_dinov2", "t_reg4_dinov2"])
def test_dinov2_positions_resampled_as_the_official_code(tmp_path, arch):
    """Off the 37 x 37 grid the position embedding is resampled as facebookresearch/dinov2's
    interpolate_pos_encoding does with its hub models' settings, written here from that code: without registers
    interpolate_offset 0.1, interpolate_antialias False (bicubic, scale factor (grid + 0.1) / 37); with registers
    (dinov2_vits14_reg ...) interpolate_offset 0, interpolate_antialias True (bicubic to the size, antialiased);
    [CLS] position untouched. timm's dynamic_img_size resampling is the second everywhere: equal for the register
    models, other positions for the plain ones."""
    path, sd = official_file(tmp_path, arch)
    model = build_backbone(arch, None, path)
    x = torch.randn(1, 3, 14 * 6, 14 * 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = model.tokens(x)
        patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    patches = patches.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    registers = "register_tokens" in sd
    if registers:
        grid = F.interpolate(grid, size=(6, 5), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((6 + 0.1) / 37, (5 + 0.1) / 37), mode="bicubic", antialias=False)
    official = torch.cat([sd["cls_token"] + pos[:, :1], *([sd["register_tokens"]] if registers else []),
                          patches + grid.flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(t, official, atol=1e-5, rtol=0)
    dynamic = timm.create_model(TINY[arch][0], pretrained=False, num_classes=0, dynamic_img_size=True, **SMALL)
    from timm.models.vision_transformer import checkpoint_filter_fn
    dynamic.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True), dynamic), strict=True)
    with torch.no_grad():
        timm_tokens = dynamic.norm_pre(dynamic._pos_embed(dynamic.patch_embed(x)))
    if registers:
        torch.testing.assert_close(timm_tokens, t, atol=1e-5, rtol=0)
    else:
        assert (timm_tokens - t).abs().max() > 1e-2


# -- the method with registers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["t_reg4_dinov2", "t_dinov3", "t_dinov3_qkvb"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pseudo_masks_equal_per_concept_loop_with_registers(tmp_path, arch, dtype):
    """The batched gradient (one vjp, vmapped over the concepts) equals the per-concept autograd loop on timm's own
    last block (benchmarks/reference.py) with the registers in the attention, on a non-square image."""
    path, _ = official_file(tmp_path, arch)
    model = build_backbone(arch, None, path).to(dtype)
    p = model.patch_size
    g = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, 4 * p, 3 * p, generator=g, dtype=dtype)
    with torch.no_grad():
        feats = model(images)[:, 0]
    centroids = feats[torch.arange(6) % 3] + 0.3 * torch.randn(6, 32, generator=g, dtype=dtype)
    fast = pseudo_masks(model, images, centroids, grad_scale=1 / 3)
    ref = reference_pseudo_masks(model, images, centroids)
    assert fast.shape == (3, 6, 4, 3)
    assert (ref > 0).any() and (ref == 0).any()
    assert (ref.std(1) > 1e-3).any()  # the concepts' maps differ
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, R", [("vit_mini_reg4_dinov2", 56), ("vit_mini_dinov3", 64)])
def test_segmenter_shapes_on_the_patch_grid(arch, R):
    """The decoder takes the patch tokens (no registers) of the patch-14 / patch-16 grid."""
    backbone = build_backbone(arch, None, None)
    decoder = build_decoder(6, backbone.embed_dim).eval()
    images = torch.rand(2, 3, R, R)
    logits, _ = Segmenter(backbone, decoder)(images)
    assert logits.shape == (2, 6, R // backbone.patch_size, R // backbone.patch_size)
    assert Segmenter(backbone, decoder).predict(images).shape == (2, R, R)


def test_random_backbones_have_unit_layer_scales():
    """Without a checkpoint, DINOv2 / DINOv3 layer scales are 1 (timm starts them at 1e-5: nearly the identity)."""
    for arch, key in (("vit_mini_reg4_dinov2", "blocks.0.ls1.gamma"), ("vit_mini_dinov3", "blocks.3.gamma_2")):
        sd = build_backbone(arch, None, None).vit.state_dict()
        assert torch.equal(sd[key], torch.ones(192))
    assert build_backbone("vit_mini_dinov3", None, None, seed=1).vit.cls_token.ne(
        build_backbone("vit_mini_dinov3", None, None, seed=2).vit.cls_token).any()


# -- errors ------------------------------------------------------------------------------------------------------
def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("arch, words", [
    ("vit_small_patch14_reg4_dinov2", ["dinov2_vits14_reg4_pretrain.pth", "dl.fbaipublicfiles.com/dinov2/"]),
    ("dinov2_vitb14", ["dinov2_vitb14_pretrain.pth", "Apache-2.0"]),
    ("vit_small_patch16_dinov3", ["dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "DINOv3 License"]),
])
def test_missing_file_names_the_official_file(tmp_path, arch, words):
    model = DinoViT.__new__(DinoViT)  # the message needs the arch only: no network built
    torch.nn.Module.__init__(model)
    model.arch, model.spec, model.family, model.patch_size = arch, ARCHS[arch], ARCHS[arch].family, None
    with pytest.raises(InputFileNotFound) as err:
        load_dino_checkpoint(model, tmp_path / "nope.pth")
    message = _one_line(err)
    assert str(tmp_path / "nope.pth") in message and all(w in message for w in words), message


@pytest.mark.parametrize("arch, edit, words", [
    ("t_dinov2", lambda sd: sd.pop("blocks.1.ls2.gamma"), ["missing keys ['blocks.1.ls2.gamma']"]),
    ("t_reg4_dinov2", lambda sd: sd.pop("register_tokens"), ["missing keys ['register_tokens']"]),
    ("t_dinov2", lambda sd: sd.__setitem__("register_tokens", torch.zeros(1, 4, 32)),
     ["unexpected keys ['register_tokens']"]),
    ("t_dinov2", lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 1 + 16 * 16, 32)),
     ["wrong shapes [('pos_embed', (1, 257, 32), (1, 1370, 32))]"]),
    ("t_dinov3", lambda sd: sd.pop("storage_tokens"), ["missing keys ['storage_tokens']"]),
    ("t_dinov3", lambda sd: sd.__setitem__("blocks.0.attn.qkv.bias", torch.ones(96)),
     ["blocks.0.attn.qkv.bias has non-zero q / v biases", "use vit_small_patch16_dinov3_qkvb"]),
    ("t_dinov3", lambda sd: sd.__setitem__("blocks.1.attn.qkv.bias_mask", torch.ones(96)),
     ["blocks.1.attn.qkv.bias_mask is not 1 on q and v, 0 on k"]),
    ("t_dinov3", lambda sd: sd.__setitem__("rope_embed.periods", sd["rope_embed.periods"] * 2),
     ["rope_embed.periods", "not this arch's RoPE periods"]),
])
def test_wrong_file_is_one_line_error(tmp_path, arch, edit, words):
    """A missing key, an extra one, a wrong shape, a qkv bias the arch has not, a bias mask or RoPE periods of
    another network: one line naming the file, the arch and the key (before timm's filter could resample or drop)."""
    path, sd = official_file(tmp_path, arch)
    edit(sd)
    torch.save(sd, path)
    model = DinoViT(arch, None)
    with pytest.raises(InputValueError) as err:
        load_dino_checkpoint(model, path)
    message = _one_line(err)
    assert message.startswith(f"{path}: does not match backbone {arch}/")
    assert all(w in message for w in words), message


def test_file_of_another_family_is_one_line_error(tmp_path):
    """A DINOv3 file for a DINOv2 arch, a DINOv2 file for a DINOv3 arch, a DINO (v1) file for a DINOv2 arch."""
    v3, _ = official_file(tmp_path, "t_dinov3")
    v2, _ = official_file(tmp_path, "t_reg4_dinov2")
    v1 = tmp_path / "v1.pth"
    torch.save(build_backbone("vit_mini", 8, None).vit.state_dict(), v1)
    for arch, path, key in (("t_reg4_dinov2", v3, "pos_embed"), ("t_dinov3", v2, "storage_tokens"),
                            ("vit_mini_reg4_dinov2", v1, "blocks.0.ls1.gamma")):
        with pytest.raises(InputValueError) as err:
            load_dino_checkpoint(DinoViT(arch, None), path)
        assert key in _one_line(err) and str(path) in str(err.value)


def test_timm_layout_file_loads_too(tmp_path):
    """A file in timm's own layout (timm's state dict of the same network) loads strictly as it is."""
    path, _ = official_file(tmp_path, "t_dinov3")
    ref = timm_reference("t_dinov3", path)
    timm_path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), timm_path)
    model = build_backbone("t_dinov3", 16, timm_path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.vit.state_dict()[k], v), k


def test_aliases_name_the_same_networks():
    assert ARCHS["dinov2_vits14_reg4"] is ARCHS["vit_small_patch14_reg4_dinov2"]
    assert ARCHS["dinov3_vitb16"] is ARCHS["vit_base_patch16_dinov3"]
    assert {a.patch_size for n, a in ARCHS.items() if a.family == archs.DINOV2} == {14}
    assert all(timm.is_model(a.timm_name) for a in ARCHS.values() if a.timm_name)


# -- the published sizes -----------------------------------------------------------------------------------------
PUBLISHED = [
    ("vit_small_patch14_dinov2", lambda: dinov2_state_dict(384, 12)),
    ("vit_small_patch14_reg4_dinov2", lambda: dinov2_state_dict(384, 12, registers=4)),
    ("vit_small_patch16_dinov3", lambda: dinov3_state_dict(384, 12, 6)),
    ("vit_base_patch14_dinov2", lambda: dinov2_state_dict(768, 12)),
    ("vit_base_patch14_reg4_dinov2", lambda: dinov2_state_dict(768, 12, registers=4)),
    ("vit_base_patch16_dinov3", lambda: dinov3_state_dict(768, 12, 12)),
    ("vit_base_patch16_dinov3_qkvb", lambda: dinov3_state_dict(768, 12, 12, qkv_bias=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch, make", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_sizes_load_and_equal_timm(tmp_path, arch, make):
    """The published ViT-S and ViT-B: an official-layout file loads strictly, and the forward and [CLS] attention
    equal timm's model of that name through timm's filter (DINOv2 at its 518-px grid, DINOv3 at 224 x 160)."""
    path = tmp_path / "w.pth"
    torch.save(make(), path)
    model = build_backbone(arch, None, path)
    ref = timm_reference(arch, path)
    size = (518, 518) if ARCHS[arch].family == archs.DINOV2 else (224, 160)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    A, ref_tokens = timm_attention(ref, x)
    with torch.no_grad():
        tokens = model.forward_all(x)
        attn_cls, _ = model.last_block_attention(model.trunk(x), model.grid(x))
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn_cls, A[:, :, 0], atol=1e-5, rtol=0)
    assert math.isclose(attn_cls.sum(-1).mean().item(), 1.0, rel_tol=1e-5)


# -- the DAG -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, R", [("vit_mini_reg4_dinov2", 56), ("vit_mini_dinov3", 64)])
def test_pipeline_runs_on_the_new_backbones(tmp_path, monkeypatch, arch, R):
    """The six stages in-process on a small synthetic set with a random DINOv2-with-registers / DINOv3 backbone,
    as `dvc exp run -S backbone.arch=... -S backbone.patch_size=null -S dataset.R=...` runs them."""
    import json
    import shutil

    import h5py
    import yaml

    from tiny_project import REPO, default_params, run_stage_here

    monkeypatch.delenv("TRANSFGU_PARAMS", raising=False)
    params = default_params({
        "dataset": {"root": str(tmp_path / "data"), "R": R, "synthetic": {"n_train": 8, "n_val": 4, "size": 2 * R}},
        "backbone": {"arch": arch, "patch_size": None, "checkpoint": None},
        "extract": {"batch_size": 4, "crop_batch": 64}, "cluster": {"niter": 10}, "pseudo": {"batch_size": 4},
        "train": {"epochs": 2, "batch_size": 4, "bootstrap_start": 1, "bootstrap_intervals": [1]},
        "evaluate": {"batch_size": 4, "n_pictures": 1}})
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    monkeypatch.chdir(project)
    for stage in ("prepare", "extract", "cluster", "pseudo", "train", "evaluate"):
        run_stage_here(stage)
    out = project / "outputs"
    p = ARCHS[arch].patch_size
    with h5py.File(out / "feature_bank.h5", "r") as h5:
        assert h5.attrs["patch_size"] == p and h5["thing/features"].shape[1] == 192
    with h5py.File(out / "pseudo_masks.h5", "r") as h5:
        assert h5["gradient"].shape[1:] == (6, R // p, R // p)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 100


def test_predict_takes_the_arch_own_patch(tmp_path):
    """`transfgu predict --arch vit_mini_dinov3` with a params.yaml of a patch-8 DINO backbone: the DINOv3 arch's
    16-pixel patches (params' patch_size is DINO's), the labels equal the Segmenter's on that backbone."""
    import numpy as np
    from PIL import Image

    from tiny_project import predict_files
    from transfgu.cli import main
    from transfgu.data.images import load_rgb

    predict_files(tmp_path)  # params.yaml: vit_mini / 8, R = 32; decoder.pt: 6 classes of width 192
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    main(["predict", str(tmp_path / "a.png"), "--decoder", str(tmp_path / "decoder.pt"), "--params",
          str(tmp_path / "params.yaml"), "--arch", "vit_mini_dinov3", "--out", str(tmp_path / "out")])
    backbone = build_backbone("vit_mini_dinov3", None, None, seed=0)
    decoder = build_decoder(6, 192)
    decoder.load_state_dict(torch.load(tmp_path / "decoder.pt", weights_only=True))
    x = load_rgb(tmp_path / "a.png", 32)[None].float() / 255
    with torch.no_grad():
        logits, _ = decoder.eval()(backbone(backbone.normalize(x))[:, 1:], (2, 2))
    expected = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a_label.png")), expected)
