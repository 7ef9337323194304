"""dataloaders/: every format on generated data, fingerprints, subsets, user errors and bank sampling."""
from __future__ import annotations

import io
import itertools
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageCms
from torchvision.datasets import ImageFolder
from torchvision.transforms import PILToTensor

from dataloaders import DATASET_FORMATS, DatasetConfig, ImageDataset, bank_indices, build_dataset, subset_indices
from dataloaders.bank import SUBSET_SEED
from dataloaders.base import BrokenImageError
from dataloaders.folders import is_jpeg_or_png_by_imghdr_rule
from errors import UserError
from tests.datagen import (FLAT_JUNK, random_pixels, write_cifar10, write_cifar100, write_class_folders,
                           write_class_index_folders, write_flat_folder, write_svhn)


def load(tmp_path, format_name, folder="data", split="test", transform=None, download=False):
    config = DatasetConfig(name="demo", format=format_name, splits={split: folder})
    return build_dataset(config, split, tmp_path, transform, download=download)


def as_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)


def test_class_folders_equal_imagefolder(tmp_path):
    # Upper case sorts first and 'b10' before 'b2': ImageFolder's plain string order.
    write_class_folders(tmp_path / "data", ["zebra", "Apple", "b2", "b10"], per_class=3)
    dataset = load(tmp_path, "class_folders", transform=PILToTensor())
    reference = ImageFolder(str(tmp_path / "data"), transform=PILToTensor())

    expected_ids = [Path(file).relative_to(tmp_path / "data").as_posix() for file, _ in reference.samples]
    assert dataset.image_ids == expected_ids
    assert dataset.labels.tolist() == reference.targets
    assert dataset.labels.dtype == np.int64
    assert dataset.image_ids[0].startswith("Apple/") and dataset.labels[-1] == 3  # 'zebra' is last
    image, label = dataset[5]
    assert label == reference[5][1] and torch.equal(image, reference[5][0])
    assert image.shape == (3, 48, 40) and dataset.skipped == []


def test_imagenet_o_config_reads_the_extracted_tar(tmp_path):
    """imagenet-o.tar: one folder per WordNet id and a README.txt beside them, which is not an image."""
    from pipeline.config.loading import load_dataset_config
    write_class_folders(tmp_path / "imagenet-o", ["n01443537", "n01704323"], per_class=3)
    (tmp_path / "imagenet-o/README.txt").write_text("ImageNet-O\n")
    dataset = build_dataset(load_dataset_config("imagenet-o"), "test", tmp_path, transform=None)
    assert len(dataset) == 6 and dataset.image_ids[0].startswith("n01443537/")


def test_class_index_folders_label_is_folder_number(tmp_path):
    write_class_index_folders(tmp_path / "data", num_classes=12, per_class=2)
    dataset = load(tmp_path, "class_index_folders")

    assert dataset.labels.tolist() == [label for label in range(12) for _ in range(2)]
    assert dataset.image_ids[:4] == ["0/0.jpeg", "0/1.jpeg", "1/0.jpeg", "1/1.jpeg"]
    assert dataset.image_ids[-1] == "11/1.jpeg"
    # ImageFolder sorts '10' third, so would call it class 2; here its label is 10.
    by_class = load(tmp_path, "class_folders")
    assert by_class.labels[by_class.image_ids.index("10/0.jpeg")] == 2
    assert dataset.labels[dataset.image_ids.index("10/0.jpeg")] == 10


def test_flat_folder_natural_order_and_skipped_junk(tmp_path, caplog):
    images, junk = write_flat_folder(tmp_path / "data", count=12)
    with caplog.at_level(logging.WARNING):
        dataset = load(tmp_path, "flat_folder", transform=PILToTensor())

    assert dataset.image_ids == [path.name for path in images]
    assert dataset.image_ids[1:3] == ["img1.png", "img2.jpg"] and dataset.image_ids[-1] == "img11.png"
    assert dataset.skipped == list(FLAT_JUNK) == [path.name for path in junk]
    assert "skipped 2 files" in caplog.text
    assert (dataset.labels == -1).all() and len(dataset.labels) == 12
    image, label = dataset[1]  # a PNG decodes losslessly: compare with the file itself
    assert label == -1 and image.shape == (3, 32, 32)
    assert torch.equal(image, PILToTensor()(Image.open(images[1]).convert("RGB")))


@pytest.mark.parametrize("format_name, writer, file_names", [
    ("cifar10", write_cifar10, {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    ("cifar100", write_cifar100, {"train": ["train"], "test": ["test"]}),
])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_round_trip(tmp_path, format_name, writer, file_names, split):
    written = writer(tmp_path / "data", per_class=1)
    images = np.concatenate([written[name][0] for name in file_names[split]])
    labels = np.concatenate([written[name][1] for name in file_names[split]])

    raw = load(tmp_path, format_name, split=split)
    tensors = load(tmp_path, format_name, split=split, transform=PILToTensor())

    assert len(raw) == len(images) and raw.labels.tolist() == labels.tolist()
    last = len(images) - 1
    assert raw.image_ids[0] == f"{file_names[split][0]}#0"
    assert raw.image_ids[last] == f"{file_names[split][-1]}#{len(written[file_names[split][-1]][1]) - 1}"
    for index in (0, last):
        pil_image, label = raw[index]
        assert label == labels[index]
        assert np.array_equal(np.asarray(pil_image), images[index])
        assert torch.equal(tensors[index][0], as_chw(images[index]))


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_round_trip_maps_ten_to_zero(tmp_path, split):
    images, labels = write_svhn(tmp_path / "data", split, count=20)
    dataset = load(tmp_path, "svhn", split=split, transform=PILToTensor())

    assert dataset.labels.tolist() == labels.tolist() and 0 in dataset.labels and 10 not in dataset.labels
    assert dataset.image_ids[3] == f"{split}_32x32.mat#3"
    for index in (0, 7, 19):
        assert torch.equal(dataset[index][0], as_chw(images[index]))
        assert dataset[index][1] == labels[index]


def test_fingerprint_stable_and_changes_with_file_list(tmp_path):
    write_flat_folder(tmp_path / "data", count=4)
    first = load(tmp_path, "flat_folder").fingerprint()
    assert load(tmp_path, "flat_folder").fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0

    (tmp_path / "data" / "img4.jpg").write_bytes((tmp_path / "data" / "img0.jpg").read_bytes())
    assert load(tmp_path, "flat_folder").fingerprint() != first

    # Same ids and files read by another format: another key.
    write_class_index_folders(tmp_path / "tree", num_classes=2, per_class=2)
    by_index = load(tmp_path, "class_index_folders", folder="tree")
    by_class = load(tmp_path, "class_folders", folder="tree")
    assert by_index.image_ids == by_class.image_ids and by_index.fingerprint() != by_class.fingerprint()


def test_fingerprint_of_arrays_hashes_the_data_bytes(tmp_path):
    write_cifar10(tmp_path / "data", per_class=1, seed=0)
    first = load(tmp_path, "cifar10").fingerprint()
    assert load(tmp_path, "cifar10").fingerprint() == first
    write_cifar10(tmp_path / "data", per_class=1, seed=1)  # same ids, other pixels
    assert load(tmp_path, "cifar10").fingerprint() != first


def test_subset_keeps_order_and_has_its_own_fingerprint(tmp_path):
    write_class_folders(tmp_path / "data", ["a", "b", "c"], per_class=2)
    dataset = load(tmp_path, "class_folders", transform=PILToTensor())
    indices = np.array([5, 0, 3])
    subset = dataset.subset(indices)

    assert subset.image_ids == [dataset.image_ids[i] for i in indices]
    assert subset.labels.tolist() == [2, 0, 1]
    assert torch.equal(subset[0][0], dataset[5][0]) and len(subset) == 3
    assert subset.fingerprint() != dataset.fingerprint()
    assert subset.fingerprint() == load(tmp_path, "class_folders").subset(indices).fingerprint()
    assert dataset.subset(np.arange(len(dataset))).fingerprint() == dataset.fingerprint()

    write_svhn(tmp_path / "svhn", "test", count=10)
    arrays = load(tmp_path, "svhn", folder="svhn")
    assert np.array_equal(np.asarray(arrays.subset(np.array([9, 2]))[0][0]), np.asarray(arrays[9][0]))
    with pytest.raises(ValueError):
        dataset.subset(np.array([6]))


@pytest.mark.parametrize("format_name", ["class_folders", "class_index_folders", "flat_folder"])
def test_missing_and_empty_folders_are_user_errors(tmp_path, format_name):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "absent"))):
        load(tmp_path, format_name, folder="absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "empty"))):
        load(tmp_path, format_name, folder="empty")


def test_flat_folder_of_junk_only_is_a_user_error(tmp_path):
    write_flat_folder(tmp_path / "data", count=0)
    with pytest.raises(UserError) as error:
        load(tmp_path, "flat_folder")
    assert str(tmp_path / "data") in str(error.value) and "2 files" in str(error.value)


def test_unknown_split_and_format_are_user_errors(tmp_path):
    config = DatasetConfig(name="inat", format="flat_folder", splits={"test": "inat"})
    with pytest.raises(UserError) as error:
        build_dataset(config, "train", tmp_path, None)
    for value in ("'inat'", "'train'", "test"):  # the dataset, the split asked for, the one it has
        assert value in str(error.value)

    config = DatasetConfig(name="inat", format="flat_fodler", splits={"test": "inat"})
    with pytest.raises(UserError) as error:
        build_dataset(config, "test", tmp_path, None)
    assert "'flat_fodler'" in str(error.value) and "'flat_folder'" in str(error.value)
    assert all(name in str(error.value) for name in DATASET_FORMATS.names())

    with pytest.raises(UserError) as error:
        load(tmp_path, "cifar10", split="val")
    for value in ("CIFAR-10", "'val'", "train", "test"):
        assert value in str(error.value)


def test_missing_array_files_suggest_download(tmp_path):
    write_cifar10(tmp_path / "data", per_class=1)
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert len(load(tmp_path, "cifar10")) == 10  # the test split is still complete
    for format_name, split, missing in (("cifar10", "train", "cifar-10-batches-py/data_batch_3"),
                                        ("cifar100", "test", "cifar-100-python/test"),
                                        ("svhn", "test", "test_32x32.mat")):
        with pytest.raises(UserError) as error:
            load(tmp_path, format_name, split=split)
        assert str(tmp_path / "data" / missing) in str(error.value) and "--download" in str(error.value)


class RunsCommand:
    """Unpickling this object would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_download_fetches_only_missing_files(tmp_path, monkeypatch):
    calls = []

    def fake_cifar10(root, train, download):  # stands in for torchvision's downloader: no network in tests
        calls.append((root, train, download))
        write_cifar10(root, per_class=1)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    assert len(load(tmp_path, "cifar10", split="train", download=True)) == 50
    assert calls == [(tmp_path / "data", True, True)]
    assert len(load(tmp_path, "cifar10", split="train", download=True)) == 50
    assert len(calls) == 1  # files present: no second download


def test_cifar_reader_refuses_arbitrary_pickles(tmp_path):
    write_cifar100(tmp_path / "data", per_class=1)
    marker = tmp_path / "pwned"
    batch = {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0], "hook": RunsCommand(f"touch {marker}")}
    (tmp_path / "data" / "cifar-100-python" / "test").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError, match=re.escape(f"{os.system.__module__}.system")):  # the global it refused
        load(tmp_path, "cifar100")
    assert not marker.exists()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_train, ratio", [(1000, 1.0), (1000, 0.01), (1001, 0.37)])
def test_bank_indices_equal_official_shuffle(seed, num_train, ratio):
    np.random.seed(seed)  # the official code, verbatim
    idx = np.arange(num_train)
    np.random.shuffle(idx)
    expected = idx[:int(num_train * ratio)]

    indices = bank_indices(num_train, ratio, seed)
    assert indices.dtype == np.int64 and np.array_equal(indices, expected)
    assert len(np.unique(indices)) == len(indices)


@pytest.mark.parametrize("count", [1, 7, 100, 299])
def test_subset_keeps_each_class_share_by_largest_remainders_seeded_and_sorted(count):
    labels = np.repeat([3, 0, 1, 2], [150, 90, 50, 10])  # unequal classes, not in label order
    chosen = subset_indices(labels, count)
    assert chosen.dtype == np.int64 and len(chosen) == count and np.all(np.diff(chosen) > 0)
    shares = count * np.array([90, 50, 10, 150]) / 300  # classes 0, 1, 2, 3
    kept = np.bincount(labels[chosen], minlength=4)
    assert np.all(np.abs(kept - shares) < 1) and kept.sum() == count  # floor or ceiling of each share
    assert np.array_equal(subset_indices(labels, count), chosen)  # seeded: the same rows in every run
    random = np.random.RandomState(SUBSET_SEED)  # one permutation per class, in label order
    expected = [random.permutation(np.flatnonzero(labels == label))[:kept[label]] for label in range(4)]
    assert np.array_equal(chosen, np.sort(np.concatenate(expected)))


def test_subset_ties_go_to_smaller_labels_and_unlabelled_or_small_splits_work():
    assert np.bincount(np.repeat([0, 1, 2], 10)[subset_indices(np.repeat([0, 1, 2], 10), 4)]).tolist() == [2, 1, 1]
    unlabelled = subset_indices(np.full(50, -1), 5)
    assert np.array_equal(unlabelled, np.sort(np.random.RandomState(SUBSET_SEED).permutation(50)[:5]))
    assert np.array_equal(subset_indices(np.arange(6), 6), np.arange(6))
    assert np.array_equal(subset_indices(np.arange(6), 600), np.arange(6))  # asking for more keeps all


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), 0.0001])
def test_bank_indices_reject_bad_ratio(ratio):
    with pytest.raises(UserError, match=str(ratio)):
        bank_indices(1000, ratio, seed=0)


# ---- flat_folder membership: the paper's rule (imghdr's test) or every JPEG/PNG signature ----------------

SOI = b"\xff\xd8"  # the JPEG start-of-image marker


def pillow_jpeg(mode: str = "RGB", seed: int = 0) -> bytes:
    """A 16x16 JPEG of random pixels as Pillow writes it: APP0 JFIF right after SOI (Adobe APP14 for CMYK)."""
    pixels = random_pixels(np.random.default_rng(seed), 1, 16, 16)[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment: FF, the marker, a big-endian length that counts itself, then the payload."""
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def with_first_segment(jfif_jpeg: bytes, segment: bytes) -> bytes:
    """The same JPEG with its APP0 JFIF segment replaced by `segment` (b"" for none), which then comes first."""
    assert jfif_jpeg[:4] == SOI + b"\xff\xe0" and jfif_jpeg[6:10] == b"JFIF"
    app0_end = 4 + int.from_bytes(jfif_jpeg[4:6], "big")  # the length counts its own 2 bytes, not the marker
    return SOI + segment + jfif_jpeg[app0_end:]


def image_bytes(image: Image.Image, format_name: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format_name)
    return buffer.getvalue()


def crafted_files() -> dict[str, bytes]:
    """File name -> contents: real JPEGs with each first segment seen on the web, and files that are not JPEG."""
    jfif = pillow_jpeg()
    exif = Image.Exif()
    exif[0x0112] = 1  # Orientation: upright
    srgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp_packet = b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"/>'
    iptc_resource = b"8BIM" + (0x0404).to_bytes(2, "big") + b"\x00\x00" + (0).to_bytes(4, "big")  # empty IPTC
    png = image_bytes(Image.fromarray(random_pixels(np.random.default_rng(1), 1, 16, 16)[0]), "PNG")
    return {
        "jfif.jpg": jfif,
        "exif_first.jpg": with_first_segment(jfif, jpeg_segment(0xE1, exif.tobytes())),  # as cameras write
        "icc_first.jpg": with_first_segment(jfif, jpeg_segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + srgb_profile)),
        "adobe_cmyk.jpg": pillow_jpeg("CMYK"),
        "xmp_first.jpg": with_first_segment(jfif, jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp_packet)),
        "photoshop_first.jpg": with_first_segment(jfif, jpeg_segment(0xED, b"Photoshop 3.0\x00" + iptc_resource)),
        "bare_dqt.jpg": with_first_segment(jfif, b""),  # Pillow's next segment is the quantisation table
        "image.png": png,
        "png_named.jpg": png,
        "anim.gif": image_bytes(Image.new("P", (8, 8)), "GIF"),
        "notes.txt": b"not an image\n",
        "empty.jpg": b"",
        "tiny.jpg": SOI,  # a start marker and nothing else
        "jfif_text.dat": b"hello JFIF, this is text\n",  # 'JFIF' at bytes 6-10 without being a JPEG
    }


SPLICED_JPEGS = {"exif_first.jpg": b"\xff\xe1", "icc_first.jpg": b"\xff\xe2", "xmp_first.jpg": b"\xff\xe1",
                 "photoshop_first.jpg": b"\xff\xed", "bare_dqt.jpg": b"\xff\xdb"}  # name -> first marker


def write_crafted_folder(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    paths = {name: folder / name for name in crafted_files()}
    for name, contents in crafted_files().items():
        paths[name].write_bytes(contents)
    return paths


def load_flat(tmp_path: Path, **options) -> ImageDataset:
    """The `data` folder read as the pipeline reads a flat-folder YAML with these `options:`."""
    config = DatasetConfig(name="crafted", format="flat_folder", splits={"test": "data"}, options=options)
    return build_dataset(config, "test", tmp_path, transform=None)


def test_crafted_jpegs_are_real_and_start_with_the_segment_named():
    files = crafted_files()
    reference = np.asarray(Image.open(io.BytesIO(files["jfif.jpg"])).convert("RGB"))
    for name, first_marker in SPLICED_JPEGS.items():
        assert files[name][:4] == SOI + first_marker, name
        with Image.open(io.BytesIO(files[name])) as image:
            assert image.format == "JPEG" and image.size == (16, 16)
            assert np.array_equal(np.asarray(image.convert("RGB")), reference), name  # same scan, other header
    assert files["exif_first.jpg"][6:10] == b"Exif" and files["xmp_first.jpg"][6:10] == b"http"
    assert files["icc_first.jpg"][6:17] == b"ICC_PROFILE" and files["photoshop_first.jpg"][6:19] == b"Photoshop 3.0"
    assert files["adobe_cmyk.jpg"][:4] == SOI + b"\xff\xee" and files["adobe_cmyk.jpg"][6:11] == b"Adobe"
    with Image.open(io.BytesIO(files["adobe_cmyk.jpg"])) as image:
        assert image.mode == "CMYK" and image.convert("RGB").size == (16, 16)


PAPER_MEMBERS = ["bare_dqt.jpg", "exif_first.jpg", "image.png", "jfif.jpg", "jfif_text.dat", "png_named.jpg"]
PAPER_SKIPPED = ["adobe_cmyk.jpg", "anim.gif", "empty.jpg", "icc_first.jpg", "notes.txt", "photoshop_first.jpg",
                 "tiny.jpg", "xmp_first.jpg"]
ANY_JPEG_PNG_MEMBERS = ["adobe_cmyk.jpg", "bare_dqt.jpg", "exif_first.jpg", "icc_first.jpg", "image.png", "jfif.jpg",
                        "photoshop_first.jpg", "png_named.jpg", "xmp_first.jpg"]
ANY_JPEG_PNG_SKIPPED = ["anim.gif", "empty.jpg", "jfif_text.dat", "notes.txt", "tiny.jpg"]


@pytest.mark.parametrize("options", [{}, {"membership": "paper"}])
def test_flat_folder_paper_rule_keeps_what_imghdr_keeps(tmp_path, caplog, options):
    write_crafted_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        dataset = load_flat(tmp_path, **options)

    assert dataset.image_ids == PAPER_MEMBERS and dataset.skipped == PAPER_SKIPPED
    assert len(dataset) == 6 and (dataset.labels == -1).all()
    [warning] = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    for value in ("4 files", str(tmp_path / "data"), "anim.gif",  # not JPEG or PNG: how many, where, the first
                  "4 JPEG files", "'paper'", "adobe_cmyk.jpg",  # left out by the rule: how many, the rule, the first
                  "'membership: any_jpeg_png'"):  # the option that keeps them
        assert value in warning
    for index, image_id in enumerate(dataset.image_ids):
        if image_id != "jfif_text.dat":
            assert dataset[index][0].size == (16, 16)


def test_flat_folder_any_jpeg_png_keeps_every_jpeg_whatever_its_first_segment(tmp_path, caplog):
    write_crafted_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        dataset = load_flat(tmp_path, membership="any_jpeg_png")

    assert dataset.image_ids == ANY_JPEG_PNG_MEMBERS and dataset.skipped == ANY_JPEG_PNG_SKIPPED
    [warning] = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert "5 files" in warning and str(tmp_path / "data") in warning and "anim.gif" in warning
    assert "membership" not in warning  # no JPEG left out
    assert [dataset[index][0].size for index in range(len(dataset))] == [(16, 16)] * len(ANY_JPEG_PNG_MEMBERS)


def test_paper_rule_keeps_a_non_jpeg_with_jfif_at_bytes_6_to_10_which_then_fails_to_decode(tmp_path):
    """The paper's code kept such a file too and would have stopped when its loader reached it."""
    write_crafted_folder(tmp_path / "data")
    dataset = load_flat(tmp_path)
    with pytest.raises(BrokenImageError, match=re.escape(str(tmp_path / "data" / "jfif_text.dat"))):
        dataset[dataset.image_ids.index("jfif_text.dat")]


def test_flat_folder_of_jpegs_the_paper_rule_leaves_out_says_how_to_keep_them(tmp_path, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "icc_first.jpg").write_bytes(crafted_files()["icc_first.jpg"])
    with pytest.raises(UserError) as error:
        load_flat(tmp_path)
    for value in (str(tmp_path / "data"), "1 JPEG", "'paper'", "'membership: any_jpeg_png'"):
        assert value in str(error.value)
    assert load_flat(tmp_path, membership="any_jpeg_png").image_ids == ["icc_first.jpg"]


def test_membership_changes_the_fingerprint_only_when_it_changes_the_members(tmp_path):
    files = crafted_files()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "jfif.jpg").write_bytes(files["jfif.jpg"])
    assert load_flat(tmp_path).fingerprint() == load_flat(tmp_path, membership="any_jpeg_png").fingerprint()

    (tmp_path / "data" / "icc_first.jpg").write_bytes(files["icc_first.jpg"])
    paper, any_jpeg_png = load_flat(tmp_path), load_flat(tmp_path, membership="any_jpeg_png")
    assert paper.image_ids == ["jfif.jpg"] and any_jpeg_png.image_ids == ["icc_first.jpg", "jfif.jpg"]
    assert paper.fingerprint() != any_jpeg_png.fingerprint()


@pytest.mark.parametrize("value", ["papers", "imghdr", True, ["paper"]])
def test_unknown_membership_is_a_user_error_naming_the_option_and_valid_values(tmp_path, value):
    write_crafted_folder(tmp_path / "data")
    with pytest.raises(UserError) as error:
        load_flat(tmp_path, membership=value)
    assert repr(value) in str(error.value) and "'membership'" in str(error.value)
    assert "paper, any_jpeg_png" in str(error.value)  # the valid values


def test_misspelt_dataset_option_fails_when_the_yaml_is_loaded(tmp_path):
    from pipeline.config.loading import load_dataset_config
    config_file = tmp_path / "my-ood.yaml"
    config_file.write_text("format: flat_folder\nsplits: {test: data}\noptions: {membrship: any_jpeg_png}\n")
    with pytest.raises(UserError) as error:
        load_dataset_config(str(config_file))
    for value in ("'my-ood'", "'flat_folder'", "'membrship'", "'membership'"):
        assert value in str(error.value)
    with pytest.raises(UserError) as error:
        DatasetConfig(name="c10", format="cifar10", splits={"test": "cifar10"}, options={"seed": 0})
    for value in ("'cifar10'", "'seed'", "none"):  # the format, the option, its valid options
        assert value in str(error.value)


@pytest.mark.parametrize("name", ["inaturalist", "sun", "places", "openimage-o"])
def test_shipped_flat_folder_configs_use_the_papers_rule(tmp_path, name):
    from pipeline.config.loading import load_dataset_config
    config = load_dataset_config(name)
    files = crafted_files()
    folder = tmp_path / config.splits["test"]
    folder.mkdir(parents=True)
    for file_name in ("jfif.jpg", "icc_first.jpg"):
        (folder / file_name).write_bytes(files[file_name])
    dataset = build_dataset(config, "test", tmp_path, transform=None)
    assert dataset.image_ids == ["jfif.jpg"] and dataset.skipped == ["icc_first.jpg"]


# Headers around the edges of imghdr's tests (prefix x tag at bytes 6-10), besides the crafted files.
EDGE_PREFIXES = [b"", SOI, SOI + b"\xff\xdb", SOI + b"\xff\xe0\x00\x10", b"\x89PNG\r\n\x1a", b"\x89PNG\r\n\x1a\n",
                 b"\x00\xd8\xff\xdb\x00\x00"]
EDGE_TAGS = [b"", b"JFIF", b"Exif", b"jfif", b"JFI", b"ICC_"]


def test_restated_rule_agrees_with_imghdr(tmp_path):
    """imghdr is gone from Python 3.13; where it still exists, the restated rule must give its answers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        imghdr = pytest.importorskip("imghdr")
    paths = write_crafted_folder(tmp_path / "crafted")
    for i, (prefix, tag) in enumerate(itertools.product(EDGE_PREFIXES, EDGE_TAGS)):
        path = tmp_path / f"edge{i}"
        path.write_bytes((prefix + b"\x00" * 6)[:6] + tag if tag else prefix)
        paths[path.name] = path
    agreed = {name: (imghdr.what(path) in ("jpeg", "png"), is_jpeg_or_png_by_imghdr_rule(path))
              for name, path in paths.items()}
    assert {name: answers for name, answers in agreed.items() if answers[0] != answers[1]} == {}
    assert sum(imghdr_answer for imghdr_answer, _ in agreed.values()) >= 10  # both answers occur often
    assert sum(not imghdr_answer for imghdr_answer, _ in agreed.values()) >= 10
