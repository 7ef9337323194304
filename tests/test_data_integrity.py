"""Data integrity: fingerprints that notice replaced images, symbolic links that cannot loop or dangle,
unreadable folders, high-bit-depth images scaled to 8 bits, and images too large for Pillow."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from dataloaders import DatasetConfig, ImageDataset, build_dataset
from dataloaders.base import BrokenImageError
from dataloaders.folders import FLAT_FOLDER_MEMBERSHIP
from errors import UserError
from tests.datagen import (random_pixels, write_bitmaps, write_class_folders, write_class_index_folders,
                           write_flat_folder, write_png16, write_svhn)

FOLDER_FORMATS = ["class_folders", "class_index_folders", "flat_folder"]
LONG_AGO_NS = 1_500_000_000 * 10**9  # 2017: the mtime of files that have sat in a data root for years


def load(root: Path, format_name: str, folder: str = "data", **options) -> ImageDataset:
    """One split, read as the pipeline reads a dataset YAML with this format and these options."""
    config = DatasetConfig(name="integrity", format=format_name, splits={"test": folder}, options=options)
    return build_dataset(config, "test", root, transform=None)


def words(error: pytest.ExceptionInfo) -> list[str]:
    """The error message's words: a path among them is named itself, not only as the start of a longer path."""
    return str(error.value).split()


def pixels(dataset: ImageDataset, index: int) -> np.ndarray:
    return np.asarray(dataset[index][0])


def write_format(root: Path, format_name: str) -> Path:
    """A small tree of `format_name` under root/data; returns one image file in it."""
    if format_name == "class_folders":
        return write_class_folders(root / "data", ["a", "b"], per_class=2)[0]
    if format_name == "class_index_folders":
        return write_class_index_folders(root / "data", num_classes=2, per_class=2)[0]
    return write_flat_folder(root / "data", count=4, with_junk=False)[0][0]


# ---- 1. fingerprints: the default (size + mtime) and the content fingerprint (every byte) -----------------

@pytest.fixture
def bitmaps(tmp_path) -> list[Path]:
    """Class folders of uncompressed BMPs (all the same byte count), last modified long ago."""
    paths = write_bitmaps([tmp_path / "data" / name / f"{i}.bmp" for name in ("a", "b") for i in range(3)])
    for path in paths:
        os.utime(path, ns=(LONG_AGO_NS, LONG_AGO_NS))
    return paths


def replace_keeping_size(path: Path, seed: int) -> None:
    """Write other pixels into `path`: a new file of exactly the same byte count."""
    size = path.stat().st_size
    write_bitmaps([path], seed=seed)
    assert path.stat().st_size == size


def fingerprints(root: Path) -> tuple[str, str]:
    """(default fingerprint, content fingerprint) of root/data read as class folders, computed now."""
    dataset = load(root, "class_folders")
    return dataset.fingerprint(), dataset.content_fingerprint()


def test_same_size_replacement_changes_both_fingerprints(tmp_path, bitmaps):
    old_pixels = pixels(load(tmp_path, "class_folders"), 4)
    stat_before, content_before = fingerprints(tmp_path)
    replace_keeping_size(bitmaps[4], seed=1)
    stat_after, content_after = fingerprints(tmp_path)
    assert not np.array_equal(pixels(load(tmp_path, "class_folders"), 4), old_pixels)
    assert stat_after != stat_before and content_after != content_before


def test_touching_a_file_changes_the_default_fingerprint_but_not_the_content_one(tmp_path, bitmaps):
    stat_before, content_before = fingerprints(tmp_path)
    os.utime(bitmaps[0], ns=(LONG_AGO_NS, LONG_AGO_NS + 1))  # one nanosecond later
    stat_after, content_after = fingerprints(tmp_path)
    assert stat_after != stat_before and content_after == content_before


def test_content_fingerprint_catches_a_replacement_that_keeps_size_and_mtime(tmp_path, bitmaps):
    stat_before, content_before = fingerprints(tmp_path)
    replace_keeping_size(bitmaps[2], seed=2)
    os.utime(bitmaps[2], ns=(LONG_AGO_NS, LONG_AGO_NS))  # as `cp -p` or `tar x` of another archive would
    stat_after, content_after = fingerprints(tmp_path)
    assert stat_after == stat_before  # the default fingerprint cannot see this: documented
    assert content_after != content_before


def test_content_fingerprint_of_rows_covers_those_rows_only_and_survives_subsets(tmp_path, bitmaps):
    dataset = load(tmp_path, "class_folders")
    rows = [5, 0, 3]
    subset = dataset.subset(np.array(rows))
    of_rows, of_row_1, of_subset = (dataset.content_fingerprint(rows), dataset.content_fingerprint([1]),
                                    subset.fingerprint())
    assert subset.content_fingerprint() == of_rows
    assert dataset.content_fingerprint(range(len(dataset))) == dataset.content_fingerprint()
    assert dataset.content_fingerprint([0, 3]) != dataset.content_fingerprint([3, 0])  # row order counts

    replace_keeping_size(bitmaps[1], seed=3)  # row 1: outside `rows`
    reloaded = load(tmp_path, "class_folders")
    assert reloaded.content_fingerprint(rows) == of_rows and reloaded.content_fingerprint([1]) != of_row_1
    assert reloaded.subset(np.array(rows)).fingerprint() == of_subset  # a subset stats its own files only


def test_fingerprints_do_not_depend_on_the_order_the_os_lists_files(tmp_path, bitmaps, monkeypatch):
    in_os_order = load(tmp_path, "class_folders")
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: list(reversed(list(scandir(path)))))
    reversed_order = load(tmp_path, "class_folders")
    assert reversed_order.image_ids == in_os_order.image_ids
    assert reversed_order.fingerprint() == in_os_order.fingerprint()
    assert reversed_order.content_fingerprint() == in_os_order.content_fingerprint()


def test_a_file_gone_after_listing_is_fingerprinted_then_reported_as_broken(tmp_path, bitmaps):
    stat_before, content_before = fingerprints(tmp_path)
    dataset = load(tmp_path, "class_folders")
    bitmaps[0].unlink()
    assert dataset.fingerprint() != stat_before and dataset.content_fingerprint() != content_before
    with pytest.raises(BrokenImageError, match=re.escape(str(bitmaps[0]))):
        dataset[0]


def test_array_content_fingerprint_hashes_pixels(tmp_path):
    write_svhn(tmp_path / "data", "test", count=6, seed=0)
    first = load(tmp_path, "svhn")  # arrays are read into memory: later writes do not change this one
    write_svhn(tmp_path / "data", "test", count=6, seed=1)
    assert load(tmp_path, "svhn").content_fingerprint() != first.content_fingerprint()
    assert first.subset(np.array([2, 4])).content_fingerprint() == first.content_fingerprint([2, 4])


# ---- 2. symbolic links: loops and dangling links stop the listing; farms of links work ----------------------

def test_link_loop_in_a_class_folder_is_a_user_error(tmp_path):
    write_class_folders(tmp_path / "data", ["a"], per_class=4)
    (tmp_path / "data/a/again").symlink_to(".")
    # What torchvision's make_dataset (os.walk with followlinks=True) lists from the same tree:
    assert len(make_dataset(str(tmp_path / "data"), {"a": 0}, extensions=IMG_EXTENSIONS)) > 4
    with pytest.raises(UserError) as error:
        load(tmp_path, "class_folders")
    assert str(tmp_path / "data/a/again") in words(error) and str(tmp_path / "data/a") in words(error)


@pytest.mark.parametrize("format_name, link, target", [
    ("class_folders", "a/deeper/up", "../.."),        # a link to the dataset folder, two levels down
    ("class_index_folders", "2", "."),                # a class folder that is the dataset folder itself
])
def test_link_to_an_ancestor_is_a_loop(tmp_path, format_name, link, target):
    write_format(tmp_path, format_name)
    (tmp_path / "data" / link).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / link).symlink_to(target)
    with pytest.raises(UserError) as error:
        load(tmp_path, format_name)
    assert str(tmp_path / "data" / link) in words(error) and str(tmp_path / "data") in words(error)  # link, ancestor


@pytest.mark.parametrize("format_name, link, target", [
    ("class_folders", "c", "a"),              # class c would repeat class a's images with another label
    ("class_index_folders", "5", "0"),
])
def test_two_links_to_one_folder_are_a_user_error(tmp_path, format_name, link, target):
    write_format(tmp_path, format_name)
    (tmp_path / "data" / link).symlink_to(target)
    with pytest.raises(UserError) as error:
        load(tmp_path, format_name)
    assert str(tmp_path / "data" / link) in words(error) and str(tmp_path / "data" / target) in words(error)


def test_flat_folder_does_not_descend_into_a_looping_link(tmp_path):
    write_flat_folder(tmp_path / "data", count=3, with_junk=False)
    (tmp_path / "data/again").symlink_to(".")
    assert load(tmp_path, "flat_folder").image_ids == ["img0.jpg", "img1.png", "img2.jpg"]


@pytest.mark.parametrize("format_name", FOLDER_FORMATS)
@pytest.mark.parametrize("target", ["nowhere.jpg", "self"])  # a missing target; a link to itself (ELOOP)
def test_dangling_link_is_a_user_error_naming_it(tmp_path, format_name, target):
    image = write_format(tmp_path, format_name)
    link = image.parent / ("self" if target == "self" else "gone.jpg")
    link.symlink_to(target)
    with pytest.raises(UserError) as error:
        load(tmp_path, format_name)
    assert str(link) in words(error) and ("itself" if target == "self" else target) in str(error.value)


def test_dangling_link_to_a_class_subfolder_is_a_user_error(tmp_path):
    """Its images are gone: listing the class without them would change the data silently."""
    write_class_folders(tmp_path / "data", ["a", "b"], per_class=2)
    (tmp_path / "data/b/more").symlink_to(tmp_path / "moved-away")
    with pytest.raises(UserError) as error:
        load(tmp_path, "class_folders")
    assert str(tmp_path / "data/b/more") in words(error) and str(tmp_path / "moved-away") in str(error.value)


def test_image_list_names_a_dangling_link_as_missing(tmp_path):
    write_flat_folder(tmp_path / "images", count=2, with_junk=False)
    (tmp_path / "images/gone.jpg").symlink_to("nowhere.jpg")
    (tmp_path / "list.txt").write_text("images/img0.jpg 0\nimages/gone.jpg 1\nimages/img1.png 2\n")
    config = DatasetConfig(name="listed", format="image_list", splits={"test": "list.txt"})
    with pytest.raises(UserError) as error:
        build_dataset(config, "test", tmp_path, None)
    for value in ("1 of the 3", str(tmp_path / "list.txt"), str(tmp_path / "images/gone.jpg"), "nowhere.jpg",
                  "--skip-broken-images"):  # how many are missing, the list, the first, its target, the way out
        assert value in str(error.value)
    skipping = DatasetConfig(name="listed", format="image_list", splits={"test": "list.txt"},
                             options={"skip_missing": True})
    dataset = build_dataset(skipping, "test", tmp_path, None)
    assert dataset.image_ids == ["images/img0.jpg", "images/img1.png"] and dataset.skipped == ["images/gone.jpg"]


def test_symlink_farm_of_class_folders_equals_imagefolder(tmp_path):
    """Images kept elsewhere, reached through links to files, to a class folder and to a sub-folder."""
    store = write_class_folders(tmp_path / "store", ["x", "y", "z"], per_class=2)
    (tmp_path / "data/a").mkdir(parents=True)
    for path in store[:2]:
        (tmp_path / "data/a" / path.name).symlink_to(path)              # links to files
    (tmp_path / "data/b").symlink_to(tmp_path / "store/y")                # a class folder that is a link
    (tmp_path / "data/c").mkdir()
    (tmp_path / "data/c/nested").symlink_to(tmp_path / "store/z")       # a sub-folder that is a link
    dataset = load(tmp_path, "class_folders")
    reference = make_dataset(str(tmp_path / "data"), {"a": 0, "b": 1, "c": 2}, extensions=IMG_EXTENSIONS)
    assert dataset.image_ids == [Path(file).relative_to(tmp_path / "data").as_posix() for file, _ in reference]
    assert dataset.labels.tolist() == [label for _, label in reference] == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(pixels(dataset, 5), np.asarray(Image.open(store[5]).convert("RGB")))

    before = dataset.fingerprint()
    os.utime(store[5], ns=(LONG_AGO_NS, LONG_AGO_NS))  # the link's target changed: so does the fingerprint
    assert load(tmp_path, "class_folders").fingerprint() != before


def test_symlinked_files_and_folders_work_in_the_other_folder_formats(tmp_path):
    images, _ = write_flat_folder(tmp_path / "store", count=3, with_junk=False)
    (tmp_path / "flat").mkdir()
    for path in images:
        (tmp_path / "flat" / path.name).symlink_to(path)
    assert load(tmp_path, "flat_folder", folder="flat").image_ids == [path.name for path in images]

    (tmp_path / "numbered").mkdir()
    (tmp_path / "numbered/0").symlink_to(tmp_path / "store")
    dataset = load(tmp_path, "class_index_folders", folder="numbered")
    assert dataset.image_ids == [f"0/{path.name}" for path in images] and dataset.labels.tolist() == [0, 0, 0]


@pytest.mark.parametrize("names", [
    ["a b/1.jpg", "a/x/2.jpg", "a/1.JPG", "a/0.Png", "a/notes.txt", "a/x/y/3.jpeg", "a/x y/4.png"],
    ["Zeta/b10.jpg", "Zeta/b2.jpg", "alpha/sub-dir/1.jpg", "alpha/sub/1.jpg", "alpha/sub.d/1.jpg", "alpha/_.jpg"],
])
def test_class_folders_order_equals_make_dataset_on_nested_trees(tmp_path, names):
    for name in names:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")  # the listing reads names only
    classes = sorted(entry.name for entry in os.scandir(tmp_path / "data"))
    reference = make_dataset(str(tmp_path / "data"), {name: i for i, name in enumerate(classes)},
                             extensions=IMG_EXTENSIONS)
    dataset = load(tmp_path, "class_folders")
    assert dataset.image_ids == [Path(file).relative_to(tmp_path / "data").as_posix() for file, _ in reference]
    assert dataset.labels.tolist() == [label for _, label in reference]


def refuse_to_list(monkeypatch, folder: Path) -> None:
    """os.scandir(folder) raises PermissionError, as for a folder without read permission (root ignores chmod)."""
    scandir = os.scandir

    def scandir_or_refuse(path):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", scandir_or_refuse)


@pytest.mark.parametrize("format_name, folder", [("class_folders", "b"), ("class_index_folders", "1"),
                                                 ("flat_folder", ".")])
def test_folder_that_cannot_be_listed_is_a_user_error(tmp_path, monkeypatch, format_name, folder):
    write_format(tmp_path, format_name)
    if format_name == "class_folders":
        write_class_folders(tmp_path / "data", ["b"], per_class=1)
    refuse_to_list(monkeypatch, tmp_path / "data" / folder)
    with pytest.raises(UserError) as error:
        load(tmp_path, format_name)
    assert str(tmp_path / "data" / folder) in words(error) and "permission denied" in str(error.value)


def test_unreadable_flat_folder_file_is_a_user_error(tmp_path, monkeypatch):
    images, _ = write_flat_folder(tmp_path / "data", count=3, with_junk=False)
    rule = FLAT_FOLDER_MEMBERSHIP["paper"]

    def refuse_one(path: Path) -> bool:
        if path == images[1]:
            raise PermissionError(13, "Permission denied", str(path))
        return rule(path)
    monkeypatch.setitem(FLAT_FOLDER_MEMBERSHIP, "paper", refuse_one)
    with pytest.raises(UserError) as error:
        load(tmp_path, "flat_folder")
    assert str(images[1]) in words(error) and "permission denied" in str(error.value)


def test_folder_without_read_permission_is_a_user_error(tmp_path):
    write_class_folders(tmp_path / "data", ["a", "b"], per_class=1)
    (tmp_path / "data/b").chmod(0)
    try:
        try:
            os.listdir(tmp_path / "data/b")
        except PermissionError:
            pass  # chmod works for this process: the real case, checked below
        else:
            pytest.skip("this process reads folders whatever their permissions (root with CAP_DAC_OVERRIDE)")
        with pytest.raises(UserError) as error:
            load(tmp_path, "class_folders")
        assert str(tmp_path / "data/b") in words(error) and "permission denied" in str(error.value)
    finally:
        (tmp_path / "data/b").chmod(0o755)


# ---- 3. high bit depth: 16-bit and float images scaled to 8 bits; 8-bit images as before -------------------

SIXTEEN_BIT = np.array([[0, 128, 255, 256, 257, 25700, 32768, 65535]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = [0, 0, 0, 1, 1, 100, 128, 255]  # the high byte; 257 * k -> k, so 8-bit data survives


def decoded_grey(tmp_path: Path, name: str) -> list[int]:
    """The one image in class folder `a`, decoded by the dataset: its red channel, checked grey."""
    dataset = load(tmp_path, "class_folders")
    assert dataset.image_ids == [f"a/{name}"]
    rgb = pixels(dataset, 0)
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all()
    return rgb[0, :, 0].tolist()


def test_sixteen_bit_png_keeps_its_high_byte(tmp_path):
    path = write_png16(tmp_path / "data/a/grey16.png", SIXTEEN_BIT)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert np.asarray(image.convert("RGB"))[0, 3:, 0].tolist() == [255] * 5  # the bug: clipped to white
    assert decoded_grey(tmp_path, "grey16.png") == SIXTEEN_BIT_AS_8


def test_sixteen_bit_grey_and_rgb_pngs_decode_to_the_same_pixels(tmp_path):
    """Pillow itself reduces 16-bit RGB PNGs to their high byte: grey ones now agree with them."""
    grey = write_png16(tmp_path / "data/a/grey16.png", SIXTEEN_BIT)
    colour = write_png16(tmp_path / "data/b/rgb16.png", np.repeat(SIXTEEN_BIT[..., None], 3, axis=2))
    with Image.open(grey) as grey_image, Image.open(colour) as colour_image:
        assert (grey_image.mode, colour_image.mode) == ("I;16", "RGB")
    dataset = load(tmp_path, "class_folders")
    assert np.array_equal(pixels(dataset, 0), pixels(dataset, 1))


def test_big_endian_sixteen_bit_tiff_keeps_its_high_byte(tmp_path):
    (tmp_path / "data/a").mkdir(parents=True)
    image = Image.frombytes("I;16B", (SIXTEEN_BIT.shape[1], 1), SIXTEEN_BIT.astype(">u2").tobytes())
    image.save(tmp_path / "data/a/grey16b.tif")
    with Image.open(tmp_path / "data/a/grey16b.tif") as reread:
        assert reread.mode == "I;16B"
    assert decoded_grey(tmp_path, "grey16b.tif") == SIXTEEN_BIT_AS_8


def test_sixteen_bit_pgm_read_as_mode_i_keeps_its_high_byte(tmp_path):
    (tmp_path / "data/a").mkdir(parents=True)
    header = f"P5 {SIXTEEN_BIT.shape[1]} 1 65535\n".encode()
    (tmp_path / "data/a/grey16.pgm").write_bytes(header + SIXTEEN_BIT.astype(">u2").tobytes())
    with Image.open(tmp_path / "data/a/grey16.pgm") as image:
        assert image.mode == "I"
    assert decoded_grey(tmp_path, "grey16.pgm") == SIXTEEN_BIT_AS_8


def test_mode_i_outside_sixteen_bits_is_clipped(tmp_path):
    (tmp_path / "data/a").mkdir(parents=True)
    values = np.array([[-5, 0, 25700, 65535, 70000, 2**31 - 1]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "data/a/i.tif")
    assert decoded_grey(tmp_path, "i.tif") == [0, 0, 100, 255, 255, 255]


def test_float_image_is_read_as_zero_to_one(tmp_path):
    (tmp_path / "data/a").mkdir(parents=True)
    values = np.array([[0.0, 0.001, 0.25, 0.5, 1.0, -0.5, 2.0, np.nan, np.inf]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "data/a/float.tif")
    with Image.open(tmp_path / "data/a/float.tif") as image:
        assert image.mode == "F"
    assert decoded_grey(tmp_path, "float.tif") == [0, 0, 64, 128, 255, 0, 255, 0, 255]  # nearest level, clipped


@pytest.mark.parametrize("mode, file_name", [("RGB", "rgb.jpg"), ("L", "grey.jpg"), ("CMYK", "cmyk.jpg"),
                                             ("P", "palette.png"), ("RGBA", "rgba.png"), ("LA", "la.png"),
                                             ("1", "bilevel.png"), ("L", "grey.png"), ("RGB", "rgb.bmp")])
def test_eight_bit_images_decode_exactly_as_convert_rgb(tmp_path, mode, file_name):
    path = tmp_path / "data/a" / file_name
    path.parent.mkdir(parents=True)
    colours = Image.fromarray(random_pixels(np.random.default_rng(0), 1, 12, 10)[0])
    image = colours.quantize(16) if mode == "P" else colours.convert(mode)
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray(np.arange(120, dtype=np.uint8).reshape(12, 10) * 2))
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode
        expected = np.asarray(reread.convert("RGB"))
    assert np.array_equal(pixels(load(tmp_path, "class_folders"), 0), expected)


# ---- 4. images too large for Pillow are broken images, not crashes ------------------------------------------

def test_image_over_twice_pillows_pixel_limit_is_a_broken_image(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "data", ["a"], per_class=1, size=(15, 15))       # 225 pixels
    write_class_folders(tmp_path / "data", ["b"], per_class=1, size=(12, 12))       # 144 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused above 200, a warning above 100
    dataset = load(tmp_path, "class_folders")
    with pytest.raises(BrokenImageError) as error:
        dataset[0]
    for value in (str(tmp_path / "data/a/img0.JPEG"), "225 pixels", "200 pixels"):  # the image, its size, the limit
        assert value in str(error.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert pixels(dataset, 1).shape == (12, 12, 3)


@pytest.mark.slow  # six pipeline runs
def test_verify_image_content_recomputes_the_rows_of_an_image_replaced_behind_the_fingerprint(tmp_path,
                                                                                             small_model_yaml, caplog):
    """Same size, modification time set back: the default key cannot see it, --verify-image-content does."""
    import main
    root = tmp_path / "datasets"
    for split, count in (("train", 4), ("val", 4)):
        write_bitmaps([root / f"imagenet1k/imagenet/{split}/n0{label}/img{j}.bmp" for label in range(2)
                       for j in range(count)], seed=count + len(split))
    write_bitmaps([root / f"textures/dtd/images/c{label}/img{j}.bmp" for label in range(2) for j in range(2)], seed=9)
    argv = ["--model", str(small_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
            "--ood-data", "textures", "--detectors", "energy", "--data-root", str(root), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--bank-ratio", "1.0", "--num-workers", "0", "--no-plots",
            "--set", "chunk_size=4"]

    def run(output: str, *flags: str) -> str:
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main.main([*argv, "--output-dir", str(tmp_path / output), *flags]) == 0
        return caplog.text

    assert "extracting" in run("first")
    assert "content hash" in run("verified", "--verify-image-content")  # once: the cache had none
    assert "extracting" not in run("verified-again", "--verify-image-content")
    replaced = root / "imagenet1k/imagenet/val/n01/img2.bmp"
    times = replaced.stat()
    write_bitmaps([replaced], seed=99)
    os.utime(replaced, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert "extracting" not in run("stale")  # the limit of the default fingerprint, stated in the README
    log = run("caught", "--verify-image-content")
    assert "changed" in log and "--verify-image-content" in log
    assert "4 of 8" in log and "imagenet1k-test" in log
    assert "extracting" not in run("caught-again", "--verify-image-content")
    results = {name: (tmp_path / name / "results.csv").read_text() for name in ("stale", "caught", "first")}
    assert results["caught"] != results["stale"] == results["first"]


def test_an_image_replaced_during_extraction_is_recomputed_by_the_next_verifying_run(tmp_path, bitmaps,
                                                                                     monkeypatch, caplog):
    """--verify-image-content records the hash of the bytes read for the network: a file replaced right after it
    was decoded (same size, modification time restored) no longer matches, and the next verifying run recomputes
    its rows, which then equal the new image's features."""
    import logging

    import torch
    import torchvision

    from dataloaders.base import FileImageDataset
    from pipeline.features.extract import ExtractionSettings, FeatureExtractor
    from tests.test_reliability import CountingBackbone

    dataset = build_dataset(DatasetConfig(name="integrity", format="class_folders", splits={"test": "data"}),
                            "test", tmp_path, transform=torchvision.transforms.ToTensor())
    settings = ExtractionSettings(torch.device("cpu"), batch_size=2, num_workers=0, amp="off", channels_last=False,
                                  chunk_size=3, verify_image_content=True)

    def features(cache: Path) -> np.ndarray:
        extractor = FeatureExtractor(CountingBackbone(), {"model": "counting"}, cache, settings)
        return extractor.features(dataset, {"dataset": "integrity", "images": dataset.fingerprint()}, "integrity")

    decode = FileImageDataset.__getitem__

    def decode_then_replace(self, index):
        decoded = decode(self, index)
        if index == 1 and not replaced:  # the image has been read: now replace it, as another process might
            replace_keeping_size(bitmaps[1], seed=3)
            os.utime(bitmaps[1], ns=(LONG_AGO_NS, LONG_AGO_NS))
            replaced.append(index)
        return decoded

    replaced: list[int] = []
    with monkeypatch.context() as patch:
        patch.setattr(FileImageDataset, "__getitem__", decode_then_replace)
        stale = features(tmp_path / "cache")
    assert replaced == [1]
    with caplog.at_level(logging.WARNING):
        again = features(tmp_path / "cache")
    assert "rows_000000000_000000003" in caplog.text and "changed" in caplog.text
    np.testing.assert_array_equal(again, features(tmp_path / "fresh"))  # the new image's features
    assert not np.array_equal(again[1], stale[1])
