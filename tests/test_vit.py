import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from transfgu.models.vit import build_backbone, interpolate_pos_embed, load_dino_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def bicubic_matrix(n_in: int, n_out: int, scale_factor: float, A: float = -0.75) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch-style bicubic resampling (Keys kernel, A=-0.75, align_corners=False,
    source x = (i + 0.5) / scale_factor - 0.5, border indices clamped), written from the formula."""
    def k(d):
        d = abs(d)
        if d <= 1:
            return ((A + 2) * d - (A + 3)) * d * d + 1
        if d < 2:
            return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A
        return 0.0

    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = (i + 0.5) / scale_factor - 0.5
        x0 = math.floor(x)
        t = x - x0
        for j, d in zip(range(x0 - 1, x0 + 3), (t + 1, t, 1 - t, 2 - t)):
            M[i, min(max(j, 0), n_in - 1)] += k(d)
    return M


def test_forward_equals_timm_forward_features_at_native_size(tiny_backbone):
    """At 224 px (the 28x28 grid of the embedding) forward() is timm's own forward_features."""
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        ours = tiny_backbone(x)
        ref = tiny_backbone.vit.forward_features(x)
    assert ours.shape == (1, 1 + 28 * 28, 192)
    assert torch.allclose(ours, ref, atol=1e-10)


def test_cls_attention_matches_manual_attention(tiny_backbone):
    """The (B, hw) map equals softmax(q k^T * scale) of the last block, computed by hand from its
    LayerNorm'd input (captured by a hook during the plain forward), [CLS] row, patch columns, mean over heads."""
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    blk = tiny_backbone.vit.blocks[-1]
    captured = {}
    hook = blk.attn.register_forward_hook(lambda m, inp, out: captured.__setitem__("x", inp[0]))
    try:
        with torch.no_grad():
            tiny_backbone(x)
    finally:
        hook.remove()
    with torch.no_grad():
        attn = tiny_backbone.cls_attention(x)

    h = captured["x"]  # (B, N, D), input of the last attention
    B, N, D = h.shape
    H = tiny_backbone.num_heads
    hd = D // H
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k = qkv[..., :D], qkv[..., D:2 * D]
    manual = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        for head in range(H):
            qh = q[b, 0, head * hd:(head + 1) * hd]
            kh = k[b, :, head * hd:(head + 1) * hd]
            logits = (kh @ qh) / math.sqrt(hd)
            w = torch.exp(logits - logits.max())
            manual[b] += (w / w.sum())[1:] / H
    assert attn.shape == (2, 6 * 5)
    assert torch.allclose(attn, manual, atol=1e-10)


def test_cls_from_attention_reproduces_final_cls(tiny_backbone):
    """cls_from_attention(*last_block_inputs(x)) is the final normed [CLS] token of forward(x)."""
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        ref = tiny_backbone(x)[:, 0]
        got = tiny_backbone.cls_from_attention(*tiny_backbone.last_block_inputs(x))
    assert got.shape == (2, 192)
    assert torch.allclose(got, ref, atol=1e-10)


def test_interpolate_pos_embed_native_grid_unchanged(tiny_backbone):
    """At 28x28 the embedding is returned as is."""
    pe = tiny_backbone.vit.pos_embed
    assert torch.equal(interpolate_pos_embed(pe, 28, 28), pe)


def test_interpolate_pos_embed_is_dino_bicubic():
    """At 40x40 the patch part is bicubic with scale ((40+0.1)/28) per axis, align_corners=False: equal to
    that F.interpolate call and to a bicubic written from the formula; [CLS] position untouched;
    and measurably different from timm's resample_abs_pos_embed (antialiased, other positions)."""
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 28 * 28, 16, generator=g, dtype=torch.float64)
    got = interpolate_pos_embed(pe, 40, 40)
    assert got.shape == (1, 1 + 40 * 40, 16)
    assert torch.equal(got[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 28, 28, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=((40 + 0.1) / 28,) * 2, mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 1600, 16)
    assert torch.allclose(got[:, 1:], ref, atol=1e-10)
    M = bicubic_matrix(28, 40, (40 + 0.1) / 28)
    manual = torch.einsum("ij,cjk,lk->cil", M, grid[0], M).permute(1, 2, 0).reshape(1, 1600, 16)
    assert torch.allclose(got[:, 1:], manual, atol=1e-10)
    timm = resample_abs_pos_embed(pe, (40, 40), num_prefix_tokens=1)
    assert (timm[:, 1:] - got[:, 1:]).abs().max() > 1e-2


def test_tokens_use_dino_resampling(tiny_backbone):
    """At 320 px (40x40 grid) tokens() adds the DINO-resampled embedding: tokens minus the plain patch
    embedding equal the hand-made bicubic resampling (not timm's)."""
    x = torch.randn(1, 3, 320, 320, dtype=torch.float64)
    vit = tiny_backbone.vit
    with torch.no_grad():
        t = tiny_backbone.tokens(x)
        patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    pe = vit.pos_embed
    grid = pe[:, 1:].reshape(1, 28, 28, -1).permute(0, 3, 1, 2)[0]
    M = bicubic_matrix(28, 40, (40 + 0.1) / 28)
    manual = torch.einsum("ij,cjk,lk->cil", M, grid, M).permute(1, 2, 0).reshape(1, 1600, -1)
    assert torch.allclose(t[:, 0], vit.cls_token[:, 0] + pe[:, 0], atol=1e-12)
    assert torch.allclose(t[:, 1:] - patches, manual, atol=1e-10)
    timm = resample_abs_pos_embed(pe, (40, 40), num_prefix_tokens=1)[:, 1:]
    assert not torch.allclose(t[:, 1:] - patches, timm, atol=1e-5)


# -- checkpoints ---------------------------------------------------------------------------------------
def _source_state():
    return build_backbone("vit_mini", 8, checkpoint=None, seed=11).vit.state_dict()


def _variants(sd):
    head = {"head.mlp.0.weight": torch.randn(4, 192), "head.last_layer.weight_g": torch.ones(1, 4)}
    return {
        "plain": dict(sd),
        "teacher": {"teacher": dict(sd), "epoch": 3},
        "module": {"module." + k: v for k, v in sd.items()},
        "backbone_head": {**{"backbone." + k: v for k, v in sd.items()}, **head},
        "teacher_module_backbone_head": {
            "teacher": {**{"module.backbone." + k: v for k, v in sd.items()},
                        **{"module." + k: v for k, v in head.items()}},
            "args": argparse.Namespace(arch="vit_mini")},  # not loadable with weights_only=True
    }


@pytest.mark.parametrize("variant", ["plain", "teacher", "module", "backbone_head", "teacher_module_backbone_head"])
def test_load_dino_checkpoint_variants(tmp_path, variant):
    """Plain, teacher-wrapped, module./backbone.-prefixed files with DINO head keys all load, giving
    exactly the source weights (the target starts from other random weights)."""
    sd = _source_state()
    path = tmp_path / f"{variant}.pth"
    torch.save(_variants(sd)[variant], path)
    model = build_backbone("vit_mini", 8, checkpoint=None, seed=12)
    assert not torch.equal(model.vit.pos_embed, sd["pos_embed"])
    load_dino_checkpoint(model, path)
    got = model.vit.state_dict()
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    # build_backbone with the checkpoint gives the same weights, frozen, in eval mode
    model2 = build_backbone("vit_mini", 8, checkpoint=path, seed=13)
    assert not model2.training
    assert all(not p.requires_grad for p in model2.parameters())
    for k, v in model2.vit.state_dict().items():
        assert torch.equal(v, sd[k]), k


class _Marker:
    """A pickled object that is neither a tensor nor plain data."""


def test_load_dino_checkpoint_with_other_objects_is_one_line_error(tmp_path):
    """A file holding other pickled objects is not unpickled (weights_only): an InputValueError naming the file,
    the object's class and how to convert the file; argparse.Namespace (DINO's full checkpoints) is allowed."""
    from transfgu.errors import InputValueError
    path = tmp_path / "odd.pth"
    torch.save({"teacher": dict(_source_state()), "extra": _Marker()}, path)
    model = build_backbone("vit_mini", 8, checkpoint=None)
    with pytest.raises(InputValueError) as err:
        load_dino_checkpoint(model, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "_Marker" in message
    assert "pickled objects other than tensors" in message and "weights_only=False" in message


def test_load_dino_checkpoint_missing_file(tmp_path):
    """A missing file is a FileNotFoundError naming the path and where DINO weights are published."""
    path = tmp_path / "weight" / "dino" / "dino_deitsmall8_pretrain.pth"
    model = build_backbone("vit_mini", 8, checkpoint=None)
    with pytest.raises(FileNotFoundError) as err:
        load_dino_checkpoint(model, path)
    assert str(path) in str(err.value)
    assert "dl.fbaipublicfiles.com/dino" in str(err.value)


@pytest.mark.parametrize("kind", ["missing", "shape", "unexpected"])
def test_load_dino_checkpoint_mismatch(tmp_path, kind):
    """A missing key, a wrong shape or an unknown (non-head) key is a ValueError naming the key."""
    sd = dict(_source_state())
    if kind == "missing":
        key = "blocks.3.mlp.fc2.bias"
        del sd[key]
    elif kind == "shape":
        key = "pos_embed"
        sd[key] = torch.zeros(1, 197, 192)
    else:
        key = "blocks.0.attn.extra"
        sd[key] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    model = build_backbone("vit_mini", 8, checkpoint=None)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_dino_checkpoint(model, path)
