"""Image files as model inputs: .npy arrays, and PNG/JPEG/GIF/BMP/... through Pillow (optional).

`read_images` is the one reader behind `minivit predict` and `minivit attention`: it gives
(N, C, H, W) float32 arrays in [0, 1] at a model's channels and image size.

- .npy: (H, W), (C, H, W) or a batch (N, C, H, W), channels first or last; float (or bool)
  values in [0, 1], or uint8 in 0..255. Anything else is refused with the shape or range found.
  A stack of grey images is (N, 1, H, W): for a 1-channel model (3, H, W) could be three grey
  images or one RGB image, and is refused as ambiguous.
- PNG/JPEG/GIF/BMP/TIFF/WebP: one image (a GIF's first frame), converted by Pillow to "L"
  (1-channel models) or "RGB" (3 channels);
  16-bit grey PNGs ("I;16", "I" in 0..65535) are read at their full range (/ 65535).
- Channels: a grey image is repeated for an RGB model; an RGB array becomes grey (ITU-R 601
  luma, as Pillow's "L") for a 1-channel model.
- Size: "resize" (bicubic to the model's size) or "center_crop" (timm's ImageNet evaluation:
  the shorter side to size / 0.875, then the centre). Resizing needs Pillow, arrays too.
"""

import math
from pathlib import Path

import numpy as np

from minivit.errors import MinivitError

__all__ = ["IMAGE_SUFFIXES", "SUFFIXES", "CROP_PCT", "FITS", "read_images", "image_names"]

# the image formats Pillow reads (a GIF: its first frame)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
SUFFIXES = (".npy",) + IMAGE_SUFFIXES
CROP_PCT = 0.875
FITS = ("resize", "center_crop")
PILLOW_HINT = "needs Pillow: pip install 'minivit[images]'"
LAYOUTS = "(H,W), (C,H,W) or (N,C,H,W), channels first or last"


def read_images(path, channels, size, fit="resize"):
    """(N, C, H, W) float32 in [0, 1]: the image(s) of one .npy, PNG or JPEG file with
    `channels` channels at size (H, W) = `size`; `fit` is "resize" or "center_crop"."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    path = Path(path)
    size = tuple(size)
    if path.is_dir():
        raise MinivitError(f"{path}: is a folder, not an image file; name the image files in it "
                           f"({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise MinivitError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        images = list(_read_npy(path, channels))
    elif suffix in IMAGE_SUFFIXES:
        images = [_read_image(path, channels)]
    else:
        raise MinivitError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected "
                           f"{', '.join(SUFFIXES)}")
    fit_size = _resize if fit == "resize" else _resize_and_crop
    return np.stack([_as_unit_array(fit_size(image, size, path)) for image in images])


def image_names(name, count, index="[{}]"):
    """Names of the `count` images of a file called `name`: the name alone for one image,
    else the name with `index` (formatted with 0, 1, ...) appended."""
    return [name] if count == 1 else [f"{name}{index.format(i)}" for i in range(count)]


# -- .npy ----------------------------------------------------------------------------------------
def _read_npy(path, channels):
    """(N, channels, H, W) float32 in [0, 1] from an .npy array."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise MinivitError(f"{path}: cannot read as .npy ({err})") from None
    if not isinstance(array, np.ndarray):  # np.load opens a zip (.npz) whatever its name
        array.close()
        raise MinivitError(f"{path}: expected one .npy array, found a .npz archive")
    array = _channels_first(array, channels, path)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255)
    elif array.dtype.kind not in "fiub":
        raise MinivitError(f"{path}: expected numeric pixels, got dtype {array.dtype}")
    else:
        array = _unit_range(array, path, "pixel values must lie in [0, 1] (or be uint8 0..255)")
    return _match_channels(array, channels)


def _unit_range(array, path, rule, hint=""):
    """float32 `array` clipped to [0, 1]; an error (`rule`, the range found, `hint`) if it holds
    values outside (beyond rounding) or NaN/inf."""
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-6 or high > 1 + 1e-6:
        raise MinivitError(f"{path}: {rule}; found {low:g} to {high:g}{hint}")
    return np.clip(array, 0.0, 1.0)


def _channels_first(array, channels, path):
    """(N, C, H, W) from (H, W), (C, H, W), (H, W, C), (N, C, H, W) or (N, H, W, C), where C is
    one `_match_channels` can convert to `channels`. For a 1-channel model, (3, H, W) with W not
    a channel count is refused: three grey images, or one RGB image?"""
    usable = sorted({1, channels} | ({3} if channels == 1 else set()))
    if array.ndim in (2, 3, 4) and 0 not in array.shape:
        batch = array.reshape((1,) * (4 - array.ndim) + array.shape)
        if array.ndim == 3 and channels == 1 and array.shape[0] == 3 \
                and array.shape[2] not in usable:
            raise MinivitError(f"{path}: shape {array.shape} is ambiguous for a 1-channel model: "
                               "three grey images, or one RGB image channels first? Save N grey "
                               "images as (N, 1, H, W), one RGB image as (H, W, 3) or "
                               "(1, 3, H, W)")
        if batch.shape[1] in usable:
            return batch
        if batch.shape[3] in usable:
            return batch.transpose(0, 3, 1, 2)
    counts = " or ".join(str(c) for c in usable)
    stack = array.ndim == 3 and array.size > 0
    hint = "; save a stack of N grey images as (N, 1, H, W)" if stack else ""
    raise MinivitError(f"{path}: expected an image array {LAYOUTS}, with C = {counts} (the model "
                       f"takes {channels} channel{'s' * (channels != 1)}); got shape "
                       f"{array.shape}{hint}")


def _match_channels(images, channels):
    """(N, C, H, W) arrays with `channels` channels: grey repeated to RGB, RGB to grey (ITU-R 601
    luma, as Pillow's "L")."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return np.repeat(images, channels, axis=1)
    luma = np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]
    return (images * luma).sum(axis=1, keepdims=True)


# -- PNG, JPEG, GIF, BMP, ... -------------------------------------------------------------------
def _pillow(path, doing, instead):
    """PIL.Image, or an error saying what needs it, how to install it and what to do instead."""
    try:
        from PIL import Image
    except ImportError:
        raise MinivitError(f"{path}: {doing} {PILLOW_HINT} (or {instead})") from None
    return Image


def _read_image(path, channels):
    """A Pillow image in mode "L" (1 channel) or "RGB" (3 channels); a 16-bit or 32-bit one
    (modes "I;16", "I", "F", which Pillow's "L" would clip at 255) as a (channels, H, W) array
    in [0, 1]."""
    Image = _pillow(path, f"reading {path.suffix} images", "give a .npy array")
    if channels not in (1, 3):
        raise MinivitError(f"{path}: the model takes {channels} channels; image files need "
                           "a 1- or 3-channel model (give .npy arrays instead)")
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode.split(";")[0] not in ("I", "F"):
                return image.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(image)
    except (OSError, ValueError) as err:
        raise MinivitError(f"{path}: cannot read the image ({err})") from None
    return _match_channels(_wide_pixels(pixels, mode, path)[None, None], channels)[0]


def _wide_pixels(pixels, mode, path):
    """(H, W) float32 in [0, 1] from a Pillow image of integers in 0..65535 (16-bit PNGs open
    as "I;16", or "I" in older Pillow) or of floats in [0, 1] ("F")."""
    instead = " (save it as an 8- or 16-bit PNG, or as a .npy array in [0, 1])"
    if pixels.dtype.kind == "f":
        return _unit_range(pixels, path, f"float pixels (mode {mode}) must lie in [0, 1]",
                           instead)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise MinivitError(f"{path}: expected 16-bit values 0..65535 in a 32-bit integer image "
                           f"(mode {mode}), found {low} to {high}{instead}")
    return pixels.astype(np.float32) / np.float32(65535)


# -- size ----------------------------------------------------------------------------------------
def _image_size(image):
    """(width, height) of a Pillow image or a (C, H, W) array."""
    return image.size if not hasattr(image, "ndim") else (image.shape[2], image.shape[1])


def _resize(image, size, path):
    """Bicubic resize to (height, width) = size; arrays go through Pillow channel by channel
    (mode "F"), so they stay float."""
    height, width = size
    w, h = _image_size(image)
    if (w, h) == (width, height):
        return image
    Image = _pillow(path, f"resizing a {h}x{w} image to {height}x{width}",
                    f"save it at {height}x{width}")
    if not hasattr(image, "ndim"):
        return image.resize((width, height), Image.BICUBIC)
    planes = [np.asarray(Image.fromarray(plane).resize((width, height), Image.BICUBIC))
              for plane in np.ascontiguousarray(image, dtype=np.float32)]
    return np.clip(np.stack(planes), 0.0, 1.0)


def _resize_and_crop(image, size, path):
    """timm's ImageNet evaluation transform: resize the shorter side to size/0.875 keeping the
    aspect ratio (as torchvision's Resize(int)), then crop the centre (as CenterCrop)."""
    height, width = size
    scale = math.floor(max(size) / CROP_PCT)
    w, h = _image_size(image)
    if (w, h) != (width, height):
        if w <= h:
            new_w, new_h = scale, int(scale * h / w)
        else:
            new_w, new_h = int(scale * w / h), scale
        image = _resize(image, (new_h, new_w), path)
        w, h = new_w, new_h
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    if hasattr(image, "ndim"):
        return image[:, top:top + height, left:left + width]
    return image.crop((left, top, left + width, top + height))


def _as_unit_array(image):
    """(C, H, W) float32 in [0, 1] from a Pillow image or an array."""
    if hasattr(image, "ndim"):
        return np.ascontiguousarray(image, dtype=np.float32)
    array = np.asarray(image, dtype=np.float32) / np.float32(255)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
