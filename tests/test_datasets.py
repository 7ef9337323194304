"""dataloaders/: every format on generated data, fingerprints, subsets, user errors and bank sampling."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import PILToTensor

from dataloaders import DATASET_FORMATS, DatasetConfig, bank_indices, build_dataset
from errors import UserError
from tests.datagen import (FLAT_JUNK, write_cifar10, write_cifar100, write_class_folders,
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
    from pipeline.config import load_dataset_config
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
    with pytest.raises(UserError, match=r"does not exist; expected"):
        load(tmp_path, format_name, folder="absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images in .*empty.*; expected"):
        load(tmp_path, format_name, folder="empty")


def test_flat_folder_of_junk_only_is_a_user_error(tmp_path):
    write_flat_folder(tmp_path / "data", count=0)
    with pytest.raises(UserError, match="no images in"):
        load(tmp_path, "flat_folder")


def test_unknown_split_and_format_are_user_errors(tmp_path):
    config = DatasetConfig(name="inat", format="flat_folder", splits={"test": "inat"})
    with pytest.raises(UserError, match=r"dataset 'inat' has no split 'train'; its splits: test"):
        build_dataset(config, "train", tmp_path, None)

    config = DatasetConfig(name="inat", format="flat_fodler", splits={"test": "inat"})
    with pytest.raises(UserError) as error:
        build_dataset(config, "test", tmp_path, None)
    assert "did you mean 'flat_folder'" in str(error.value)
    assert all(name in str(error.value) for name in DATASET_FORMATS.names())

    with pytest.raises(UserError, match="no split 'val'"):
        load(tmp_path, "cifar10", split="val")


def test_missing_array_files_suggest_download(tmp_path):
    write_cifar10(tmp_path / "data", per_class=1)
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert len(load(tmp_path, "cifar10")) == 10  # the test split is still complete
    with pytest.raises(UserError, match=r"missing CIFAR-10 file .*data_batch_3.*--download"):
        load(tmp_path, "cifar10", split="train")
    with pytest.raises(UserError, match=r"missing CIFAR-100 file .*cifar-100-python/test.*--download"):
        load(tmp_path, "cifar100")
    with pytest.raises(UserError, match=r"missing SVHN file .*test_32x32\.mat.*--download"):
        load(tmp_path, "svhn")


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
    with pytest.raises(UserError, match=r"refusing to unpickle \w+\.system"):
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


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), 0.0001])
def test_bank_indices_reject_bad_ratio(ratio):
    with pytest.raises(UserError, match=str(ratio)):
        bank_indices(1000, ratio, seed=0)
