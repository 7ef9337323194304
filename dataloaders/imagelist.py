"""Image lists: a text file of `<path relative to an image root> <label>` lines, as OpenOOD's imglists are."""
from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from dataloaders.base import DATASET_FORMATS, FileImageDataset
from dataloaders.folders import unreadable_path_error
from errors import UserError

log = logging.getLogger(__name__)

LINE_FORMAT = "'<image path relative to the image root> <integer label>'"


def read_image_list(list_file: Path) -> tuple[list[str], list[int]]:
    """(image paths, labels) in file order. The label is a line's last whitespace-separated token, so paths
    may contain spaces; blank lines and lines starting with '#' are skipped, and so is a UTF-8 byte-order mark.
    A path that is absolute or leaves the image root ('..'), or an image listed twice, is a UserError naming
    the line(s)."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"image list {list_file} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise UserError(f"image list {list_file} is not a UTF-8 text file ({error})") from None
    except PermissionError:
        raise UserError(f"cannot read image list {list_file} (permission denied); make it readable") from None
    image_paths, labels = [], []
    first_lines: dict[str, int] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.rsplit(maxsplit=1)
        where = f"{list_file}, line {line_number}"
        if len(tokens) != 2:
            raise UserError(f"{where}: expected {LINE_FORMAT}, got {line!r}")
        image_path, label = tokens
        try:
            labels.append(int(label))
        except ValueError:
            raise UserError(f"{where}: the label {label!r} is not an integer; expected {LINE_FORMAT}") from None
        if PurePosixPath(image_path).is_absolute():
            raise UserError(f"{where}: {image_path!r} is absolute; paths are relative to the image root")
        if posixpath.normpath(image_path).split("/")[0] == "..":
            raise UserError(f"{where}: {image_path!r} leaves the image root ('..'); paths are relative to it")
        if image_path in first_lines:
            raise UserError(f"{where}: {image_path!r} is listed twice (lines {first_lines[image_path]} and "
                            f"{line_number}); an image listed twice would be scored twice")
        first_lines[image_path] = line_number
        image_paths.append(image_path)
    if not image_paths:
        raise UserError(f"image list {list_file} lists no images; expected lines {LINE_FORMAT}")
    return image_paths, labels


def _is_file(path: Path) -> bool:
    """True for a file (links followed); False when missing, a dangling link or a link loop (all 'missing')."""
    try:
        return path.is_file()
    except OSError as error:  # is_file answers False for the missing; this is e.g. a folder we may not read
        raise unreadable_path_error(path, error) from None


@DATASET_FORMATS.register("image_list")
def image_list(path: Path, split: str, transform: Callable | None, download: bool = False,
               image_root: str = ".", skip_missing: bool = False) -> FileImageDataset:
    """The images `path` (a list file) names, in its order, with its labels (OOD lists often say -1).

    `image_root` is relative to the list file's folder, or absolute. A listed file that does not exist (or is a
    dangling link) is a UserError, or with `skip_missing` skipped and listed in `skipped`; a listed path that
    cannot be looked at (permission denied) is always a UserError."""
    image_paths, labels = read_image_list(path)
    root = (path.parent / Path(image_root).expanduser()).resolve()  # an absolute image_root replaces the parent
    if not root.is_dir():
        raise UserError(f"image root {root} (image_root '{image_root}' from {path.parent}) is not a folder")
    exists = [_is_file(root / image_path) for image_path in image_paths]
    missing = [image_path for image_path, found in zip(image_paths, exists) if not found]
    if missing and not skip_missing:
        first = root / missing[0]
        dangling = f", a symbolic link to {os.readlink(first)}, which does not exist" if first.is_symlink() else ""
        raise UserError(f"{len(missing)} of the {len(image_paths)} images listed in {path} do not exist under "
                        f"{root} (first: {first}{dangling}); fix the list or image_root, or pass "
                        f"--skip-broken-images (dataset option skip_missing: true) to skip them")
    if missing:
        log.warning("skipped %d images listed in %s that do not exist under %s (first: %s)",
                    len(missing), path, root, missing[0])
        if len(missing) == len(image_paths):
            raise UserError(f"none of the {len(image_paths)} images listed in {path} exist under {root}")
    kept = [i for i, found in enumerate(exists) if found]
    return FileImageDataset("image_list", root, [image_paths[i] for i in kept], [labels[i] for i in kept],
                            transform, missing)
