"""Image-file formats: ImageFolder class folders, ImageNet-V2 numbered folders, flat OOD folders."""
from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

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


def unreadable_path_error(path: Path, error: OSError) -> UserError:
    """The UserError for a path met while listing that cannot be followed or read: what is wrong, and the fix."""
    if error.errno == errno.ELOOP:
        return UserError(f"{path} is a symbolic link that leads back to itself ({error.strerror}); remove it")
    if isinstance(error, PermissionError):
        return UserError(f"cannot read {path} (permission denied); make it readable to this user, or remove it")
    return UserError(f"cannot read {path} ({error.strerror}); fix or remove it")


class FolderWalk:
    """Lists the folders of one dataset tree, following symbolic links, so that symlink farms work.

    A UserError naming the path, raised while listing: a folder reached a second time, compared by
    (st_dev, st_ino) (a link loop, or two links to one folder); a link whose target is missing; a folder that
    cannot be listed. Why, where torchvision's make_dataset lists silently: docs/design.md ("Data loading")."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._reached: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> the folder first reached there
        self.enter(".")

    def enter(self, folder: str) -> None:
        """Note that the walk lists `folder` (relative to the root); reaching one folder twice is a UserError."""
        path = self.root / folder
        try:
            info = os.stat(path)
        except OSError as error:
            raise unreadable_path_error(path, error) from None
        first = self._reached.setdefault((info.st_dev, info.st_ino), folder)
        if first == folder:
            return
        if first == "." or folder.startswith(first + "/"):
            raise UserError(f"{path} is the folder {self.root / first} again: a symbolic-link loop, which would "
                            f"list the same images over and over; remove the link")
        raise UserError(f"{path} and {self.root / first} are the same folder (through a symbolic link), so its "
                        f"images would be listed twice; remove the link that duplicates it")

    def scan(self, folder: str) -> tuple[list[str], list[str]]:
        """(sub-folder names, file names) directly in `folder`, links followed, each in sorted order.

        Files are regular files or links to them; other entries (sockets, pipes, devices) are left out."""
        path = self.root / folder
        try:
            entries = list(os.scandir(path))
        except OSError as error:
            raise unreadable_path_error(path, error) from None
        folders, files = [], []
        for entry in entries:
            try:
                if entry.is_dir():
                    folders.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
                elif entry.is_symlink():
                    raise UserError(f"{entry.path} is a symbolic link to {os.readlink(entry.path)}, which does not "
                                    f"exist; remove the link or restore its target")
            except OSError as error:  # a link to itself (ELOOP), or into a folder this user may not read
                raise unreadable_path_error(Path(entry.path), error) from None
        return sorted(folders), sorted(files)

    def files_below(self, folder: str) -> list[str]:
        """Paths (relative to the root) of the files in `folder` and in every folder below it, in torchvision
        make_dataset's order: folders sorted by path string, as `sorted(os.walk(...))`, files by name in each."""
        listed: list[tuple[str, list[str]]] = []  # (folder, its file names)
        pending = [folder]
        while pending:
            current = pending.pop()
            self.enter(current)
            subfolders, files = self.scan(current)
            listed.append((current, files))
            pending.extend(f"{current}/{name}" for name in reversed(subfolders))  # pop() takes them in order
        return [f"{current}/{name}" for current, files in sorted(listed) for name in files]


def _image_extension(name: str) -> bool:
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


@DATASET_FORMATS.register("class_folders")
def class_folders(path: Path, split: str, transform: Callable | None, download: bool = False) -> FileImageDataset:
    """torchvision ImageFolder: one sub-folder per class, classes indexed in sorted name order, images found at
    any depth below them (links followed) in ImageFolder's order; see FolderWalk for what stops the listing."""
    layout = "one sub-folder per class holding its images, as torchvision's ImageFolder reads"
    _require_folder(path, layout)
    walk = FolderWalk(path)
    classes, _ = walk.scan(".")
    if not classes:
        raise UserError(f"no images in {path} (no class folder); expected {layout}")
    image_ids, labels, empty_classes = [], [], []
    for label, class_name in enumerate(classes):
        found = [file for file in walk.files_below(class_name) if _image_extension(file)]
        image_ids += found
        labels += [label] * len(found)
        if not found:
            empty_classes.append(class_name)
    if empty_classes:
        raise UserError(f"no images in {path} (none in the class folders {', '.join(empty_classes)}; image "
                        f"extensions: {', '.join(IMG_EXTENSIONS)}); expected {layout}")
    return FileImageDataset("class_folders", path, image_ids, labels, transform)


@DATASET_FORMATS.register("class_index_folders")
def class_index_folders(path: Path, split: str, transform: Callable | None,
                        download: bool = False) -> FileImageDataset:
    """ImageNet-V2: folders named 0..999 whose number is the label (not their string-sorted rank)."""
    layout = "sub-folders named by class index (0, 1, ..., 999) holding the images"
    _require_folder(path, layout)
    walk = FolderWalk(path)
    folders, _ = walk.scan(".")
    not_numbers = [folder for folder in folders if not folder.isdigit()]
    if not_numbers:
        raise UserError(f"{path} has sub-folders not named by a class index: {', '.join(not_numbers)}; "
                        f"expected {layout}")
    image_ids, labels = [], []
    for folder in sorted(folders, key=int):
        walk.enter(folder)
        _, files = walk.scan(folder)
        for name in sorted(filter(_image_extension, files), key=natural_key):
            image_ids.append(f"{folder}/{name}")
            labels.append(int(folder))
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
    _, names = FolderWalk(path).scan(".")
    image_ids, skipped, not_images, jpegs_left_out = [], [], [], []
    for name in sorted(names, key=natural_key):
        file = path / name
        try:
            if is_member(file):
                image_ids.append(name)
            else:
                skipped.append(name)
                (jpegs_left_out if is_jpeg_or_png(file) else not_images).append(name)
        except OSError as error:  # the listing found it, but its first bytes cannot be read
            raise unreadable_path_error(file, error) from None
    message = _skipped_files_message(path, not_images, jpegs_left_out, membership) if skipped else ""
    if not image_ids:
        raise UserError(f"no images in {path}; expected {layout}" + (f" ({message})" if message else ""))
    if message:
        log.warning("%s", message)
    return FileImageDataset("flat_folder", path, image_ids, [-1] * len(image_ids), transform, skipped)
