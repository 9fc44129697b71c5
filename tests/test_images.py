"""minivit.images.read_images: the image reader behind minivit predict and minivit attention."""

import sys

import numpy as np
import pytest

from minivit.errors import MinivitError
from minivit.images import image_names, read_images


def save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.mark.parametrize("shape, layout", [
    ((8, 6), lambda a: a[None, None]),
    ((1, 8, 6), lambda a: a[None]),
    ((8, 6, 1), lambda a: a.transpose(2, 0, 1)[None]),
    ((4, 1, 8, 6), lambda a: a),
    ((4, 8, 6, 1), lambda a: a.transpose(0, 3, 1, 2)),
])
def test_npy_layouts(tmp_path, shape, layout):
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    images = read_images(save(tmp_path, "x.npy", array), 1, (8, 6))
    assert images.dtype == np.float32 and images.shape == (layout(array).shape[0], 1, 8, 6)
    np.testing.assert_array_equal(images, layout(array))


def test_npy_rgb_channels_first_or_last(tmp_path):
    rgb = np.random.default_rng(1).random((3, 5, 4)).astype(np.float32)
    first = read_images(save(tmp_path, "chw.npy", rgb), 3, (5, 4))
    last = read_images(save(tmp_path, "hwc.npy", rgb.transpose(1, 2, 0)), 3, (5, 4))
    np.testing.assert_array_equal(first[0], rgb)
    np.testing.assert_array_equal(last[0], rgb)


def test_npy_dtypes(tmp_path):
    u8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_allclose(read_images(save(tmp_path, "u8.npy", u8), 1, (8, 8))[0, 0],
                               u8 / 255.0, rtol=1e-6)
    mask = np.eye(8, dtype=bool)
    np.testing.assert_array_equal(read_images(save(tmp_path, "b.npy", mask), 1, (8, 8))[0, 0],
                                  mask)
    float64 = np.random.default_rng(2).random((8, 8))
    np.testing.assert_allclose(read_images(save(tmp_path, "f.npy", float64), 1, (8, 8))[0, 0],
                               float64, rtol=1e-6)


def test_npy_channels_are_converted(tmp_path):
    grey = np.random.default_rng(3).random((1, 4, 4)).astype(np.float32)
    rgb = read_images(save(tmp_path, "grey.npy", grey), 3, (4, 4))
    assert rgb.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(rgb[0], np.repeat(grey, 3, axis=0))
    colour = np.random.default_rng(4).random((4, 4, 3)).astype(np.float32)
    luma = read_images(save(tmp_path, "rgb.npy", colour), 1, (4, 4))
    np.testing.assert_allclose(luma[0, 0], colour @ np.array([0.299, 0.587, 0.114]), rtol=1e-5)


def test_npy_is_resized_or_cropped(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    array = np.random.default_rng(5).random((1, 16, 12)).astype(np.float32)
    path = save(tmp_path, "big.npy", array)
    resized = read_images(path, 1, (8, 8))
    expected = np.asarray(Image.fromarray(array[0]).resize((8, 8), Image.BICUBIC))
    np.testing.assert_allclose(resized[0, 0], np.clip(expected, 0, 1), rtol=1e-6)
    # center_crop: shorter side (12) to floor(8 / 0.875) = 9, height int(9 * 16 / 12) = 12
    cropped = read_images(path, 1, (8, 8), fit="center_crop")
    expected = np.asarray(Image.fromarray(array[0]).resize((9, 12), Image.BICUBIC))
    np.testing.assert_allclose(cropped[0, 0], np.clip(expected, 0, 1)[2:10, 0:8], rtol=1e-6)
    assert cropped.flags["C_CONTIGUOUS"]


def test_png_and_jpeg(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = (np.random.default_rng(6).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.JPG")
    colour = read_images(tmp_path / "a.png", 3, (8, 8))
    np.testing.assert_allclose(colour[0], rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    grey = read_images(tmp_path / "a.png", 1, (8, 8))
    expected = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    np.testing.assert_allclose(grey[0, 0], expected, rtol=1e-6)
    assert read_images(tmp_path / "a.JPG", 3, (4, 6)).shape == (1, 3, 4, 6)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(MinivitError, match=r"none\.npy: no such file"):
        read_images(tmp_path / "none.npy", 1, (8, 8))
    (tmp_path / "run").mkdir()
    with pytest.raises(MinivitError, match=r"run: is a folder, not an image file; name the "
                                           r"image files in it \(\.npy, \.png, \.jpg, \.jpeg, "
                                           r"\.gif, \.bmp"):
        read_images(tmp_path / "run", 1, (8, 8))
    (tmp_path / "x.h5").write_bytes(b"HDF")
    with pytest.raises(MinivitError, match=r"x\.h5: unsupported file type '\.h5'; expected "
                                           r"\.npy, \.png, \.jpg, \.jpeg, \.gif"):
        read_images(tmp_path / "x.h5", 1, (8, 8))


@pytest.mark.parametrize("suffix", [".gif", ".bmp", ".tif"])
def test_other_formats_pillow_reads(tmp_path, suffix):
    Image = pytest.importorskip("PIL.Image")
    pixels = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(pixels).save(tmp_path / f"a{suffix}")
    grey = read_images(tmp_path / f"a{suffix}", 1, (6, 8))
    np.testing.assert_allclose(grey[0, 0], pixels / 255.0, rtol=1e-6)
    assert read_images(tmp_path / f"a{suffix}", 3, (6, 8)).shape == (1, 3, 6, 8)


@pytest.mark.parametrize("damage", [lambda data: data[:-10], lambda data: data[:40],
                                    lambda data: b"not an array", lambda data: b""],
                         ids=["truncated data", "truncated header", "junk", "empty"])
def test_corrupt_or_truncated_npy(tmp_path, damage):
    path = save(tmp_path, "x.npy", np.zeros((8, 8), np.float32))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MinivitError, match=r"x\.npy: cannot read as \.npy \("):
        read_images(path, 1, (8, 8))


def test_npz_named_npy(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((8, 8)))
    (tmp_path / "x.npz").rename(tmp_path / "x.npy")
    with pytest.raises(MinivitError, match=r"x\.npy: expected one \.npy array, found a \.npz"):
        read_images(tmp_path / "x.npy", 1, (8, 8))


STACK_HINT = "; save a stack of N grey images as (N, 1, H, W)"


@pytest.mark.parametrize("shape, channels, counts, hint", [
    ((64,), 1, "1 or 3", ""),
    ((2, 8, 8), 1, "1 or 3", STACK_HINT),
    ((5, 8, 8), 1, "1 or 3", STACK_HINT),
    ((8, 8, 2), 3, "1 or 3", STACK_HINT),
    ((0, 8, 8), 1, "1 or 3", ""),
    ((1, 1, 1, 8, 8), 1, "1 or 3", ""),
    ((3, 8, 8), 4, "1 or 4", STACK_HINT),
])
def test_wrong_shape(tmp_path, shape, channels, counts, hint):
    path = save(tmp_path, "x.npy", np.zeros(shape, np.float32))
    plural = "s" if channels > 1 else ""
    message = (f"x.npy: expected an image array (H,W), (C,H,W) or (N,C,H,W), channels first or "
               f"last, with C = {counts} (the model takes {channels} channel{plural}); got "
               f"shape {shape}{hint}")
    with pytest.raises(MinivitError) as info:
        read_images(path, channels, (8, 8))
    assert str(info.value).endswith(message)


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 28, 28), (3, 8, 5)])
def test_three_grey_images_or_one_rgb_is_ambiguous_for_a_grey_model(tmp_path, shape):
    path = save(tmp_path, "x.npy", np.zeros(shape, np.float32))
    with pytest.raises(MinivitError) as info:
        read_images(path, 1, shape[1:])
    assert str(info.value).endswith(
        f"x.npy: shape {shape} is ambiguous for a 1-channel model: three grey images, or one "
        "RGB image channels first? Save N grey images as (N, 1, H, W), one RGB image as "
        "(H, W, 3) or (1, 3, H, W)")
    assert read_images(path, 3, shape[1:]).shape == (1, 3) + shape[1:]  # RGB for an RGB model


def test_unambiguous_layouts_of_three_grey_or_one_rgb_image(tmp_path):
    rng = np.random.default_rng(7)
    greys = rng.random((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(read_images(save(tmp_path, "g.npy", greys), 1, (8, 8)), greys)
    rgb = rng.random((3, 8, 8)).astype(np.float32)
    luma = (rgb * np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]).sum(axis=0)
    for name, array in (("hwc.npy", rgb.transpose(1, 2, 0)), ("nchw.npy", rgb[None])):
        images = read_images(save(tmp_path, name, array), 1, (8, 8))
        assert images.shape == (1, 1, 8, 8)
        np.testing.assert_allclose(images[0, 0], luma, rtol=1e-6)


@pytest.mark.parametrize("value, found", [(3.0, "found 0 to 3"), (-0.5, "found -0.5 to 0"),
                                          (np.nan, "found nan to nan"), (300, "found 0 to 300")])
def test_out_of_range_values(tmp_path, value, found):
    array = np.zeros((8, 8), np.float64 if isinstance(value, float) else np.int32)
    array[0, 0] = value
    path = save(tmp_path, "x.npy", array)
    with pytest.raises(MinivitError, match=r"x\.npy: pixel values must lie in \[0, 1\] \(or be "
                                           r"uint8 0\.\.255\); " + found):
        read_images(path, 1, (8, 8))


def test_non_numeric_npy(tmp_path):
    path = save(tmp_path, "x.npy", np.full((8, 8), "a"))
    with pytest.raises(MinivitError, match=r"x\.npy: expected numeric pixels, got dtype <U1"):
        read_images(path, 1, (8, 8))


@pytest.mark.parametrize("channels, size", [(1, (8, 8)), (3, (8, 8)), (3, (6, 6))])
def test_16_bit_png_reads_at_full_range(tmp_path, channels, size):
    Image = pytest.importorskip("PIL.Image")
    wide = (np.random.default_rng(8).random((8, 8)) * 65535).round().astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "16.png")
    Image.fromarray((wide / 257).round().astype(np.uint8)).save(tmp_path / "8.png")
    with Image.open(tmp_path / "16.png") as image:
        assert image.mode == "I;16"
    images = read_images(tmp_path / "16.png", channels, size)
    assert images.dtype == np.float32 and images.shape == (1, channels) + size
    np.testing.assert_allclose(images, read_images(tmp_path / "8.png", channels, size),
                               atol=1 / 255)
    if size == (8, 8):
        np.testing.assert_allclose(images[0], np.repeat(wide[None] / 65535, channels, axis=0),
                                   rtol=1e-6)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16_bit_byte_orders(tmp_path, mode):
    Image = pytest.importorskip("PIL.Image")
    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    order = ">u2" if mode.endswith("B") else "<u2"
    Image.frombytes(mode, (8, 8), wide.astype(order).tobytes()).save(tmp_path / "x.tiff")
    (tmp_path / "x.tiff").rename(tmp_path / "x.png")  # Pillow reads the content, not the name
    np.testing.assert_allclose(read_images(tmp_path / "x.png", 1, (8, 8))[0, 0], wide / 65535,
                               rtol=1e-6)


def test_32_bit_images(tmp_path):
    """Mode "I" (as 16-bit PNGs open in older Pillow) and "F", here TIFFs named .png."""
    Image = pytest.importorskip("PIL.Image")
    wide = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000
    floats = np.random.default_rng(9).random((8, 8)).astype(np.float32)
    for name, array in (("i.png", wide), ("f.png", floats)):
        Image.fromarray(array).save(tmp_path / name, format="TIFF")
    np.testing.assert_allclose(read_images(tmp_path / "i.png", 1, (8, 8))[0, 0], wide / 65535,
                               rtol=1e-6)
    np.testing.assert_allclose(read_images(tmp_path / "f.png", 3, (8, 8))[0],
                               np.repeat(floats[None], 3, axis=0))
    instead = r" \(save it as an 8- or 16-bit PNG, or as a \.npy array in \[0, 1\]\)"
    Image.fromarray(wide * 100).save(tmp_path / "big.png", format="TIFF")
    with pytest.raises(MinivitError, match=r"big\.png: expected 16-bit values 0\.\.65535 in a "
                                           r"32-bit integer image \(mode I\), found 0 to "
                                           r"6300000" + instead):
        read_images(tmp_path / "big.png", 1, (8, 8))
    Image.fromarray(floats * 255).save(tmp_path / "f255.png", format="TIFF")
    with pytest.raises(MinivitError, match=r"f255\.png: float pixels \(mode F\) must lie in "
                                           r"\[0, 1\]; found [\d.]+ to [\d.]+" + instead):
        read_images(tmp_path / "f255.png", 1, (8, 8))


def test_bad_png(tmp_path):
    pytest.importorskip("PIL.Image")
    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(MinivitError, match=r"x\.png: cannot read the image \("):
        read_images(tmp_path / "x.png", 1, (8, 8))
    with pytest.raises(MinivitError, match="image files need a 1- or 3-channel model"):
        read_images(tmp_path / "x.png", 2, (8, 8))


def test_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    path = save(tmp_path, "big.npy", np.zeros((16, 16), np.float32))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MinivitError, match=r"x\.png: reading \.png images needs Pillow: "
                                           r"pip install 'minivit\[images\]' \(or give a "
                                           r"\.npy array\)"):
        read_images(tmp_path / "x.png", 1, (8, 8))
    with pytest.raises(MinivitError, match=r"big\.npy: resizing a 16x16 image to 8x8 needs "
                                           r"Pillow: pip install 'minivit\[images\]' \(or save "
                                           r"it at 8x8\)"):
        read_images(path, 1, (8, 8))
    assert read_images(path, 1, (16, 16)).shape == (1, 1, 16, 16)  # no resize, no Pillow


def test_image_names():
    assert image_names("a.npy", 1) == ["a.npy"]
    assert image_names("a.npy", 3) == ["a.npy[0]", "a.npy[1]", "a.npy[2]"]
    assert image_names("a", 2, "_{}") == ["a_0", "a_1"]
