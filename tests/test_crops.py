import pytest
import torch
import torch.nn.functional as F

from transfgu.crops import crop_features, crop_windows, cut_crops, select_crops, window_fractions, window_starts


pytestmark = pytest.mark.usefixtures("one_thread")


def slow_windows(grid, sizes):
    """Independent enumeration: per size, side int(grid*s), starts every side//2 while the window fits,
    plus one start flush with the far edge if not already there; row-major."""
    out = []
    for s in sizes:
        side = int(grid * s)
        stride = max(side // 2, 1)
        starts, y = [], 0
        while y + side <= grid:
            starts.append(y)
            y += stride
        if grid - side not in starts:
            starts.append(grid - side)
        for y0 in starts:
            for x0 in starts:
                out.append((y0, x0, y0 + side, x0 + side))
    return out


def test_crop_windows_80_grid_count_and_geometry():
    """80-patch grid, sizes (0.5,0.4,0.3,0.2): 3x3 + 4x4 + 6x6 + 9x9 = 142 windows, square, inside the
    grid, sides 40/32/24/16, last row/column flush with the far edge; equal to a slow enumeration."""
    w = crop_windows(80, (0.5, 0.4, 0.3, 0.2))
    assert w.shape == (142, 4)
    y0, x0, y1, x1 = w.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 80).all() and (x1 <= 80).all()
    assert torch.equal(y1 - y0, x1 - x0)
    sides = (y1 - y0).tolist()
    assert sides == [40] * 9 + [32] * 16 + [24] * 36 + [16] * 81
    by_hand = {40: [0, 20, 40], 32: [0, 16, 32, 48], 24: [0, 12, 24, 36, 48, 56],
               16: [0, 8, 16, 24, 32, 40, 48, 56, 64]}
    for side, starts in by_hand.items():
        sel = w[(y1 - y0) == side]
        assert sorted(set(sel[:, 0].tolist())) == starts
        assert sorted(set(sel[:, 1].tolist())) == starts
        assert sel[:, 2].max() == 80 and sel[:, 3].max() == 80  # flush
    assert len(set(map(tuple, w.tolist()))) == 142
    assert w.tolist() == [list(b) for b in slow_windows(80, (0.5, 0.4, 0.3, 0.2))]


def test_crop_windows_small_grid_by_hand():
    """Grid 10, size 0.5: side 5, stride 2, starts 0, 2, 4 and the flush 5 -> 16 windows."""
    assert window_starts(10, 5) == [0, 2, 4, 5]
    w = crop_windows(10, (0.5,))
    expected = [(y, x, y + 5, x + 5) for y in (0, 2, 4, 5) for x in (0, 2, 4, 5)]
    assert w.tolist() == [list(b) for b in expected]
    # grid 9, size 0.34: side 3, stride 1 -> starts 0..6, last already flush
    assert window_starts(9, 3) == list(range(7))
    assert crop_windows(9, (0.34,)).shape[0] == 49
    assert crop_windows(40, (0.6, 0.5, 0.4, 0.3)).tolist() == [list(b) for b in
                                                               slow_windows(40, (0.6, 0.5, 0.4, 0.3))]


def test_window_fractions_matches_brute_force():
    """Integral-image fractions equal a plain count of True cells per window (incl. non-square ones)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 11, 11, generator=g) > 0.6
    windows = torch.cat([crop_windows(11), torch.tensor([[0, 0, 11, 11], [2, 3, 5, 10], [10, 0, 11, 1]])])
    got = window_fractions(mask, windows)
    assert got.shape == (3, len(windows))
    for b in range(3):
        for i, (y0, x0, y1, x1) in enumerate(windows.tolist()):
            cnt = 0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    cnt += int(mask[b, y, x])
            assert abs(got[b, i].item() - cnt / ((y1 - y0) * (x1 - x0))) < 1e-6


def _block_attention():
    """Image 0: value 1 on the top-left 4x4 block of an 8x8 grid (mean 0.25). Image 1: value 10 on
    the bottom-right 4x4 block plus a small 0.5 elsewhere (mean 5.375): per-image means matter."""
    a = torch.zeros(2, 8, 8)
    a[0, :4, :4] = 1.0
    a[1] = 0.5
    a[1, 4:, 4:] = 10.0
    return a


def test_select_crops_hand_made():
    """Side-4 windows (starts 0,2,4) on the block map: fg fraction of window (y,x) is
    (4-y)(4-x)/16 for image 0. Thing: only (0,0) (fraction 1; 0.5 is not > 0.5). Stuff (bg > 0.8):
    the 5 windows without any block cell; (0,2), (2,0) (fg 0.5) and (2,2) (bg 0.75) are neither."""
    windows = crop_windows(8, (0.5,))
    starts = [(y, x) for y, x in windows[:, :2].tolist()]
    thing, stuff = select_crops(_block_attention(), windows)
    thing0 = {starts[i] for i in thing[0].nonzero().flatten().tolist()}
    stuff0 = {starts[i] for i in stuff[0].nonzero().flatten().tolist()}
    assert thing0 == {(0, 0)}
    assert stuff0 == {(0, 4), (2, 4), (4, 0), (4, 2), (4, 4)}
    # image 1 is the mirror image: block at bottom-right
    thing1 = {starts[i] for i in thing[1].nonzero().flatten().tolist()}
    stuff1 = {starts[i] for i in stuff[1].nonzero().flatten().tolist()}
    assert thing1 == {(4, 4)}
    assert stuff1 == {(4, 0), (2, 0), (0, 4), (0, 2), (0, 0)}


def test_select_crops_extra_windows_and_independent_tests():
    """Hand windows on image 0: [0,0,2,2] fg 1 -> thing; [0,0,5,5] fg 16/25 -> thing;
    [3,3,5,5] fg 1/4 -> neither; [3,3,8,8] fg 1/25 -> stuff; [0,3,5,8] fg 4/25 -> stuff (bg 0.84).
    With thresholds (0.1, 0.5) [3,3,5,5] is both a thing and a stuff crop: the tests are independent."""
    windows = torch.tensor([[0, 0, 2, 2], [0, 0, 5, 5], [3, 3, 5, 5], [3, 3, 8, 8], [0, 3, 5, 8]])
    thing, stuff = select_crops(_block_attention()[:1], windows)
    assert thing[0].tolist() == [True, True, False, False, False]
    assert stuff[0].tolist() == [False, False, False, True, True]
    thing, stuff = select_crops(_block_attention()[:1], windows, thing_fraction=0.1, stuff_fraction=0.5)
    assert thing[0].tolist() == [True, True, True, False, True]
    assert stuff[0].tolist() == [False, False, True, True, True]


def test_cut_crops_identity_size_reproduces_pixels():
    """A crop resized to its own pixel size is the exact slice of the right image."""
    img = torch.randn(2, 3, 20, 24, dtype=torch.float64)
    win = torch.tensor([[4, 6, 12, 14], [0, 16, 8, 24]])
    out = cut_crops(img, torch.tensor([1, 0]), win, 8)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[0], img[1, :, 4:12, 6:14], atol=1e-12)
    assert torch.allclose(out[1], img[0, :, 0:8, 16:24], atol=1e-12)


def test_cut_crops_upsampled_equals_bilinear_interpolate_inside():
    """Upsampling an 8x8 crop x3 equals F.interpolate(bilinear, align_corners=False) of the cut region
    wherever the source position lies inside the crop (output pixels 1..22)."""
    img = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    out = cut_crops(img, torch.tensor([0]), torch.tensor([[4, 6, 12, 14]]), 24)
    ref = F.interpolate(img[:, :, 4:12, 6:14], size=(24, 24), mode="bilinear", align_corners=False)
    assert (out[:, :, 1:-1, 1:-1] - ref[:, :, 1:-1, 1:-1]).abs().max() < 1e-5


@pytest.mark.parametrize("size,crop_px", [(0.5, 32), (0.125, 8)])
def test_crop_features_single_size_exact_slices(tiny_backbone, size, crop_px):
    """Windows of one size cut at their own pixel size (side 4 -> 32 px; side 1 -> 8 px, where every
    cell is a thing or a stuff crop): per-image lists; counts equal select_crops'; each feature
    equals backbone(slice)[:, 0] of the hand-cut slice, in window order."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    windows = crop_windows(8, (size,))
    things, stuffs = crop_features(tiny_backbone, images, windows, crop_size=crop_px, crop_batch=5)
    assert len(things) == 2 and len(stuffs) == 2
    attn = tiny_backbone.cls_attention(images)
    thing, stuff = select_crops(attn.view(2, 8, 8), windows)
    assert thing.any()
    if size == 0.125:
        assert stuff.any() and (thing ^ stuff).all()
    for b in range(2):
        for feats, keep in ((things[b], thing[b]), (stuffs[b], stuff[b])):
            idx = keep.nonzero().flatten().tolist()
            assert feats.shape == (len(idx), tiny_backbone.embed_dim)
            if idx:
                assert feats.dtype == torch.float32
            if not idx:
                continue
            slices = [images[b, :, 8 * y0:8 * y1, 8 * x0:8 * x1] for y0, x0, y1, x1 in windows[idx].tolist()]
            ref = tiny_backbone(torch.stack(slices))[:, 0]  # each sample is independent in a batch
            assert torch.allclose(feats.double(), ref, atol=1e-5)


def test_crop_features_all_sizes_and_things_only(tiny_backbone):
    """All window sizes resized to 32 px with a small crop batch: each feature equals the backbone on
    that crop cut alone; things_only=True keeps the same thing features and empty stuff."""
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    windows = crop_windows(8)
    things, stuffs = crop_features(tiny_backbone, images, windows, crop_size=32, crop_batch=7)
    attn = tiny_backbone.cls_attention(images)
    thing, stuff = select_crops(attn.view(2, 8, 8), windows)
    for b in range(2):
        for feats, keep in ((things[b], thing[b]), (stuffs[b], stuff[b])):
            idx = keep.nonzero().flatten().tolist()
            assert feats.shape[0] == len(idx)
            if not idx:
                continue
            crops = torch.cat([cut_crops(images[b:b + 1], torch.tensor([0]), windows[i:i + 1] * 8, 32)
                               for i in idx])  # each crop cut on its own
            assert torch.allclose(feats.double(), tiny_backbone(crops)[:, 0], atol=1e-5)
    t2, s2 = crop_features(tiny_backbone, images, windows, crop_size=32, things_only=True)
    for b in range(2):
        assert s2[b].shape == (0, tiny_backbone.embed_dim)
        assert torch.allclose(t2[b], things[b], atol=1e-6)


def test_crop_features_empty_result_is_float32(tiny_backbone):
    """The docstring promises float32 matrices; the empty stuff matrix of things_only must be float32
    too, also for float64 input (non-empty ones are cast with .float())."""
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    things, stuffs = crop_features(tiny_backbone, images, crop_windows(4, (0.5,)), crop_size=16,
                                   things_only=True)
    assert stuffs[0].shape == (0, tiny_backbone.embed_dim)
    assert stuffs[0].dtype == torch.float32
