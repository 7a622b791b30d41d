"""Pictures for humans: image | prediction | ground truth under their titles, in class colours, with a legend."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = (0, 0, 0)


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8), the same for every run."""
    rng = np.random.default_rng(12345)
    base = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
            (0, 0, 128), (128, 128, 128)]
    extra = rng.integers(40, 256, size=(max(n - len(base), 0), 3))
    return np.concatenate([np.array(base[:n], dtype=np.uint8).reshape(-1, 3), extra.astype(np.uint8)])[:n]


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours; ids outside the palette are black."""
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(colors))
    out[valid] = colors[labels[valid]]
    return out


PANEL_TITLES = ("image", "prediction", "ground truth")
TITLE_HEIGHT = 16   # the band above the panels that holds their titles
LEGEND_LINE = 14    # height of one legend line


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(round(draw.textlength(text, font=font)))


CRF_TITLE = "prediction + CRF"


def comparison_picture(image: np.ndarray, prediction: np.ndarray, label: np.ndarray | None,
                       class_names, colors: np.ndarray, min_height: int = 160,
                       crf: np.ndarray | None = None) -> Image.Image:
    """One row image | prediction | prediction + CRF (when `crf` is given) | ground truth (when `label` is given)
    under a band with the panel titles, above a legend of the entries present. `prediction`, `crf` and `label`
    are ids into `class_names` / `colors` (the legend; negative or out-of-range ids are black). The legend flows
    over as many lines as it needs and shows every name in full; the picture widens when a single entry is wider
    than the panels."""
    panels, titles = [image, colorize(prediction, colors)], list(PANEL_TITLES[:2])
    if crf is not None:
        panels.append(colorize(crf, colors))
        titles.append(CRF_TITLE)
    if label is not None:
        panels.append(colorize(label, colors))
        titles.append(PANEL_TITLES[2])
    row = np.concatenate(panels, axis=1)
    zoom = max(1, -(-min_height // row.shape[0]))  # small images are enlarged (nearest) to be readable
    row = row.repeat(zoom, axis=0).repeat(zoom, axis=1)
    panel_w = row.shape[1] // len(panels)
    present = set().union(*(np.unique(a).tolist() for a in (prediction, crf, label) if a is not None))
    present = [c for c in sorted(present) if 0 <= c < len(class_names)]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box, gap, margin = 10, 14, 4
    entries = [(c, str(class_names[c]), box + 4 + _text_width(measure, str(class_names[c]), font)) for c in present]
    width = max([row.shape[1]] + [w + 2 * margin for _, _, w in entries])
    placed, x, y = [], margin, 0
    for c, name, w in entries:  # flow the entries into lines no wider than the picture
        if x > margin and x + w > width - margin:
            x, y = margin, y + 1
        placed.append((c, name, x, y))
        x += w + gap
    lines = (y + 1) if entries else 0
    top = TITLE_HEIGHT
    canvas = Image.new("RGB", (width, top + row.shape[0] + lines * LEGEND_LINE + (margin if lines else 0)),
                       (255, 255, 255))
    canvas.paste(Image.fromarray(row), (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        tw = _text_width(draw, title, font)
        draw.text((i * panel_w + max((panel_w - tw) // 2, 0), 2), title, fill=(0, 0, 0), font=font)
    y0 = top + row.shape[0] + margin // 2
    for c, name, x, line in placed:
        y = y0 + line * LEGEND_LINE
        draw.rectangle([x, y + 1, x + box, y + 1 + box], fill=tuple(int(v) for v in colors[c]), outline=(0, 0, 0))
        draw.text((x + box + 4, y), name, fill=(0, 0, 0), font=font)
    return canvas
