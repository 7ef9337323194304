"""Image-file formats: ImageFolder class folders, ImageNet-V2 numbered folders, flat OOD folders."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from dataloaders.base import DATASET_FORMATS, FileImageDataset
from errors import UserError

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def natural_key(name: str) -> tuple[list[str | int], str]:
    """Sort key putting 'img2.jpg' before 'img10.jpg'; the name itself breaks ties ('a01' vs 'a1')."""
    parts = re.split(r"(\d+)", name)  # text at even positions, digit runs at odd ones
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name


def is_jpeg_or_png(path: Path) -> bool:
    """True when the file starts with the JPEG or PNG signature, whatever its extension says."""
    with path.open("rb") as stream:
        head = stream.read(len(PNG_MAGIC))
    return head.startswith(JPEG_MAGIC) or head == PNG_MAGIC


def _require_folder(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise UserError(f"dataset folder {path} does not exist; expected {layout}")


@DATASET_FORMATS.register("class_folders")
def class_folders(path: Path, split: str, transform: Callable | None, download: bool = False) -> FileImageDataset:
    """torchvision ImageFolder: one sub-folder per class, classes indexed in sorted name order."""
    layout = "one sub-folder per class holding its images, as torchvision's ImageFolder reads"
    _require_folder(path, layout)
    try:
        classes, class_to_idx = find_classes(path)
        samples = make_dataset(path, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as error:  # no class folder, or a class folder without images
        raise UserError(f"no images in {path} ({error}); expected {layout}") from error
    image_ids = [Path(file).relative_to(path).as_posix() for file, _ in samples]
    return FileImageDataset("class_folders", path, image_ids, [label for _, label in samples], transform)


@DATASET_FORMATS.register("class_index_folders")
def class_index_folders(path: Path, split: str, transform: Callable | None,
                        download: bool = False) -> FileImageDataset:
    """ImageNet-V2: folders named 0..999 whose number is the label (not their string-sorted rank)."""
    layout = "sub-folders named by class index (0, 1, ..., 999) holding the images"
    _require_folder(path, layout)
    folders = [entry for entry in path.iterdir() if entry.is_dir()]
    not_numbers = [folder.name for folder in folders if not folder.name.isdigit()]
    if not_numbers:
        raise UserError(f"{path} has sub-folders not named by a class index: {', '.join(sorted(not_numbers))}; "
                        f"expected {layout}")
    image_ids, labels = [], []
    for folder in sorted(folders, key=lambda folder: int(folder.name)):
        files = [file.name for file in folder.iterdir()
                 if file.is_file() and has_file_allowed_extension(file.name, IMG_EXTENSIONS)]
        for name in sorted(files, key=natural_key):
            image_ids.append(f"{folder.name}/{name}")
            labels.append(int(folder.name))
    if not image_ids:
        raise UserError(f"no images in {path}; expected {layout}")
    return FileImageDataset("class_index_folders", path, image_ids, labels, transform)


@DATASET_FORMATS.register("flat_folder")
def flat_folder(path: Path, split: str, transform: Callable | None, download: bool = False) -> FileImageDataset:
    """All JPEG/PNG files directly in one folder (OOD sets), unlabelled, in natural name order."""
    layout = "JPEG or PNG images directly in that folder"
    _require_folder(path, layout)
    image_ids, skipped = [], []
    files = [entry for entry in path.iterdir() if entry.is_file()]
    for file in sorted(files, key=lambda file: natural_key(file.name)):
        (image_ids if is_jpeg_or_png(file) else skipped).append(file.name)
    if not image_ids:
        raise UserError(f"no images in {path}; expected {layout}")
    if skipped:
        log.warning("skipped %d files in %s that are not JPEG or PNG (first: %s)", len(skipped), path, skipped[0])
    return FileImageDataset("flat_folder", path, image_ids, [-1] * len(image_ids), transform, skipped)
