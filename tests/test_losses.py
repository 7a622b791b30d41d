import math

import pytest
import torch

from transfgu.losses import loss_cat, loss_cls_emb, loss_uncertainty, normalize_maps, soft_targets


def test_normalize_maps_over_whole_tensor_per_image():
    """Min-max over all K x h x w values of each image (not per channel): hand-made 2-image example."""
    maps = torch.tensor([
        [[[0.0, 2.0, 4.0]], [[0.4, 0.2, 8.0]]],        # min 0, max 8
        [[[-1.0, 1.0, 0.0]], [[3.0, -1.0, 1.0]]],      # min -1, max 3
    ])
    expected = torch.tensor([
        [[[0.0, 0.25, 0.5]], [[0.05, 0.025, 1.0]]],
        [[[0.0, 0.5, 0.25]], [[1.0, 0.0, 0.5]]],
    ])
    assert torch.allclose(normalize_maps(maps), expected, atol=1e-7)


def test_normalize_maps_constant_image_is_finite():
    """A constant image (max == min) gives zeros, not NaN."""
    out = normalize_maps(torch.full((1, 2, 2, 2), 3.0))
    assert torch.equal(out, torch.zeros(1, 2, 2, 2))


MAPS = torch.tensor([[[[0.0, 2.0, 4.0]], [[0.4, 0.2, 8.0]]]])  # normalised: [0,.25,.5] / [.05,.025,1]


def test_soft_targets_plain_is_normalised_maps():
    """Without things-only and teacher the target is just the normalised maps."""
    assert torch.allclose(soft_targets(MAPS, things_only=False), normalize_maps(MAPS))


def test_soft_targets_things_only_background_channel():
    """Background channel 0 = relu(0.1 - max_k normalised), by hand: per-pixel max (.05, .25, 1) ->
    background (.05, 0, 0); the K maps follow unchanged."""
    t = soft_targets(MAPS, things_only=True)
    expected = torch.tensor([[[[0.05, 0.0, 0.0]], [[0.0, 0.25, 0.5]], [[0.05, 0.025, 1.0]]]])
    assert t.shape == (1, 3, 1, 3)
    assert torch.allclose(t, expected, atol=1e-7)


def test_soft_targets_teacher_blend():
    """With a teacher: 0.5 * maps + 0.5 * softmax(teacher) over channels, softmax by hand."""
    teacher = torch.tensor([[[[0.0, 1.0, -2.0]], [[1.0, 1.0, 0.0]]]])
    t = soft_targets(MAPS, things_only=False, teacher_logits=teacher)
    norm = [[0.0, 0.25, 0.5], [0.05, 0.025, 1.0]]
    for x in range(3):
        e = [math.exp(teacher[0, c, 0, x].item()) for c in range(2)]
        for c in range(2):
            assert abs(t[0, c, 0, x].item() - (0.5 * norm[c][x] + 0.5 * e[c] / sum(e))) < 1e-6
    # things-only with a teacher: the teacher has K + 1 channels, blended after the background is added
    teacher3 = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 3.0]]]])
    t3 = soft_targets(MAPS, things_only=True, teacher_logits=teacher3)
    base = soft_targets(MAPS, things_only=True)
    assert torch.allclose(t3, 0.5 * base + 0.5 * teacher3.softmax(1))
    sm0 = math.exp(2) / (math.exp(2) + 2)
    assert abs(t3[0, 0, 0, 0].item() - (0.5 * 0.05 + 0.5 * sm0)) < 1e-6


def _ce_by_hand(logits, labels):
    """Mean over pixels of -log softmax(logits)[label], with explicit loops."""
    B, C, H, W = logits.shape
    total = 0.0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                z = [logits[b, c, y, x].item() for c in range(C)]
                m = max(z)
                lse = m + math.log(sum(math.exp(v - m) for v in z))
                total += lse - z[labels[b][y][x]]
    return total / (B * H * W)


LOGITS = torch.tensor([[[[1.0, -0.5]], [[0.2, 2.0]], [[-1.0, 0.3]]],
                       [[[0.0, 0.1]], [[0.5, -2.0]], [[1.5, 0.0]]]])   # (2, 3, 1, 2)
TARGET = torch.tensor([[[[0.9, 0.1]], [[0.3, 0.2]], [[0.1, 0.7]]],
                       [[[0.2, 0.6]], [[0.5, 0.3]], [[0.4, 0.1]]]])    # argmax labels: [0, 2], [1, 0]


def test_loss_cat_is_ce_to_argmax():
    """Plain loss_cat = cross-entropy to argmax(target), checked against a hand loop with labels by hand."""
    got = loss_cat(LOGITS, TARGET)
    assert abs(got.item() - _ce_by_hand(LOGITS, [[[0, 2]], [[1, 0]]])) < 1e-6
    # alpha without a permutation, or a permutation with alpha 0, subtracts nothing
    assert torch.allclose(loss_cat(LOGITS, TARGET, alpha=0.05), got)
    assert torch.allclose(loss_cat(LOGITS, TARGET, alpha=0.0, permutation=torch.tensor([2, 0, 1])), got)


def test_loss_cat_negative_label():
    """With alpha and a channel permutation perm = [2, 0, 1]: target[:, perm] has channel j = old perm[j],
    so old argmax c moves to j with perm[j] = c: 0 -> 1, 1 -> 2, 2 -> 0. Negative labels [1, 0], [2, 1];
    loss = CE(label) - alpha * CE(negative label)."""
    alpha = 0.07
    got = loss_cat(LOGITS, TARGET, alpha=alpha, permutation=torch.tensor([2, 0, 1]))
    expected = _ce_by_hand(LOGITS, [[[0, 2]], [[1, 0]]]) - alpha * _ce_by_hand(LOGITS, [[[1, 0]], [[2, 1]]])
    assert abs(got.item() - expected) < 1e-6


def test_loss_uncertainty_hand_made():
    """Two pixels with probabilities (.7,.2,.1) and (.4,.35,.25): margins 0.5 and 0.95, mean 0.725;
    with a foreground mask only the masked pixel counts; an empty mask gives 0 (still differentiable)."""
    p = torch.tensor([[0.7, 0.4], [0.2, 0.35], [0.1, 0.25]])  # (C, pixels)
    logits = p.log().view(1, 3, 1, 2).clone().requires_grad_(True)
    assert abs(loss_uncertainty(logits).item() - 0.725) < 1e-6
    assert abs(loss_uncertainty(logits, torch.tensor([[[True, False]]])).item() - 0.5) < 1e-6
    assert abs(loss_uncertainty(logits, torch.tensor([[[False, True]]])).item() - 0.95) < 1e-6
    empty = loss_uncertainty(logits, torch.tensor([[[False, False]]]))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_loss_uncertainty_order_of_channels_irrelevant():
    """The two largest probabilities are found wherever they sit: permuting channels changes nothing,
    and a batch of random logits matches a per-pixel sort."""
    logits = torch.randn(2, 4, 3, 3)
    perm = torch.tensor([3, 1, 0, 2])
    assert torch.allclose(loss_uncertainty(logits), loss_uncertainty(logits[:, perm]))
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 4)
    margins = [1 - (sorted(r.tolist())[-1] - sorted(r.tolist())[-2]) for r in probs]
    assert abs(loss_uncertainty(logits).item() - sum(margins) / len(margins)) < 1e-6


def test_loss_cls_emb_double_loop():
    """Mean over images and ordered pairs i != j of (1 + cos(f_i, f_j)), by a plain double loop."""
    f = torch.nn.functional.normalize(torch.randn(2, 4, 6), dim=-1)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if i != j:
                    total += 1 + torch.dot(f[b, i], f[b, j]).item()
                    n += 1
    assert abs(loss_cls_emb(f).item() - total / n) < 1e-6


@pytest.mark.parametrize("sign,expected", [(-1.0, 0.0), (1.0, 2.0)])
def test_loss_cls_emb_extremes(sign, expected):
    """Two opposite unit vectors give 0, two identical ones give 2."""
    v = torch.nn.functional.normalize(torch.tensor([0.3, -1.0, 2.0]), dim=0)
    f = torch.stack([v, sign * v])[None]
    assert abs(loss_cls_emb(f).item() - expected) < 1e-6
