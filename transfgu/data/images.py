"""Image and label files: decoding to fixed-size tensors, and collecting image files from paths, folders
and glob patterns."""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..devices import to_device
from ..errors import InputFileNotFound, InputOSError, InputValueError
from .adapters import IMAGE_EXTENSIONS
from .labels import INVALID


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and 32-bit grayscale are rescaled by their type's range, palette
    and RGBA images converted (alpha dropped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im)
        im = Image.fromarray(np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).astype(np.uint8))
    return im.convert("RGB")


MAT_EXTENSION = ".mat"  # MATLAB files of Potsdam: key "img" (H x W x C, first 3 channels RGB) or "gt" (H x W)


def load_mat(path: Path, key: str) -> np.ndarray:
    """The array under `key` of a MATLAB .mat file (scipy.io.loadmat)."""
    from scipy.io import loadmat
    try:
        data = loadmat(path)
    except Exception as e:  # noqa: BLE001 (a damaged file makes scipy raise anything: IndexError, MatReadError...)
        raise InputOSError(f"cannot read {path}: {e}") from e
    if key not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise InputOSError(f"cannot read {path}: no key '{key}' (keys: {keys})")
    return np.asarray(data[key])


def _mat_image(path: Path) -> Image.Image:
    """A .mat image (key "img", H x W x C with RGB first, e.g. Potsdam's RGB + infrared) as an 8-bit RGB image."""
    a = load_mat(path, "img")
    if a.ndim != 3 or a.shape[2] < 3:
        raise InputOSError(f"cannot read image {path}: expected an H x W x C array with C >= 3 under 'img', got shape "
                           f"{a.shape}")
    a = a[:, :, :3]
    if a.dtype != np.uint8:  # floats in [0, 1] scaled, others clipped to 0..255
        scale = 255 if a.dtype.kind == "f" and a.max() <= 1 else 1
        a = np.clip(a.astype(np.float64) * scale + (0.5 if scale > 1 else 0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def shorter_side_center_crop(im: Image.Image, size: int) -> Image.Image:
    """STEGO's val transform (evaluate.protocol: stego; docs/method.md, "STEGO's evaluation protocol"), for images
    and labels alike: torchvision's `Resize(size, Image.NEAREST)` (the shorter side to `size`, the other to
    int(size * long / short), nearest neighbour), then `CenterCrop(size)` (offsets int(round((side - size) / 2)))."""
    w, h = im.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.NEAREST)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def fit(im: Image.Image, size: int, protocol: str, resample) -> Image.Image:
    """An image or label at (size, size) as `protocol` reads it: "transfgu" resizes it square (aspect not kept)
    with `resample`; "stego" is shorter_side_center_crop."""
    if protocol == "stego":
        return shorter_side_center_crop(im, size)
    if protocol != "transfgu":
        raise ValueError(f"unknown protocol {protocol!r}")
    return im.resize((size, size), resample)


def load_rgb(path: Path, size: int, protocol: str = "transfgu") -> torch.Tensor:
    """An image file as uint8 (3, size, size), resized bilinearly (aspect not kept; `protocol` "stego":
    shorter_side_center_crop)."""
    if Path(path).suffix.lower() == MAT_EXTENSION:
        im = fit(_mat_image(path), size, protocol, Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    try:
        with Image.open(path) as im:
            im = fit(to_rgb(im), size, protocol, Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise InputOSError(f"cannot read image {path}: {e}") from e


JPEG_EXTENSIONS = (".jpg", ".jpeg")


def read_bytes(path: Path) -> np.ndarray:
    """A file's bytes as a uint8 array (what `decode_resize` takes), for workers that only read. A numpy array
    and not a tensor: a DataLoader worker sends each tensor of a batch through a shared-memory file of its own
    (one file descriptor per image), while arrays are pickled into the batch's one message."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise InputOSError(f"cannot read image {path}: {e}") from e


def decode_resize(jpegs: list[np.ndarray], size: int, device) -> torch.Tensor:
    """JPEG files' bytes (`read_bytes`) -> uint8 (B, 3, size, size) on `device`: decoded there (nvJPEG on a GPU,
    libjpeg on the CPU) and resized bilinearly with antialiasing (aspect not kept), images of one shape together.
    Within about one grey level of `load_rgb` (PIL's decoder and filter differ in rounding)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    try:
        decoded = decode_jpeg([torch.from_numpy(j) for j in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        raise InputOSError(f"cannot decode a JPEG of this batch on {device}: {e}") from e
    out = torch.empty(len(decoded), 3, size, size, dtype=torch.uint8, device=device)
    shapes: dict[tuple, list[int]] = {}
    for i, img in enumerate(decoded):
        shapes.setdefault(tuple(img.shape), []).append(i)
    for idx in shapes.values():
        x = torch.stack([decoded[i] for i in idx]).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[to_device(torch.tensor(idx), device)] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_label(path: Path, size: int, lut: np.ndarray, protocol: str = "transfgu") -> torch.Tensor:
    """A label PNG (8 or 16 bit, gray or palette indices), or a .mat label (key "gt", Potsdam), mapped through lut
    and resized (nearest) to (size, size), int64 (`protocol` "stego": shorter_side_center_crop). A value the
    dataset never uses is an error naming the file and the value."""
    if Path(path).suffix.lower() == MAT_EXTENSION:  # key "gt": an H x W integer array
        a = load_mat(path, "gt")
        if a.ndim != 2 or a.dtype.kind not in "iu":
            raise InputOSError(f"cannot read label {path}: expected an H x W integer array under 'gt', got "
                               f"{a.dtype} {a.shape}")
        raw = np.asarray(fit(Image.fromarray(a.astype(np.int32), "I"), size, protocol, Image.NEAREST))
        return _mapped(path, raw.astype(np.int64), lut)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise OSError(f"label maps must be single-channel (L, P or 16-bit), got mode {im.mode}")
            raw = np.asarray(fit(im, size, protocol, Image.NEAREST)).astype(np.int64)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise InputOSError(f"cannot read label {path}: {e}") from e
    return _mapped(path, raw, lut)


def _mapped(path: Path, raw: np.ndarray, lut: np.ndarray) -> torch.Tensor:
    if raw.min() < 0 or raw.max() >= len(lut):
        raise InputValueError(f"{path}: label value {int(raw.min() if raw.min() < 0 else raw.max())} is outside "
                         f"the dataset's label map")
    mapped = lut[raw]
    if (mapped == INVALID).any():
        value = int(raw[mapped == INVALID][0])
        raise InputValueError(f"{path}: label value {value} is not a class of this dataset (nor an ignore value)")
    return torch.from_numpy(mapped.astype(np.int64))


def unreadable(path: Path) -> str | None:
    """Why an image file cannot be decoded, or None when it can."""
    try:
        load_rgb(path, 8)
        return None
    except OSError as e:
        return str(e)


def collect_images(inputs) -> list[Path]:
    """Image files named by paths, folders (recursive) and glob patterns, in order, without repeats."""
    found = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise InputFileNotFound(f"no file matches {item!r}")
            found += [p for p in matches if p.is_file()]
        elif Path(item).is_dir():
            found += sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise InputFileNotFound(f"{item}: no such image, folder or pattern")
    seen, out = set(), []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    if not out:
        raise InputFileNotFound(f"no images found in {list(inputs)}")
    return out


class ImageFiles(torch.utils.data.Dataset):
    """Image files as {"index", "image": uint8 (3, size, size) resized bilinearly (aspect not kept),
    "height", "width": the file's own size}."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.paths[i]) as im:
            w, h = im.size
        return {"index": i, "image": load_rgb(self.paths[i], self.size), "height": h, "width": w}
