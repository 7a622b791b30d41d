import math

import pytest
import torch

from transfgu.models.decoder import MaskTransformer, build_decoder

D = 384
K = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def published_shapes(k: int, d: int) -> dict:
    """Key -> shape of a published TransFGU decoder state dict (docs/method.md section 4)."""
    shapes = {
        "cls_emb": (1, k, d), "proj_patch": (d, d), "proj_classes": (d, d),
        "proj_dec.weight": (d, d), "proj_dec.bias": (d,),
        "decoder_norm.weight": (d,), "decoder_norm.bias": (d,),
        "mask_norm.weight": (k,), "mask_norm.bias": (k,),
    }
    for i in (0, 1):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
        })
    return shapes


def random_state(k: int, d: int, seed: int = 0) -> dict:
    """A 'published-like' state dict with random float64 values of sensible scale."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in published_shapes(k, d).items():
        fan_in = shape[-1]
        t = torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
        if "norm" in key and key.endswith("weight"):
            t = 1 + 0.1 * t
        out[key] = t
    return out


def reference_forward(sd: dict, patches: torch.Tensor, grid, heads: int = 6):
    """Independent re-implementation of the Segmenter mask transformer from a state dict (eval mode)."""
    def ln(x, w, b, eps=1e-5):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    B, N, _ = patches.shape
    x = patches @ sd["proj_dec.weight"].T + sd["proj_dec.bias"]
    x = torch.cat([x, sd["cls_emb"].expand(B, -1, -1)], 1)
    d = x.shape[-1]
    hd = d // heads
    for i in (0, 1):
        p = f"blocks.{i}."
        h = ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = h @ sd[p + "attn.qkv.weight"].T
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        outs = []
        for j in range(heads):
            sl = slice(j * hd, (j + 1) * hd)
            a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), -1)
            outs.append(a @ v[..., sl])
        x = x + torch.cat(outs, -1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = ln(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
    pf = x[:, :N] @ sd["proj_patch"]
    cf = x[:, N:] @ sd["proj_classes"]
    pf = pf / pf.norm(dim=-1, keepdim=True)
    cf = cf / cf.norm(dim=-1, keepdim=True)
    masks = ln(pf @ cf.transpose(1, 2), sd["mask_norm.weight"], sd["mask_norm.bias"])  # (B, N, K)
    return masks.transpose(1, 2).reshape(B, -1, *grid), cf


def test_state_dict_has_published_keys_and_shapes():
    """Keys and shapes are exactly those of the published decoders (no qkv bias, no extra buffers)."""
    model = MaskTransformer(n_cls=K, d_encoder=D, d_model=D, n_heads=6)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_shapes(K, D)


def test_strict_load_of_published_like_state():
    """A dict with exactly the published keys loads with strict=True and is what the model then holds."""
    model = MaskTransformer(n_cls=K, d_encoder=D, d_model=D, n_heads=6).double()
    sd = random_state(K, D)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_forward_shapes_unit_class_features_and_orthonormal_init():
    """Logits (B, K, h, w), class features (B, K, d) of unit norm; cls_emb rows orthonormal at init."""
    model = build_decoder(K, D, seed=3).eval()
    patches = torch.randn(2, 3 * 4, D)
    masks, cls = model(patches, (3, 4))
    assert masks.shape == (2, K, 3, 4)
    assert cls.shape == (2, K, D)
    assert torch.allclose(cls.norm(dim=-1), torch.ones(2, K), atol=1e-5)
    e = model.cls_emb.detach()[0].double()
    assert torch.allclose(e @ e.T, torch.eye(K, dtype=torch.float64), atol=1e-5)
    # mask_norm is a LayerNorm over K with identity affine at init: zero mean over K per pixel
    assert torch.allclose(masks.mean(1), torch.zeros(2, 3, 4), atol=1e-5)


def test_forward_eval_matches_reference():
    """Eval-mode forward equals the hand re-implementation on a published-like state (within 1e-5)."""
    model = MaskTransformer(n_cls=K, d_encoder=D, d_model=D, n_heads=6).double().eval()
    sd = random_state(K, D, seed=1)
    model.load_state_dict(sd, strict=True)
    patches = torch.randn(2, 3 * 4, D, dtype=torch.float64)
    with torch.no_grad():
        masks, cls = model(patches, (3, 4))
    ref_masks, ref_cls = reference_forward(sd, patches, (3, 4))
    assert torch.allclose(masks, ref_masks, atol=1e-5)
    assert torch.allclose(cls, ref_cls, atol=1e-5)
    # the grid is row-major: pixel (r, c) is token r * 4 + c
    assert torch.allclose(masks[:, :, 1, 2], ref_masks.flatten(2)[:, :, 6], atol=1e-5)


def test_forward_init_weights_matches_reference():
    """Also at the module's own (seeded) initial weights."""
    model = build_decoder(3, D, seed=0).double().eval()
    sd = model.state_dict()
    patches = torch.randn(1, 6, D, dtype=torch.float64)
    with torch.no_grad():
        masks, cls = model(patches, (2, 3))
    ref_masks, ref_cls = reference_forward(sd, patches, (2, 3))
    assert torch.allclose(masks, ref_masks, atol=1e-5)
    assert torch.allclose(cls, ref_cls, atol=1e-5)
