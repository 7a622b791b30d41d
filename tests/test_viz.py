"""evaluate's pictures: panel titles above image | prediction | ground truth, a legend that shows every name."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transfgu.viz import LEGEND_LINE, TITLE_HEIGHT, comparison_picture, palette


def ink(a: np.ndarray) -> bool:
    return bool((a < 128).any())  # black text on white


def test_titles_over_each_panel_and_the_legend_wraps_without_cutting_names():
    names = [f"a rather long class name number {i}" for i in range(8)]
    pred = np.repeat(np.arange(8), 4)[None].repeat(32, 0)  # 32 x 32, every class present
    picture = comparison_picture(np.zeros((32, 32, 3), np.uint8), pred, pred, names, palette(8))
    a = np.asarray(picture)
    zoom = 5  # 32 px enlarged to at least 160
    assert a.shape[1] == 3 * 32 * zoom
    band = a[:TITLE_HEIGHT]
    for i in range(3):  # a title over each panel, nothing between the panels' centres' neighbourhoods
        assert ink(band[:, i * 160 + 40:i * 160 + 120]), f"no title over panel {i}"
    font = ImageFont.load_default()
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(names[0], font=font)
    per_line = max(1, int(a.shape[1] // (width + 30)))
    lines = -(-8 // per_line)
    assert a.shape[0] >= TITLE_HEIGHT + 32 * zoom + lines * LEGEND_LINE  # as many legend lines as the names need
    first_line = a[TITLE_HEIGHT + 32 * zoom:TITLE_HEIGHT + 32 * zoom + LEGEND_LINE]
    end = 4 + 10 + 4 + int(width)  # margin, colour box, gap, the whole first name (the old legend cut it at 16)
    assert ink(first_line[:, end - 8:end + 1]) and not ink(first_line[:, end + 2:end + 12])


def test_a_name_wider_than_the_panels_widens_the_picture():
    name = "x" * 120
    picture = comparison_picture(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), int), None, [name],
                                 palette(1))
    font = ImageFont.load_default()
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name, font=font)
    assert picture.width >= width + 10 > 2 * 160  # the two panels are 320 px wide: the legend sets the width
    a = np.asarray(picture)
    assert ink(a[TITLE_HEIGHT + 160:, int(width) - 10:int(width) + 14])  # the end of the name is drawn


def test_crf_panel_between_prediction_and_ground_truth():
    """With a CRF prediction: image | prediction | prediction + CRF | ground truth, each panel in its colours."""
    colors = palette(3)
    pred, refined, label = (np.full((32, 32), k) for k in (0, 1, 2))
    a = np.asarray(comparison_picture(np.zeros((32, 32, 3), np.uint8), pred, label, ["a", "b", "c"], colors,
                                      crf=refined))
    assert a.shape[1] == 4 * 160
    middle = TITLE_HEIGHT + 80
    for panel, k in ((1, 0), (2, 1), (3, 2)):
        assert tuple(a[middle, panel * 160 + 80]) == tuple(colors[k]), panel
    for i in range(4):
        assert ink(a[:TITLE_HEIGHT, i * 160 + 20:i * 160 + 140]), f"no title over panel {i}"
