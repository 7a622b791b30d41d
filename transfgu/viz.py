"""Pictures for humans: image | prediction | ground truth, in class colours with a legend."""
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


def comparison_picture(image: np.ndarray, pred_class: np.ndarray, label: np.ndarray | None,
                       class_names, colors: np.ndarray, min_height: int = 160) -> Image.Image:
    """One row image | prediction | ground truth (if any), above a legend of the classes present."""
    panels = [image, colorize(pred_class, colors)]
    if label is not None:
        panels.append(colorize(label, colors))
    row = np.concatenate(panels, axis=1)
    zoom = max(1, -(-min_height // row.shape[0]))  # small images are enlarged (nearest) to be readable
    row = row.repeat(zoom, axis=0).repeat(zoom, axis=1)
    present = sorted(set(np.unique(pred_class).tolist()) | (set(np.unique(label).tolist()) if label is not None else set()))
    present = [c for c in present if 0 <= c < len(class_names)]
    font = ImageFont.load_default()
    line_h, box = 12, 10
    per_line = max(row.shape[1] // 110, 1)
    lines = (len(present) + per_line - 1) // per_line
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + lines * line_h + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(row), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        x, y = (i % per_line) * 110 + 2, row.shape[0] + 2 + (i // per_line) * line_h
        draw.rectangle([x, y, x + box, y + box], fill=tuple(int(v) for v in colors[c]))
        draw.text((x + box + 3, y - 1), str(class_names[c])[:16], fill=(0, 0, 0), font=font)
    return canvas
