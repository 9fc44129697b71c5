"""Image folders: the reader on a hostile generated tree, the split rules, the transforms."""

import os

import numpy as np
import pytest

from minivit.data.folder import load_image_folder, open_image, skipped_files_report
from minivit.data.pipeline import FolderImages, folder_normalization
from minivit.errors import DatasetError

Image = pytest.importorskip("PIL.Image")


def _rgb(seed, size=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_tree(root):
    """train/ and val/ with: classes 'cat' (nested folders, PNG/JPEG/BMP/GIF), 'dög' (Unicode,
    grey, RGBA, palette, 16-bit), corrupt, truncated and zero-byte files, a symlink loop, non-image
    files, a hidden folder. Returns the paths of the bad files."""
    bad = []
    for split in ("train", "val"):
        cat, dog = root / split / "cat", root / split / "dög"
        (cat / "nested" / "deeper").mkdir(parents=True)
        dog.mkdir(parents=True)
        (root / split / ".hidden").mkdir()
        Image.fromarray(_rgb(1)).save(cat / "a.png")
        Image.fromarray(_rgb(2)).save(cat / "nested" / "b.jpg", quality=90)
        Image.fromarray(_rgb(3)).save(cat / "nested" / "deeper" / "c.bmp")
        Image.fromarray(_rgb(4)).convert("P").save(cat / "d.gif")
        Image.fromarray(_rgb(5)[..., 0]).save(dog / "grey.png")
        Image.fromarray(np.dstack([_rgb(6), np.full((10, 12), 128, np.uint8)])).save(
            dog / "rgba.png")
        Image.fromarray(_rgb(7)).quantize(8).save(dog / "palette.png")
        Image.fromarray((_rgb(8)[..., 0].astype(np.uint16) * 257)).save(dog / "wide16.png")
        Image.fromarray(_rgb(9)).save(dog / "ünïcødé 名前.png")
        (dog / "notes.txt").write_text("not an image")
        (dog / "labels.csv").write_text("a,b\n")
        (dog / "empty.png").write_bytes(b"")
        (dog / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        whole = (cat / "a.png").read_bytes()
        (cat / "truncated.png").write_bytes(whole[:len(whole) // 2])
        os.symlink(cat, cat / "nested" / "loop")  # cat/nested/loop -> cat: a cycle
        bad += [dog / "empty.png", dog / "garbage.jpg", cat / "truncated.png"]
    return bad


def test_reader_on_a_hostile_tree(tmp_path):
    bad = write_tree(tmp_path)
    splits = load_image_folder(tmp_path, workers=2)
    train, val = splits["train"], splits["test"]
    assert train.class_names == ["cat", "dög"] == val.class_names  # sorted; hidden left out
    names = sorted(os.path.relpath(p, tmp_path / "train") for p in train.paths)
    assert names == sorted(["cat/a.png", "cat/nested/b.jpg", "cat/nested/deeper/c.bmp",
                            "cat/d.gif", "dög/grey.png", "dög/rgba.png", "dög/palette.png",
                            "dög/wide16.png", "dög/ünïcødé 名前.png"])
    assert list(train.labels) == [0 if p.startswith(str(tmp_path / "train" / "cat")) else 1
                                  for p in train.paths]
    assert sorted(path for path, _ in train.skipped + val.skipped) == sorted(map(str, bad))
    assert "empty file" in dict(train.skipped)[str(tmp_path / "train" / "dög" / "empty.png")]
    report = skipped_files_report(train.skipped, limit=2)
    assert report[0].startswith("skipping 3 unreadable") and report[-1] == "  ... and 1 more"
    with pytest.raises(DatasetError, match=r"3 image file\(s\) cannot be read: .*truncated.png"):
        load_image_folder(tmp_path, strict=True)
    for path in (tmp_path / "val" / "dög").iterdir():  # only unreadable files left in a class
        if path.suffix == ".png" and path.stat().st_size:
            path.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"class folder\(s\) dög of the test split .* no "
                                           r"readable image"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_to_the_model_channels(tmp_path, channels):
    write_tree(tmp_path)
    split = load_image_folder(tmp_path)["train"]
    source = FolderImages(split.paths, channels, 8, train=False, crop_pct=1.0)
    batch = source(np.arange(len(split)), np.random.default_rng(0))
    assert batch.shape == (len(split), channels, 8, 8) and batch.dtype == np.float32
    assert 0 <= batch.min() and batch.max() <= 1
    wide = split.paths.index(str(tmp_path / "train" / "dög" / "wide16.png"))
    assert batch[wide].max() > 0.5  # 16-bit values scaled, not clipped at 255/65535


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, :, 0] = 255  # a red top row in the stored (landscape) pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    image = open_image(tmp_path / "rotated.png", 3)
    assert image.size == (4, 6)  # displayed as portrait
    shown = np.asarray(image)
    assert (shown[:, -1, 0] == 255).all() and (shown[:, :-1, 0] == 0).all()  # top row -> right


def test_split_by_fraction_is_seeded_and_stratified(tmp_path):
    for name, count in (("a", 10), ("b", 5)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(_rgb(i)).save(tmp_path / name / f"{i}.png")
    first = load_image_folder(tmp_path, val_fraction=0.2, split_seed=3)
    again = load_image_folder(tmp_path, val_fraction=0.2, split_seed=3)
    other = load_image_folder(tmp_path, val_fraction=0.2, split_seed=4)
    assert first["test"].paths == again["test"].paths != other["test"].paths
    assert list(np.bincount(first["test"].labels)) == [2, 1]
    assert not set(first["train"].paths) & set(first["test"].paths)
    assert len(first["train"]) + len(first["test"]) == 15


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-dir DIR"):
        load_image_folder(None)
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(DatasetError, match=r"no .*val\|test folder.*--val-fraction"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="already has a train/ folder"):
        load_image_folder(tmp_path, val_fraction=0.2)
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "b").mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(tmp_path / "val" / "a" / "x.png")
    with pytest.raises(DatasetError, match=r"class folder .*val/b holds no image files"):
        load_image_folder(tmp_path)
    Image.fromarray(_rgb(0)).save(tmp_path / "val" / "b" / "x.png")
    with pytest.raises(DatasetError, match=r"different class folders \(in one only: b\)"):
        load_image_folder(tmp_path)


def test_train_crops_vary_and_eval_crop_is_fixed(tmp_path):
    Image.fromarray(_rgb(0, size=(40, 30))).save(tmp_path / "x.png")
    paths = [str(tmp_path / "x.png")] * 4
    train = FolderImages(paths, 3, 16, train=True, crop_pct=1.0)(range(4), np.random.default_rng(0))
    assert len({array.tobytes() for array in train}) == 4
    evaluate = FolderImages(paths, 3, 16, train=False, crop_pct=0.875)
    first, second = (evaluate(range(2), np.random.default_rng(seed)) for seed in (0, 1))
    np.testing.assert_array_equal(first, second)
    assert first.shape == (2, 3, 16, 16)


def test_normalization_follows_the_model_size():
    assert folder_normalization(None, 224, 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert folder_normalization(None, 32, 3) == ((0.5,) * 3, (0.5,) * 3)
    assert folder_normalization("inception", 224, 1) == ((0.5,), (0.5,))
