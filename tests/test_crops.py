from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from transfgu.crops import (THING_STUFF_WINDOW_SIZES, THINGS_ONLY_WINDOW_SIZES, crop_features, crop_windows,
                            cut_crops, select_crops, window_centres, window_fractions, window_pixel_boxes)

from reference import reference_crop_features, reference_cut_crops  # one crop at a time


pytestmark = pytest.mark.usefixtures("one_thread")


# -- window geometry ----------------------------------------------------------------------------------
def slow_windows(grid, sizes):
    """Independent enumeration of the centre rule with exact fractions: per size, b = int(grid * s); every
    cell c is a centre when c - b/2 >= 0, c + b/2 < grid and c / (b/2) is a whole number; the far-edge
    cell grid - 1 - b/2 is one too when it is a whole number (and its window fits). A window is every cell
    within b/2 of the centre, found by scanning the axis. Row-major per size. None for a size without
    any window."""
    out = []
    for s in sizes:
        b = int(grid * s)
        if b == 0:
            return None
        half = Fraction(b, 2)
        centres = set()
        for c in range(grid):
            if c - half >= 0 and c + half < grid and (c / half).denominator == 1:
                centres.add(c)
        edge = grid - 1 - half
        if edge.denominator == 1 and edge - half >= 0:
            centres.add(int(edge))
        if not centres:
            return None
        spans = []
        for c in sorted(centres):
            cells = [x for x in range(grid) if abs(x - c) <= half]
            assert cells[0] >= 0 and cells[-1] < grid
            spans.append((cells[0], cells[-1] + 1))
        for y0, y1 in spans:
            for x0, x1 in spans:
                out.append((y0, x0, y1, x1))
    return out


def starts_by_side(windows):
    """{side: sorted distinct row starts}, after checking every window is square and rows == columns."""
    y0, x0, y1, x1 = windows.unbind(1)
    assert torch.equal(y1 - y0, x1 - x0)
    out = {}
    for side in sorted(set((y1 - y0).tolist()), reverse=True):
        sel = windows[(y1 - y0) == side]
        assert sorted(set(sel[:, 0].tolist())) == sorted(set(sel[:, 1].tolist()))
        out[side] = sorted(set(sel[:, 0].tolist()))
    return out


def test_crop_windows_published_checks_80_grid():
    """G = 80 (R = 320): side 41 at {0, 20, 39}, 33 at {0, 16, 32, 47}, 25 at {0, 12, 24, 36, 48, 55},
    17 at {0, 8, ..., 56, 63}: 9 + 16 + 36 + 81 = 142 windows, in size order, all inside the grid."""
    w = crop_windows(80, THING_STUFF_WINDOW_SIZES)
    assert w.shape == (142, 4) and w.dtype == torch.long
    assert (w >= 0).all() and (w <= 80).all()
    assert (w[:, 2] - w[:, 0]).tolist() == [41] * 9 + [33] * 16 + [25] * 36 + [17] * 81
    assert starts_by_side(w) == {41: [0, 20, 39], 33: [0, 16, 32, 47], 25: [0, 12, 24, 36, 48, 55],
                                 17: [0, 8, 16, 24, 32, 40, 48, 56, 63]}
    assert len(set(map(tuple, w.tolist()))) == 142
    # every size reaches the far edge: 39 + 41 = 47 + 33 = 55 + 25 = 63 + 17 = 80
    assert (w[:, 2].view(-1) == 80).sum() == 3 + 4 + 6 + 9


def test_crop_windows_published_checks_32_grid():
    """G = 32: side 17 at {0, 8, 15}, 13 at {0, 6, 12, 18, 19}, 9 at {5, 14, 23} (odd b = 9: no window
    starts at 0), 7 at {0, 3, ..., 24, 25}: 9 + 25 + 9 + 100 = 143 windows."""
    w = crop_windows(32, THING_STUFF_WINDOW_SIZES)
    assert w.shape == (143, 4)
    assert starts_by_side(w) == {17: [0, 8, 15], 13: [0, 6, 12, 18, 19], 9: [5, 14, 23],
                                 7: [0, 3, 6, 9, 12, 15, 18, 21, 24, 25]}
    assert (w[:, 2] - w[:, 0]).tolist() == [17] * 9 + [13] * 25 + [9] * 9 + [7] * 100


def test_crop_windows_things_only_sizes():
    """Things-only sizes (0.6, 0.5, 0.4, 0.3) at G = 80: 9 + 9 + 16 + 36 = 70 windows (b = 48: centres
    24, 48 and the far edge 55)."""
    w = crop_windows(80, THINGS_ONLY_WINDOW_SIZES)
    assert w.shape == (70, 4)
    assert starts_by_side(w) == {49: [0, 24, 31], 41: [0, 20, 39], 33: [0, 16, 32, 47],
                                 25: [0, 12, 24, 36, 48, 55]}


def test_window_centres_by_hand_and_no_duplicate_far_edge():
    """b = 6 on 16 cells: multiples of 3 in [3, 12] are 3, 6, 9, 12 and the far-edge centre 16 - 1 - 3 = 12
    is one of them (listed once). b = 9 on 32 cells: multiples of 9 in [5, 27]. b = 1: every cell but 0.
    b = 8 on 9 cells: no multiple of 4 in [4, 4] but 4 itself, which is also the far edge."""
    assert window_centres(16, 6) == [3, 6, 9, 12]
    assert crop_windows(16, (0.4,)).shape == (16, 4)
    assert window_centres(32, 9) == [9, 18, 27]
    assert window_centres(5, 1) == [1, 2, 3, 4]
    assert window_centres(9, 8) == [4]
    assert window_centres(10, 7) == [] and window_centres(8, 8) == [] and window_centres(8, 0) == []


@pytest.mark.parametrize("sizes", [THING_STUFF_WINDOW_SIZES, THINGS_ONLY_WINDOW_SIZES])
def test_crop_windows_equal_slow_rule_every_grid(sizes):
    """Every grid from 16 to 100 patches: the windows equal the exact-fraction enumeration, in order."""
    for grid in range(16, 101):
        assert crop_windows(grid, sizes).tolist() == [list(b) for b in slow_windows(grid, sizes)], grid


def test_crop_windows_equal_slow_rule_other_sizes_and_errors():
    """Other sizes (odd spans, duplicate far edges, tiny and large windows) on small grids: the same windows
    as the enumeration, or a ValueError naming the size and the grid where a size gives none."""
    checked = errors = 0
    for grid in range(2, 41):
        for s in (0.7, 0.66, 0.55, 0.45, 0.35, 0.25, 0.15, 0.1, 0.05):
            ref = slow_windows(grid, (s,))
            if ref is None:
                with pytest.raises(ValueError, match=rf"window size {s} gives no window on a {grid}-patch grid"):
                    crop_windows(grid, (s,))
                errors += 1
            else:
                assert crop_windows(grid, (s,)).tolist() == [list(b) for b in ref], (grid, s)
                checked += 1
    assert checked > 200 and errors > 20


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


# -- selection ----------------------------------------------------------------------------------------
def _block_attention():
    """Image 0: value 1 on the top-left 4x4 block of an 8x8 grid (mean 0.25). Image 1: value 10 on
    the bottom-right 4x4 block plus a small 0.5 elsewhere (mean 5.375): per-image means matter."""
    a = torch.zeros(2, 8, 8)
    a[0, :4, :4] = 1.0
    a[1] = 0.5
    a[1, 4:, 4:] = 10.0
    return a


def test_select_crops_hand_made():
    """Side-4 windows at starts 0, 2, 4 on the block map: fg fraction of window (y,x) is (4-y)(4-x)/16 for
    image 0. Thing: only (0,0) (fraction 1; 0.5 is not > 0.5). Stuff (bg > 0.8): the 5 windows without any
    block cell; (0,2), (2,0) (fg 0.5) and (2,2) (bg 0.75) are neither."""
    starts = [(y, x) for y in (0, 2, 4) for x in (0, 2, 4)]
    windows = torch.tensor([[y, x, y + 4, x + 4] for y, x in starts])
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


def test_select_crops_published_windows_on_block_map():
    """crop_windows(8, (0.5,)): b = 4, centres 2, 4, 5, side 5 at starts 0, 2, 3. On image 0 (top-left 4x4
    block) window (y, x) has fg fraction (4-y)(4-x)/25: thing only at (0,0) (16/25); stuff (bg > 0.8) at
    (0,3), (3,0), (2,2) (fg 4/25), (2,3), (3,2) (2/25) and (3,3) (1/25); (0,2), (2,0) (8/25) are neither."""
    windows = crop_windows(8, (0.5,))
    starts = [(y, x) for y, x in windows[:, :2].tolist()]
    assert starts == [(y, x) for y in (0, 2, 3) for x in (0, 2, 3)]
    thing, stuff = select_crops(_block_attention()[:1], windows)
    assert {starts[i] for i in thing[0].nonzero().flatten().tolist()} == {(0, 0)}
    assert {starts[i] for i in stuff[0].nonzero().flatten().tolist()} == {(0, 3), (3, 0), (2, 2), (2, 3),
                                                                          (3, 2), (3, 3)}


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


# -- the cut ------------------------------------------------------------------------------------------
def test_window_pixel_boxes_one_pixel_short():
    """Cells [y0, y1) cover pixels p*y0 .. p*y1 - 1; the published slice ends one pixel earlier."""
    w = torch.tensor([[0, 0, 5, 5], [3, 2, 8, 7]])
    assert window_pixel_boxes(w, 8).tolist() == [[0, 0, 39, 39], [24, 16, 63, 55]]


@pytest.mark.parametrize("grid,out_size,dtype", [(16, 64, torch.float32), (16, 24, torch.float64),
                                                 (13, 96, torch.float32), (10, 40, torch.float64)])
def test_cut_crops_equals_slice_and_interpolate(grid, out_size, dtype):
    """Every window of both size tuples, on random images, from random source images, in a shuffled order:
    each crop equals F.interpolate(bilinear, align_corners=False) of its published slice alone (up- and
    down-sampling; windows flush with every image edge included)."""
    p = 8
    g = torch.Generator().manual_seed(grid)
    images = torch.randn(3, 3, grid * p, grid * p, generator=g, dtype=dtype)
    windows = torch.cat([crop_windows(grid, THING_STUFF_WINDOW_SIZES), crop_windows(grid, THINGS_ONLY_WINDOW_SIZES)])
    assert (windows[:, 0] == 0).any() and (windows[:, 1] == 0).any()
    assert (windows[:, 2] == grid).any() and (windows[:, 3] == grid).any()
    order = torch.randperm(len(windows), generator=g)
    boxes = window_pixel_boxes(windows[order], p)
    img_idx = torch.randint(0, 3, (len(boxes),), generator=g)
    got = cut_crops(images, img_idx, boxes, out_size)
    assert got.shape == (len(boxes), 3, out_size, out_size) and got.dtype == dtype
    for y0, x0, y1, x1 in boxes.tolist():
        assert y1 - y0 == x1 - x0 and (y1 - y0) % p == p - 1
    worst = (got - reference_cut_crops(images, img_idx, boxes, out_size)).abs().max().item()
    assert worst <= 1e-5, worst


def test_cut_crops_cpu_call_size_does_not_change_crops(monkeypatch):
    """The CPU bound on values per F.interpolate call (one crop per call, or everything in one call)
    changes nothing: crops of 4 shapes, interleaved, in the order given."""
    import transfgu.crops as crops
    images = torch.randn(2, 3, 64, 64)
    boxes = window_pixel_boxes(crop_windows(8, THING_STUFF_WINDOW_SIZES), 8).repeat(2, 1)
    idx = torch.arange(2).repeat_interleave(len(boxes) // 2)
    default = cut_crops(images, idx, boxes, 24)
    for limit in (1, 3 * 24 * 24 * 5, 2 ** 40):
        monkeypatch.setattr(crops, "CPU_CUT_VALUES", limit)
        assert torch.equal(cut_crops(images, idx, boxes, 24), default), limit


def test_cut_crops_reads_nothing_outside_the_slice():
    """Every pixel outside the boxes is NaN: no crop reads one. Non-square boxes and boxes flush with the
    image corner work; a box resized to its own size is the exact slice."""
    boxes = torch.tensor([[8, 16, 23, 31], [0, 0, 7, 20], [33, 41, 40, 48]])
    idx = torch.tensor([1, 0, 1])
    img = torch.full((2, 3, 40, 48), float("nan"))
    for b, (y0, x0, y1, x1) in zip(idx.tolist(), boxes.tolist()):
        img[b, :, y0:y1, x0:x1] = torch.randn(3, y1 - y0, x1 - x0)
    out = cut_crops(img, idx, boxes, 32)
    assert out.shape == (3, 3, 32, 32) and not out.isnan().any()
    ref = F.interpolate(img[:1, :, 0:7, 0:20], size=(32, 32), mode="bilinear", align_corners=False)
    assert (out[1] - ref[0]).abs().max() < 1e-6
    same = cut_crops(img, idx[:1], boxes[:1], 15)
    assert torch.equal(same[0], img[1, :, 8:23, 16:31])


def test_cut_crops_rejects_boxes_outside_the_image():
    img = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="outside the 16 x 16 image"):
        cut_crops(img, torch.tensor([0]), torch.tensor([[8, 8, 17, 16]]), 8)
    with pytest.raises(ValueError, match="empty box"):
        cut_crops(img, torch.tensor([0]), torch.tensor([[8, 8, 8, 16]]), 8)
    none = cut_crops(img, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long), 8)
    assert none.shape == (0, 3, 8, 8)


# -- the feature bank ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes,crop_size", [(THING_STUFF_WINDOW_SIZES, 32), ((0.5, 0.125), 16)])
def test_crop_features_equal_per_window_reference(tiny_backbone, sizes, crop_size):
    """Every window size (crops of several sizes share a crop batch of 7): per-image lists of float32
    features, counts equal select_crops', each feature equal to the crop cut and resized alone, then forwarded
    with its image's crops (reference_crop_features), in window order (thing crops, stuff crops)."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    windows = crop_windows(8, sizes)
    things, stuffs = crop_features(tiny_backbone, images, windows, crop_size=crop_size, crop_batch=7)
    (ref_t, ref_s), thing, stuff = reference_crop_features(tiny_backbone, images, windows, crop_size)
    assert thing.any() and stuff.any()
    assert len(things) == 2 and len(stuffs) == 2
    for b in range(2):
        for got, ref, keep in ((things[b], ref_t[b], thing[b]), (stuffs[b], ref_s[b], stuff[b])):
            assert got.shape == (int(keep.sum()), tiny_backbone.embed_dim)
            assert got.dtype == torch.float32
            assert torch.allclose(got.double(), ref, atol=1e-5)


def test_crop_features_things_only(tiny_backbone):
    """things_only=True keeps the same thing features and empty float32 stuff matrices."""
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    windows = crop_windows(8, THINGS_ONLY_WINDOW_SIZES)
    things, _ = crop_features(tiny_backbone, images, windows, crop_size=32, crop_batch=5)
    t2, s2 = crop_features(tiny_backbone, images, windows, crop_size=32, things_only=True)
    (ref_t, _), _, _ = reference_crop_features(tiny_backbone, images, windows, 32, things_only=True)
    for b in range(2):
        assert s2[b].shape == (0, tiny_backbone.embed_dim) and s2[b].dtype == torch.float32
        assert torch.allclose(t2[b], things[b], atol=1e-6)
        assert torch.allclose(t2[b].double(), ref_t[b], atol=1e-5)


def test_crop_features_empty_result_is_float32(tiny_backbone):
    """The docstring promises float32 matrices; the empty stuff matrix of things_only must be float32
    too, also for float64 input (non-empty ones are cast with .float())."""
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    things, stuffs = crop_features(tiny_backbone, images, crop_windows(4, (0.5,)), crop_size=16,
                                   things_only=True)
    assert stuffs[0].shape == (0, tiny_backbone.embed_dim)
    assert stuffs[0].dtype == torch.float32
