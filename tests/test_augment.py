import colorsys
import math

import torch

from transfgu.augment import (AugmentParams, augment, color_jitter, draw_params, gaussian_blur3, grayscale,
                              hsv_to_rgb, rgb_to_hsv)

FIELDS = ("jitter", "factors", "gray", "blur", "sigma", "box", "flip")


def _row(p: AugmentParams, i: int) -> dict:
    return {f: getattr(p, f)[i] for f in FIELDS}


def _params(B, R, jitter=None, gray=None, blur=None, flip=None, box=None, factors=None, sigma=None):
    """Hand-built parameters, everything off unless given; box defaults to the whole image."""
    off = torch.zeros(B, dtype=torch.bool)
    return AugmentParams(
        jitter=off if jitter is None else torch.tensor(jitter),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * B) if factors is None else factors,
        gray=off if gray is None else torch.tensor(gray),
        blur=off if blur is None else torch.tensor(blur),
        sigma=torch.full((B,), 1.5) if sigma is None else sigma,
        box=torch.tensor([[0.0, 0.0, R, R]] * B) if box is None else torch.tensor(box, dtype=torch.float32),
        flip=off if flip is None else torch.tensor(flip))


def test_draw_params_deterministic_and_independent_of_batch():
    """A sample's parameters depend only on (seed, epoch, index): same alone, in another batch or order;
    another epoch or seed changes them."""
    a = draw_params(5, 2, [3, 7, 11], 64)
    b = draw_params(5, 2, [7], 64)
    c = draw_params(5, 2, [11, 100, 3, 7], 64)
    for f in FIELDS:
        assert torch.equal(_row(a, 1)[f], _row(b, 0)[f])
        assert torch.equal(_row(a, 0)[f], _row(c, 2)[f])
        assert torch.equal(_row(a, 2)[f], _row(c, 0)[f])
    again = draw_params(5, 2, [3, 7, 11], 64)
    assert all(torch.equal(getattr(a, f), getattr(again, f)) for f in FIELDS)
    assert not torch.equal(draw_params(5, 3, [3, 7, 11], 64).factors, a.factors)
    assert not torch.equal(draw_params(6, 2, [3, 7, 11], 64).factors, a.factors)


def test_draw_params_ranges_and_rates():
    """Over 1500 samples at R=320: boxes square, inside the image, sides int(320*s) for s in
    {0.4, ..., 0.9} (each occurs); factors and sigma in range; rates near p_jitter .3, p_gray .2,
    p_blur .2, p_flip .5."""
    n = 1500
    p = draw_params(0, 0, range(n), 320)
    x0, y0, x1, y1 = p.box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 320).all() and (y1 <= 320).all()
    assert torch.equal(x1 - x0, y1 - y0)
    assert torch.equal(x0, x0.round()) and torch.equal(y0, y0.round())
    assert set((x1 - x0).long().tolist()) == {128, 160, 192, 224, 256, 288}
    lo = torch.tensor([0.2, 0.2, 0.2, -0.2])
    hi = torch.tensor([1.8, 1.8, 1.8, 0.2])
    assert ((p.factors >= lo) & (p.factors <= hi)).all()
    assert ((p.sigma >= 1) & (p.sigma <= 2)).all()
    for flag, rate in ((p.jitter, 0.3), (p.gray, 0.2), (p.blur, 0.2), (p.flip, 0.5)):
        assert abs(flag.float().mean().item() - rate) < 0.05


def test_augment_identity_when_everything_off():
    """No jitter/gray/blur, box = whole image, output at the input sizes: images and maps unchanged."""
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(2, 4, 8, 8, dtype=torch.float64)
    out, out_maps = augment(images, maps, _params(2, 16), out_size=16, map_size=8)
    assert torch.allclose(out, images, atol=1e-12)
    assert torch.allclose(out_maps, maps, atol=1e-12)


def test_augment_flip_flips_image_and_maps():
    """flip = (True, False): image 0 and its maps are mirrored left-right, image 1 untouched."""
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(2, 4, 8, 8, dtype=torch.float64)
    box = [[2.0, 3.0, 14.0, 15.0], [0.0, 4.0, 12.0, 16.0]]
    base, base_maps = augment(images, maps, _params(2, 16, box=box), 8, 4)
    out, out_maps = augment(images, maps, _params(2, 16, box=box, flip=[True, False]), 8, 4)
    assert torch.equal(out[0], base[0].flip(-1)) and torch.equal(out_maps[0], base_maps[0].flip(-1))
    assert torch.equal(out[1], base[1]) and torch.equal(out_maps[1], base_maps[1])
    # with the whole-image box the flipped output is the flipped input
    out, out_maps = augment(images, maps, _params(2, 16, flip=[True, True]), 16, 8)
    assert torch.allclose(out, images.flip(-1), atol=1e-12)
    assert torch.allclose(out_maps, maps.flip(-1), atol=1e-12)


def test_augment_box_crops_image_and_maps_at_the_same_place():
    """Channels hold linear ramps of the normalised pixel-centre position (x in channel 0, y in channel 1),
    image at R=64, maps at 16. Bilinear crops of a linear ramp are exact: output bin i of a box
    [a, b] with n bins reads position a + (i + .5)(b - a)/n, for the image and the maps alike."""
    R, h = 64, 16
    cx = (torch.arange(R, dtype=torch.float64) + 0.5) / R
    cm = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    images = torch.stack([cx.expand(R, R), cx[:, None].expand(R, R), torch.zeros(R, R)])[None].repeat(2, 1, 1, 1)
    maps = torch.stack([cm.expand(h, h), cm[:, None].expand(h, h)])[None].repeat(2, 1, 1, 1)
    box = [[16.0, 8.0, 48.0, 40.0], [10.0, 6.0, 40.0, 36.0]]  # x0, y0, x1, y1
    out, out_maps = augment(images, maps, _params(2, R, box=box), out_size=16, map_size=8)
    for b, (x0, y0, x1, y1) in enumerate(box):
        for n, got in ((16, out[b]), (8, out_maps[b])):
            i = torch.arange(n, dtype=torch.float64) + 0.5
            ex = (x0 + i * (x1 - x0) / n) / R
            ey = (y0 + i * (y1 - y0) / n) / R
            assert torch.allclose(got[0], ex.expand(n, n), atol=1e-6), (b, n)
            assert torch.allclose(got[1], ey[:, None].expand(n, n), atol=1e-6), (b, n)
    # box 0 by hand: image ramp runs 17/64 .. 47/64, map ramp 18/64 .. 46/64
    assert abs(out[0, 0, 0, 0].item() - 17 / 64) < 1e-9 and abs(out[0, 0, 0, -1].item() - 47 / 64) < 1e-9
    assert abs(out_maps[0, 0, 0, 0].item() - 18 / 64) < 1e-9
    assert abs(out_maps[0, 0, 0, -1].item() - 46 / 64) < 1e-9


def test_augment_applies_gray_and_blur_only_where_selected():
    """gray = (True, False): image 0 becomes 0.299 R + 0.587 G + 0.114 B in all channels, image 1 is
    unchanged; blur = (False, True) blurs only image 1."""
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    maps = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    out, _ = augment(images, maps, _params(2, 8, gray=[True, False]), 8, 4)
    lum = 0.299 * images[0, 0] + 0.587 * images[0, 1] + 0.114 * images[0, 2]
    for c in range(3):
        assert torch.allclose(out[0, c], lum, atol=1e-7)
    assert torch.allclose(out[1], images[1], atol=1e-12)
    out, _ = augment(images, maps, _params(2, 8, blur=[False, True]), 8, 4)
    assert torch.allclose(out[0], images[0], atol=1e-12)
    assert torch.allclose(out[1], gaussian_blur3(images[1:], torch.tensor([1.5]))[0], atol=1e-12)
    assert not torch.allclose(out[1], images[1], atol=1e-3)


def test_grayscale_weights():
    """grayscale() is the (0.299, 0.587, 0.114) weighted sum, one channel."""
    img = torch.tensor([[[[1.0]], [[0.5]], [[0.0]]]])
    assert torch.allclose(grayscale(img), torch.tensor([[[[0.299 + 0.2935]]]]))


def test_rgb_hsv_against_colorsys_and_round_trip():
    """rgb_to_hsv matches colorsys per pixel (incl. gray and black pixels); hsv_to_rgb inverts it."""
    img = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    img[0, :, 0, 0] = 0.0           # black
    img[0, :, 0, 1] = 0.4           # gray
    img[1, :, 2, 3] = torch.tensor([1.0, 0.0, 0.0])  # pure red
    img[1, :, 2, 4] = torch.tensor([0.2, 0.2, 0.9])  # max in blue with a tie in r, g
    hsv = rgb_to_hsv(img)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                ref = colorsys.rgb_to_hsv(*img[b, :, y, x].tolist())
                got = hsv[b, :, y, x].tolist()
                dh = abs(got[0] - ref[0])
                assert min(dh, 1 - dh) < 1e-9 and abs(got[1] - ref[1]) < 1e-9 and abs(got[2] - ref[2]) < 1e-9
    assert torch.allclose(hsv_to_rgb(hsv), img, atol=1e-9)


def test_color_jitter_neutral_and_hand_cases():
    """Factors (1,1,1,0) are the identity; brightness 0.5 halves; contrast 0 gives the image's mean
    luminance everywhere; saturation 0 gives grayscale; hue +1/3 turns pure red into pure green."""
    img = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    neutral = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    assert torch.allclose(color_jitter(img, neutral), img, atol=1e-6)
    out = color_jitter(img, torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(out[0], 0.5 * img[0], atol=1e-6)
    mean1 = (0.299 * img[1, 0] + 0.587 * img[1, 1] + 0.114 * img[1, 2]).mean().item()
    assert torch.allclose(out[1], torch.full_like(out[1], mean1), atol=1e-6)
    out = color_jitter(img[:1], torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    lum = 0.299 * img[0, 0] + 0.587 * img[0, 1] + 0.114 * img[0, 2]
    assert torch.allclose(out[0], lum.expand(3, 4, 4), atol=1e-6)
    red = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    red[:, 0] = 1.0
    out = color_jitter(red, torch.tensor([[1.0, 1.0, 1.0, 1 / 3]]))
    green = torch.zeros_like(red)
    green[:, 1] = 1.0
    assert torch.allclose(out, green, atol=1e-6)


def test_gaussian_blur3_equals_manual_convolution():
    """3x3 kernel exp(-(dx^2+dy^2)/(2 sigma^2)) normalised, reflect padding, per-image sigma: a loop."""
    img = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    sigma = torch.tensor([1.0, 1.7])
    got = gaussian_blur3(img, sigma)
    H, W = 5, 6

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    for b in range(2):
        s = sigma[b].item()
        w = {(dy, dx): math.exp(-(dx * dx + dy * dy) / (2 * s * s)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        norm = sum(w.values())
        for c in range(3):
            for y in range(H):
                for x in range(W):
                    ref = sum(wv * img[b, c, reflect(y + dy, H), reflect(x + dx, W)].item()
                              for (dy, dx), wv in w.items()) / norm
                    assert abs(got[b, c, y, x].item() - ref) < 1e-6
