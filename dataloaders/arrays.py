"""Array formats: CIFAR-10/100 pickle batches and SVHN .mat files, in torchvision's on-disk layout."""
from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io
import torchvision

from dataloaders.base import DATASET_FORMATS, ArrayImageDataset
from errors import UserError

# split -> (folder torchvision extracts into, batch files)
CIFAR10_FILES = {"train": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]),
                 "test": ("cifar-10-batches-py", ["test_batch"])}
CIFAR100_FILES = {"train": ("cifar-100-python", ["train"]), "test": ("cifar-100-python", ["test"])}
SVHN_SPLITS = ("train", "test")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only; any other global is a UserError (see docs/design.md,
    "Data loading"). `_codecs.encode` is allowed: Python 3 writes bytes at protocol 2 as
    `_codecs.encode(text, 'latin1')`.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"refusing to unpickle {module}.{name}: "
                            "a CIFAR batch holds only numpy arrays and lists")
        return super().find_class(module, name)


def _files_or_download(path: Path, names: list[str], what: str,
                       download: Callable[[], object] | None) -> list[Path]:
    """The data files under `path`, fetched with torchvision first when missing and `download` is given."""
    files = [path / name for name in names]
    missing = [file for file in files if not file.is_file()]
    if missing and download is not None:
        try:
            download()
        except OSError as error:  # urllib's URLError is one: no network, a proxy, a refused host
            raise UserError(f"could not download {what} into {path} ({error}); without network, put torchvision's "
                            f"{what} files there ({missing[0].relative_to(path)} first) and run without --download"
                            ) from None
        missing = [file for file in files if not file.is_file()]
    if missing:
        raise UserError(f"missing {what} file {missing[0]}; put torchvision's {what} files under {path} "
                        f"or pass --download")
    return files


def _read_cifar(path: Path, split: str, transform: Callable | None, download: bool, format_name: str,
                table: dict, dataset_class: Callable, label_key: str) -> ArrayImageDataset:
    what = "CIFAR-10" if format_name == "cifar10" else "CIFAR-100"
    if split not in table:
        raise UserError(f"{what} has no split '{split}'; valid: {', '.join(table)}")
    folder, names = table[split]
    fetch = (lambda: dataset_class(root=path, train=split == "train", download=True)) if download else None
    files = _files_or_download(path, [f"{folder}/{name}" for name in names], what, fetch)
    images, labels, image_ids = [], [], []
    for file in files:
        with file.open("rb") as stream:
            batch = _ArrayUnpickler(stream, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)  # (N, 3072), channel-major rows
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        labels.extend(batch[label_key])
        image_ids.extend(f"{file.name}#{row}" for row in range(len(data)))
    return ArrayImageDataset(format_name, np.concatenate(images), image_ids, labels, files, transform)


@DATASET_FORMATS.register("cifar10")
def cifar10(path: Path, split: str, transform: Callable | None, download: bool = False) -> ArrayImageDataset:
    """CIFAR-10 from `path/cifar-10-batches-py` (train: data_batch_1..5, test: test_batch)."""
    return _read_cifar(path, split, transform, download, "cifar10", CIFAR10_FILES,
                       torchvision.datasets.CIFAR10, "labels")


@DATASET_FORMATS.register("cifar100")
def cifar100(path: Path, split: str, transform: Callable | None, download: bool = False) -> ArrayImageDataset:
    """CIFAR-100 from `path/cifar-100-python` (train, test), with the 100 fine labels."""
    return _read_cifar(path, split, transform, download, "cifar100", CIFAR100_FILES,
                       torchvision.datasets.CIFAR100, "fine_labels")


@DATASET_FORMATS.register("svhn")
def svhn(path: Path, split: str, transform: Callable | None, download: bool = False) -> ArrayImageDataset:
    """SVHN cropped digits from `path/<split>_32x32.mat`; label 10 there means digit 0."""
    if split not in SVHN_SPLITS:
        raise UserError(f"SVHN has no split '{split}'; valid: {', '.join(SVHN_SPLITS)}")
    fetch = (lambda: torchvision.datasets.SVHN(root=path, split=split, download=True)) if download else None
    [file] = _files_or_download(path, [f"{split}_32x32.mat"], "SVHN", fetch)
    mat = scipy.io.loadmat(file)
    images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))  # (32, 32, 3, N) -> (N, 32, 32, 3)
    labels = mat["y"].astype(np.int64).reshape(-1) % 10  # 10 -> 0, 1..9 unchanged
    image_ids = [f"{file.name}#{row}" for row in range(len(images))]
    return ArrayImageDataset("svhn", images, image_ids, labels, [file], transform)
