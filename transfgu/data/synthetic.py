"""Deterministic synthetic scenes for testing unsupervised semantic segmentation.

A scene is a square image partitioned into 2-4 textured "stuff" regions (wavy
horizontal bands or a warped Voronoi partition) with 2-4 textured "thing"
objects drawn on top (later objects occlude earlier ones), 30-70 % of the image
side across, so that things cover about a third of the pixels and span several
patches at the default working resolution.  Every pixel carries one of 12 fine
labels; fine ids ``2k`` and ``2k + 1`` form coarse class ``k``.

The scenes are built to be a fair but non-trivial test:

* every stuff kind and thing kind has a characteristic texture, so texture and
  shape are what separate the classes;
* four thing kinds share their colour palette with a stuff kind (e.g. the
  striped disc is made of the same wood colours as the planks), the gradient
  triangle blends two stuff colours, and sand and planks (different coarse
  classes) share a palette, so colour alone does not solve the task;
* the two fine kinds of a coarse class differ in shape and texture;
* colours, textures, layout and global brightness/contrast are jittered per
  image and a little pixel noise is added.

All drawing is vectorised numpy; all randomness comes from the passed
``numpy.random.Generator``, so output is a pure function of its state and the
size.  Geometry and texture scales are in units of the image side and per-pixel
noise comes from child streams, so the same rng state gives the same scene at
any resolution (up to sampling).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

GENERATOR_VERSION = 2  # 2: objects 30-70 % of the side (1: 10-35 %, 1-5 of them; things 9 % of pixels)

Rng = np.random.Generator
Array = np.ndarray
# A texture maps coordinates (1-D float arrays, units of the image side) to a
# blend weight t in [0, 1] between the two colours of a palette.  It draws its
# parameters from the rng and per-pixel noise only through ``_grain``, so the
# rng advances by the same amount whatever the resolution.
Texture = Callable[[Rng, Array, Array], Array]
# A shape maps object-normalised coordinates (object radius = 1) to a mask.
Shape = Callable[[Array, Array], Array]

# Two-colour palettes (RGB in [0, 1]); a texture blends from the first to the second.
WOOD = ((0.40, 0.24, 0.10), (0.76, 0.56, 0.33))
SKY = ((0.30, 0.50, 0.88), (0.93, 0.95, 0.99))
BRICK = ((0.62, 0.21, 0.15), (0.80, 0.78, 0.74))
WATER = ((0.05, 0.30, 0.30), (0.38, 0.66, 0.42))
GRASS = ((0.13, 0.36, 0.10), (0.47, 0.72, 0.26))
VIOLET = ((0.42, 0.18, 0.52), (0.96, 0.86, 0.22))
DUSK = ((0.76, 0.56, 0.33), (0.13, 0.36, 0.10))  # wood-light to grass-dark

TWO_PI = 2.0 * np.pi


# --------------------------------------------------------------------------- #
# Texture primitives
# --------------------------------------------------------------------------- #
def _soft_wave(phase: Array, sharpness: float = 3.0) -> Array:
    """Periodic 0/1 pattern with soft edges; ``phase`` in cycles."""
    return np.clip(0.5 + 0.5 * sharpness * np.sin(TWO_PI * phase), 0.0, 1.0)


def _value_noise(rng: Rng, x: Array, y: Array, cells_x: int, cells_y: int) -> Array:
    """Smooth periodic random field in [0, 1] with ``cells_x * cells_y`` lattice cells per unit square."""
    lattice = rng.random((cells_y, cells_x))
    gx = x * cells_x + rng.random() * cells_x
    gy = y * cells_y + rng.random() * cells_y
    x0, y0 = np.floor(gx), np.floor(gy)
    fx, fy = gx - x0, gy - y0
    fx, fy = fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy)
    ix0, iy0 = x0.astype(np.int64) % cells_x, y0.astype(np.int64) % cells_y
    ix1, iy1 = (ix0 + 1) % cells_x, (iy0 + 1) % cells_y
    top = lattice[iy0, ix0] * (1 - fx) + lattice[iy0, ix1] * fx
    bottom = lattice[iy1, ix0] * (1 - fx) + lattice[iy1, ix1] * fx
    return top * (1 - fy) + bottom * fy


def _grain(rng: Rng, shape: tuple[int, ...]) -> Array:
    """Per-pixel uniform noise from a child stream, so ``rng`` advances by the same amount at any resolution."""
    return np.random.default_rng(rng.integers(2**63)).random(shape)


def _rotate(x: Array, y: Array, angle: float) -> tuple[Array, Array]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


# --------------------------------------------------------------------------- #
# Stuff textures (image coordinates)
# --------------------------------------------------------------------------- #
def _tex_sky(rng: Rng, x: Array, y: Array) -> Array:
    """Smooth vertical gradient with faint large clouds."""
    clouds = _value_noise(rng, x, y, 4, 3)
    return np.clip(0.1 + 0.55 * y + 0.45 * (clouds - 0.3), 0.0, 1.0)


def _tex_water(rng: Rng, x: Array, y: Array) -> Array:
    """Horizontal ripples that meander sideways."""
    period = rng.uniform(0.045, 0.06)
    meander = rng.uniform(0.2, 0.45) * np.sin(TWO_PI * x / rng.uniform(0.2, 0.35) + rng.uniform(0, TWO_PI))
    return _soft_wave(y / period + meander + rng.random(), 1.5)


def _tex_grass(rng: Rng, x: Array, y: Array) -> Array:
    """Fine grain plus thin vertical blade streaks."""
    blades = _value_noise(rng, x, y, 48, 5)
    return np.clip(0.55 * _grain(rng, x.shape) + 0.65 * blades - 0.1, 0.0, 1.0)


def _tex_sand(rng: Rng, x: Array, y: Array) -> Array:
    """Soft light mottling with sparse dark specks."""
    t = 0.5 + 0.5 * _value_noise(rng, x, y, 7, 7)
    return np.where(_grain(rng, x.shape) < 0.06, 0.0, t)


def _tex_brick(rng: Rng, x: Array, y: Array) -> Array:
    """Running-bond bricks with per-brick shade and light mortar lines."""
    height = rng.uniform(0.05, 0.065)
    width = height * rng.uniform(2.0, 2.6)
    gy = y / height + rng.random()
    row = np.floor(gy)
    gx = x / width + 0.5 * (row % 2) + rng.random()
    col = np.floor(gx)
    mortar = 0.012
    is_mortar = ((gx - col) * width < mortar) | ((gy - row) * height < mortar)
    shade = rng.random((16, 16))[row.astype(np.int64) % 16, col.astype(np.int64) % 16]
    return np.where(is_mortar, 1.0, 0.25 * shade)


def _tex_planks(rng: Rng, x: Array, y: Array) -> Array:
    """Horizontal planks with per-plank shade, wavy grain and dark seams."""
    height = rng.uniform(0.06, 0.09)
    gy = y / height + rng.random()
    row = np.floor(gy)
    shade = rng.random(16)[row.astype(np.int64) % 16]
    grain = 0.12 * np.sin(TWO_PI * (gy * 3.0 + 0.6 * np.sin(TWO_PI * x * 2.5 + row)))
    t = 0.3 + 0.5 * shade + grain
    return np.clip(np.where(gy - row < 0.1, 0.0, t), 0.0, 1.0)


# --------------------------------------------------------------------------- #
# Thing textures (object coordinates: rotated with the object, not scaled)
# --------------------------------------------------------------------------- #
def _tex_stripes(rng: Rng, u: Array, v: Array) -> Array:
    """Narrow hard stripes at a random angle."""
    a, _ = _rotate(u, v, rng.uniform(0, np.pi))
    return _soft_wave(a / rng.uniform(0.035, 0.045) + rng.random(), 4.0)


def _tex_dots(rng: Rng, u: Array, v: Array) -> Array:
    """Bright dots on a square grid over a dark base."""
    period = rng.uniform(0.045, 0.055)
    fu = (u / period + rng.random()) % 1.0 - 0.5
    fv = (v / period + rng.random()) % 1.0 - 0.5
    return np.where(fu * fu + fv * fv < 0.36**2, 1.0, 0.05)


def _tex_checker(rng: Rng, u: Array, v: Array) -> Array:
    """Checkerboard with small cells."""
    cell = rng.uniform(0.03, 0.04)
    parity = (np.floor(u / cell) + np.floor(v / cell)) % 2
    return 0.1 + 0.8 * parity


def _tex_speckles(rng: Rng, u: Array, v: Array) -> Array:
    """Dense bright speckles on a dark base."""
    g = _grain(rng, u.shape)
    return np.where(g < 0.3, 0.95, 0.05 + 0.3 * g)


def _tex_gradient(rng: Rng, u: Array, v: Array) -> Array:
    """Smooth linear gradient across the object."""
    a, _ = _rotate(u, v, rng.uniform(0, TWO_PI))
    return np.clip(0.5 + a / 0.2, 0.0, 1.0)


def _tex_rings(rng: Rng, u: Array, v: Array) -> Array:
    """Concentric bands around the object centre."""
    return _soft_wave(np.sqrt(u * u + v * v) / rng.uniform(0.035, 0.045) + rng.random(), 2.0)


# --------------------------------------------------------------------------- #
# Thing shapes (object radius = 1; all fit inside radius 1.25)
# --------------------------------------------------------------------------- #
def _shape_disc(a: Array, b: Array) -> Array:
    return a * a + b * b <= 1.0


def _shape_ring(a: Array, b: Array) -> Array:
    r2 = a * a + b * b
    return (r2 <= 1.0) & (r2 >= 0.5**2)


def _shape_square(a: Array, b: Array) -> Array:
    return np.maximum(np.abs(a), np.abs(b)) <= 0.85


def _shape_bar(a: Array, b: Array) -> Array:
    return (np.abs(a) <= 1.0) & (np.abs(b) <= 0.45)


def _shape_triangle(a: Array, b: Array) -> Array:
    s3 = np.sqrt(3.0)
    return (b >= -0.5) & (b <= 1.0 - s3 * a) & (b <= 1.0 + s3 * a)


def _shape_cross(a: Array, b: Array) -> Array:
    aa, ab = np.abs(a), np.abs(b)
    return ((aa <= 0.3) & (ab <= 1.0)) | ((ab <= 0.3) & (aa <= 1.0))


# --------------------------------------------------------------------------- #
# Class table
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Kind:
    """One fine class: name, palette, texture and (for things) shape."""

    name: str
    palette: tuple[tuple[float, float, float], tuple[float, float, float]]
    texture: Texture
    shape: Shape | None = None


KINDS: tuple[Kind, ...] = (
    # things -- coarse "round"
    Kind("striped disc", WOOD, _tex_stripes, _shape_disc),
    Kind("dotted ring", SKY, _tex_dots, _shape_ring),
    # things -- coarse "boxy"
    Kind("checkered square", BRICK, _tex_checker, _shape_square),
    Kind("speckled bar", VIOLET, _tex_speckles, _shape_bar),
    # things -- coarse "pointy"
    Kind("gradient triangle", DUSK, _tex_gradient, _shape_triangle),
    Kind("banded cross", WATER, _tex_rings, _shape_cross),
    # stuff -- coarse "fluid"
    Kind("cloudy sky", SKY, _tex_sky),
    Kind("rippled water", WATER, _tex_water),
    # stuff -- coarse "ground"
    Kind("grass", GRASS, _tex_grass),
    Kind("sand", WOOD, _tex_sand),
    # stuff -- coarse "structure"
    Kind("brick wall", BRICK, _tex_brick),
    Kind("wooden planks", WOOD, _tex_planks),
)

FINE_CLASS_NAMES: list[str] = [k.name for k in KINDS]
COARSE_CLASS_NAMES: list[str] = ["round", "boxy", "pointy", "fluid", "ground", "structure"]
NUM_THING_KINDS = 6

_SHAPE_EXTENT = 1.25  # every shape lies within this multiple of the object radius


# --------------------------------------------------------------------------- #
# Scene generation
# --------------------------------------------------------------------------- #
def _jittered_palette(rng: Rng, kind: Kind) -> Array:
    """The kind's two colours with a per-instance brightness and per-channel jitter, shape (2, 3)."""
    pal = np.asarray(kind.palette) * rng.uniform(0.85, 1.15)
    return np.clip(pal + rng.normal(0.0, 0.05, size=(2, 3)), 0.0, 1.0)


def _paint(rng: Rng, kind: Kind, x: Array, y: Array) -> Array:
    """RGB colours (n, 3) of ``kind``'s texture at coordinates x, y."""
    pal = _jittered_palette(rng, kind)
    t = kind.texture(rng, x, y)[:, None]
    return pal[0] * (1.0 - t) + pal[1] * t


def _stuff_regions(rng: Rng, x: Array, y: Array) -> tuple[Array, int]:
    """Partition the image into 2-4 regions (wavy bands or warped Voronoi cells)."""
    n = int(rng.integers(2, 5))
    if rng.random() < 0.5:
        regions = np.zeros(x.shape, dtype=np.int64)
        for i in range(1, n):
            base = (i + rng.uniform(-0.3, 0.3)) / n
            wave = rng.uniform(0.01, 0.06) * np.sin(TWO_PI * rng.uniform(0.5, 3.0) * x + rng.uniform(0, TWO_PI))
            regions += y > base + wave
    else:
        seeds = rng.uniform(0.1, 0.9, size=(n, 2))
        wx = x + 0.15 * (_value_noise(rng, x, y, 4, 4) - 0.5)
        wy = y + 0.15 * (_value_noise(rng, x, y, 4, 4) - 0.5)
        dist = (wx[None] - seeds[:, 0, None, None]) ** 2 + (wy[None] - seeds[:, 1, None, None]) ** 2
        regions = np.argmin(dist, axis=0)
    return regions, n


LAYOUTS = ("scenes", "objects")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def generate_scene(rng: Rng, size: int, layout: str = "scenes") -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (size, size, 3) and label uint8 (size, size) with fine ids 0..11 (every pixel labelled).

    layout 'scenes' (the datasets): 2-4 things of 30-70 % of the side anywhere. 'objects': one thing of
    50-85 % of the side near the centre, on the same stuff backgrounds, like the object-centric photos of the
    sets DINO is pretrained on (ImageNet) next to the scenes it is applied to (COCO); for pretraining only."""
    _check_layout(layout)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    image = np.zeros((size, size, 3), dtype=np.float64)
    label = np.zeros((size, size), dtype=np.uint8)

    # Stuff: each region gets a distinct stuff kind.
    regions, n_regions = _stuff_regions(rng, x, y)
    stuff_ids = rng.choice(np.arange(NUM_THING_KINDS, len(KINDS)), size=n_regions, replace=False)
    for r, kind_id in enumerate(stuff_ids):
        mask = regions == r
        image[mask] = _paint(rng, KINDS[kind_id], x[mask], y[mask])
        label[mask] = kind_id

    # Things, drawn in order so later ones occlude earlier ones.
    objects = layout == "objects"
    for _ in range(1 if objects else int(rng.integers(2, 5))):
        kind_id = int(rng.integers(0, NUM_THING_KINDS))
        kind = KINDS[kind_id]
        radius = 0.5 * (rng.uniform(0.5, 0.85) if objects else rng.uniform(0.3, 0.7))  # diameter, part of the side
        cx, cy = rng.uniform(0.4, 0.6, size=2) if objects else rng.uniform(0.05, 0.95, size=2)
        angle = rng.uniform(0, TWO_PI)
        # Work inside the object's bounding box only.
        reach = _SHAPE_EXTENT * radius
        row0, col0 = (max(0, int(np.floor((c - reach) * size))) for c in (cy, cx))
        row1, col1 = (min(size, int(np.ceil((c + reach) * size))) for c in (cy, cx))
        box = (slice(row0, row1), slice(col0, col1))
        u, v = _rotate(x[box] - cx, y[box] - cy, angle)
        mask = kind.shape(u / radius, v / radius)
        image[box][mask] = _paint(rng, kind, u[mask], v[mask])
        label[box][mask] = kind_id

    # Global brightness/contrast jitter and pixel noise.
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.08, 0.08)
    image = (image - 0.5) * contrast + 0.5 + brightness
    image += np.random.default_rng(rng.integers(2**63)).normal(0.0, 0.02, size=image.shape)
    rgb = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return rgb, label


# --------------------------------------------------------------------------- #
# Dataset on disk
# --------------------------------------------------------------------------- #
def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_synthetic_dataset(root: str | Path, n_train: int, n_val: int, size: int, seed: int,
                            layout: str = "scenes") -> dict:
    """Write a synthetic dataset to ``root`` (PNG images, 'L' label PNGs, meta.json); returns the meta dict.
    ``layout``: see `generate_scene` (meta.json names it when it is not 'scenes').

    Layout: ``root/images/{train,val}/NNNNN.png``, ``root/labels/{train,val}/NNNNN.png``
    and ``root/meta.json``.  Does nothing if ``root/meta.json`` already matches.
    Otherwise builds in a hidden temporary sibling directory and renames it into
    place at the end, so an interrupted run never leaves a complete-looking dataset.
    """
    root = Path(root)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "size": int(size),
        "seed": int(seed),
        "class_names": list(FINE_CLASS_NAMES),
        **({"layout": layout} if layout != "scenes" else {}),
    }
    _check_layout(layout)
    if _read_meta(root / "meta.json") == meta:
        return meta

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    from ..progress import progress
    try:
        for stream, (split, count) in enumerate((("train", n_train), ("val", n_val))):
            img_dir, lab_dir = tmp / "images" / split, tmp / "labels" / split
            img_dir.mkdir(parents=True)
            lab_dir.mkdir(parents=True)
            rng = np.random.default_rng([seed, stream])
            for i in progress(range(count), desc=f"synthetic {split}", unit="img", disable=count == 0):
                rgb, label = generate_scene(rng, size, layout)
                Image.fromarray(rgb).save(img_dir / f"{i:05d}.png", compress_level=1)
                Image.fromarray(label).save(lab_dir / f"{i:05d}.png", compress_level=1)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
