"""Image-file formats: ImageFolder class folders, ImageNet-V2 numbered folders, flat OOD folders."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from dataloaders.base import DATASET_FORMATS, FileImageDataset
from errors import UserError, did_you_mean

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker, then the first segment's marker byte
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_THEN_QUANTISATION_TABLE = b"\xff\xd8\xff\xdb"  # SOI, then DQT: a bare JPEG with no APPn header
JFIF_OR_EXIF_TAGS = (b"JFIF", b"Exif")  # at bytes 6-10: the name of an APP0 / APP1 segment right after SOI


def natural_key(name: str) -> tuple[list[str | int], str]:
    """Sort key putting 'img2.jpg' before 'img10.jpg'; the name itself breaks ties ('a01' vs 'a1')."""
    parts = re.split(r"(\d+)", name)  # text at even positions, digit runs at odd ones
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name


def is_jpeg_or_png(path: Path) -> bool:
    """True when the file starts with the JPEG or PNG signature, whatever its extension or first JPEG segment."""
    with path.open("rb") as stream:
        head = stream.read(len(PNG_MAGIC))
    return head.startswith(JPEG_MAGIC) or head == PNG_MAGIC


def is_jpeg_or_png_by_imghdr_rule(path: Path) -> bool:
    """True when Python's `imghdr.what(path) in ['jpeg', 'png']`: the test the paper's code used to pick the
    files of a flat OOD folder, stated here because imghdr is gone from Python 3.13.

    imghdr calls a file JPEG when bytes 6-10 read 'JFIF' or 'Exif' (whatever the first bytes are), or when it
    starts FF D8 FF DB; PNG when it starts with the PNG signature. So JPEGs whose first segment is an ICC
    profile, XMP, Adobe (CMYK) or Photoshop header are not members, and a non-image with 'JFIF' there is.
    """
    with path.open("rb") as stream:
        head = stream.read(10)  # bytes 0-9 hold everything the three tests look at
    return head[6:10] in JFIF_OR_EXIF_TAGS or head.startswith((JPEG_THEN_QUANTISATION_TABLE, PNG_MAGIC))


# flat_folder's dataset option `membership`: its value -> the test a file must pass to be one of the images
FLAT_FOLDER_MEMBERSHIP: dict[str, Callable[[Path], bool]] = {
    "paper": is_jpeg_or_png_by_imghdr_rule,  # as the paper's code: the published tables used this set
    "any_jpeg_png": is_jpeg_or_png,  # every file that starts with a JPEG or PNG signature
}


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


def _skipped_files_message(path: Path, not_images: list[str], jpegs_left_out: list[str], membership: str) -> str:
    """One line: how many files of a flat folder were skipped and why, with the first of each kind."""
    where = f" in {path}"
    reasons = []
    if not_images:
        reasons.append(f"{len(not_images)} files{where} that are not JPEG or PNG (first: {not_images[0]})")
        where = ""
    if jpegs_left_out:
        reasons.append(f"{len(jpegs_left_out)} JPEG files{where} that membership '{membership}' leaves out "
                       f"(like imghdr, it wants JFIF or Exif at bytes 6-10 or FF D8 FF DB at the start; "
                       f"first: {jpegs_left_out[0]}; the dataset option 'membership: any_jpeg_png' keeps them)")
    return "skipped " + " and ".join(reasons)


@DATASET_FORMATS.register("flat_folder")
def flat_folder(path: Path, split: str, transform: Callable | None, download: bool = False,
                membership: str = "paper") -> FileImageDataset:
    """All JPEG/PNG files directly in one folder (OOD sets), unlabelled, in natural name order.

    `membership` says which files are the set's images: "paper" (imghdr's test, as the paper's code applied it)
    or "any_jpeg_png" (every file with a JPEG or PNG signature). The others are logged and listed in `skipped`."""
    if not isinstance(membership, str) or membership not in FLAT_FOLDER_MEMBERSHIP:
        raise UserError(f"flat_folder: unknown value {membership!r} for the dataset option 'membership'"
                        f"{did_you_mean(str(membership), FLAT_FOLDER_MEMBERSHIP)}; "
                        f"valid: {', '.join(FLAT_FOLDER_MEMBERSHIP)}")
    is_member = FLAT_FOLDER_MEMBERSHIP[membership]
    layout = "JPEG or PNG images directly in that folder"
    _require_folder(path, layout)
    image_ids, skipped, not_images, jpegs_left_out = [], [], [], []
    files = [entry for entry in path.iterdir() if entry.is_file()]
    for file in sorted(files, key=lambda file: natural_key(file.name)):
        if is_member(file):
            image_ids.append(file.name)
        else:
            skipped.append(file.name)
            (jpegs_left_out if is_jpeg_or_png(file) else not_images).append(file.name)
    message = _skipped_files_message(path, not_images, jpegs_left_out, membership) if skipped else ""
    if not image_ids:
        raise UserError(f"no images in {path}; expected {layout}" + (f" ({message})" if message else ""))
    if message:
        log.warning("%s", message)
    return FileImageDataset("flat_folder", path, image_ids, [-1] * len(image_ids), transform, skipped)
