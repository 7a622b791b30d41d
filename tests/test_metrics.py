import numpy as np
import pytest
import torch

from transfgu.metrics import (confusion_matrix, foreground_thing_counts, hungarian_match, matched_confusion,
                              miou_by_kind, segmentation_scores, upsample_argmax)


def test_confusion_matrix_matches_loop_and_ignores_out_of_range_labels():
    """Counts (n_pred, n_classes) equal a pixel loop; labels 255 and -1 are skipped."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (2, 7, 9), generator=g)
    label = torch.randint(0, 4, (2, 7, 9), generator=g)
    label[0, :2] = 255
    label[1, 3, :4] = -1
    conf = confusion_matrix(pred, label, n_pred=5, n_classes=4)
    ref = np.zeros((5, 4), dtype=np.int64)
    for p, l in zip(pred.flatten().tolist(), label.flatten().tolist()):
        if 0 <= l < 4:
            ref[p, l] += 1
    assert conf.shape == (5, 4)
    assert np.array_equal(conf, ref)
    assert conf.sum() == 2 * 7 * 9 - 9 * 2 - 4


def test_confusion_matrix_tiny_by_hand():
    """pred [0,1,1,2], label [1,1,255,0] -> (0,1), (1,1), (2,0); the 255 pixel ignored."""
    conf = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 1, 255, 0]), 3, 2)
    assert conf.tolist() == [[0, 1], [0, 1], [1, 0]]


def test_hungarian_match_hand_made():
    """Best one-to-one matching of [[1,9,0],[0,1,8],[7,0,2]] is cluster 0->1, 1->2, 2->0 (24 pixels);
    with 4 clusters and 3 classes the weakest cluster is left at -1."""
    conf = np.array([[1, 9, 0], [0, 1, 8], [7, 0, 2]])
    assert hungarian_match(conf).tolist() == [1, 2, 0]
    conf4 = np.array([[1, 9, 0], [0, 1, 8], [7, 0, 2], [3, 3, 3]])
    assert hungarian_match(conf4).tolist() == [1, 2, 0, -1]
    # a greedy row-by-row choice would pick 0->0 (5) then lose: optimum is 0->1, 1->0 (4 + 4 = 8)
    assert hungarian_match(np.array([[5, 4], [4, 0]])).tolist() == [1, 0]


def test_segmentation_scores_hand_made():
    """conf [[2,8,0],[0,1,6],[5,3,1]] (clusters x classes): matching 0->1, 1->2, 2->0. Matched rows
    (pred class) = [[5,3,1],[2,8,0],[0,1,6]]; gt totals (7,12,7), pred totals (9,10,7); IoU = 5/11,
    8/14, 6/8; pixel accuracy = 19/26."""
    conf = np.array([[2, 8, 0], [0, 1, 6], [5, 3, 1]])
    s = segmentation_scores(conf)
    assert s["mapping"].tolist() == [1, 2, 0]
    assert s["matched_confusion"].tolist() == [[5, 3, 1], [2, 8, 0], [0, 1, 6]]
    ious = [5 / 11, 8 / 14, 6 / 8]
    assert s["per_class_iou"] == pytest.approx([100 * v for v in ious])
    assert s["miou"] == pytest.approx(100 * sum(ious) / 3)
    assert s["pixel_accuracy"] == pytest.approx(100 * 19 / 26)


def test_perfect_permuted_prediction_scores_100():
    """A prediction that is a relabelling of the ground truth is perfect after matching."""
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (3, 8, 8), generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    conf = confusion_matrix(perm[label], label, 4, 4)
    s = segmentation_scores(conf)
    assert s["mapping"].tolist() == torch.argsort(perm).tolist()
    assert s["miou"] == pytest.approx(100.0)
    assert s["pixel_accuracy"] == pytest.approx(100.0)


def test_absent_class_skipped_in_mean():
    """Class 3 has no ground truth and no matched prediction: IoU None, mean over the 3 others
    ((1 + 3/4 + 2/3) / 3), not over 4."""
    conf = np.array([[4, 0, 0, 0], [0, 3, 1, 0], [0, 0, 2, 0]])
    s = segmentation_scores(conf)
    assert s["mapping"].tolist() == [0, 1, 2]
    assert s["per_class_iou"][3] is None
    assert s["per_class_iou"][:3] == pytest.approx([100.0, 75.0, 100 * 2 / 3])
    assert s["miou"] == pytest.approx(100 * (1 + 0.75 + 2 / 3) / 3)
    assert s["pixel_accuracy"] == pytest.approx(100 * 9 / 10)


def test_class_with_gt_but_no_prediction_counts_as_zero():
    """With fewer clusters than classes, an unmatched class with ground truth has IoU 0 and stays in
    the mean: conf [[3,1,0],[0,2,4]] -> 0->0, 1->2; IoU (3/(3+4-3), 0/(3+0-0), 4/(4+6-4))."""
    conf = np.array([[3, 1, 0], [0, 2, 4]])
    s = segmentation_scores(conf)
    assert s["mapping"].tolist() == [0, 2]
    assert matched_confusion(conf, s["mapping"]).tolist() == [[3, 1, 0], [0, 0, 0], [0, 2, 4]]
    assert s["per_class_iou"] == pytest.approx([75.0, 0.0, 100 * 4 / 6])
    assert s["miou"] == pytest.approx(100 * (0.75 + 0 + 4 / 6) / 3)
    assert s["pixel_accuracy"] == pytest.approx(70.0)


def test_miou_by_kind():
    """Means over the thing and the stuff classes apart; classes without an IoU (None) and background left out."""
    iou = [10.0, None, 30.0, 50.0, 70.0, 100.0]
    kinds = ("background", "thing", "thing", "stuff", "stuff", "thing")
    assert miou_by_kind(iou, kinds) == {"miou_things": 65.0, "miou_stuff": 60.0}
    assert miou_by_kind(iou, ()) == {}
    assert miou_by_kind([None, 4.0], ("thing", "thing")) == {"miou_things": 4.0}
    with pytest.raises(ValueError, match="2 class kinds for 3 classes"):
        miou_by_kind([1.0, 2.0, 3.0], ("thing", "stuff"))


def test_foreground_thing_counts_matches_pixel_loop():
    """Each pixel takes its patch's foreground flag; ignored labels (255, -1) count nowhere."""
    g = torch.Generator().manual_seed(1)
    fg = torch.rand(2, 3, 4, generator=g) > 0.5
    label = torch.randint(0, 5, (2, 12, 16), generator=g)
    label[0, :3, :5] = 255
    label[1, 7] = -1
    counts = foreground_thing_counts(fg, label, thing_ids=[0, 3], n_classes=5)
    ref = np.zeros(4, dtype=np.int64)
    for b in range(2):
        for y in range(12):
            for x in range(16):
                lab, f = int(label[b, y, x]), bool(fg[b, y // 4, x // 4])
                if 0 <= lab < 5:
                    ref += [f and lab in (0, 3), f, lab in (0, 3), 1]
    assert counts.tolist() == ref.tolist()
    assert counts[3] == 2 * 12 * 16 - 15 - 16


@pytest.mark.parametrize("max_elements", [1, 3 * 5 * 12 * 16, 10 ** 9])
def test_upsample_argmax_in_chunks_equals_one_call(max_elements):
    """Any chunking (one image at a time, 3 images, all at once) gives the argmax of one bilinear upsampling."""
    scores = torch.randn(7, 5, 3, 4, generator=torch.Generator().manual_seed(2))
    ref = torch.nn.functional.interpolate(scores, size=(12, 16), mode="bilinear", align_corners=False).argmax(1)
    out = upsample_argmax(scores, (12, 16), max_elements)
    assert out.shape == (7, 12, 16) and torch.equal(out, ref)
    assert upsample_argmax(scores[:0], (12, 16)).shape == (0, 12, 16)
