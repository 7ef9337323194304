"""File I/O shared by the cache and the result writers: atomic writes, the locks runs take, full disks."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from errors import UserError

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"


def format_bytes(count: int) -> str:
    """A byte count for messages: '512 bytes', '4.1 kB', '81.9 MB', '1.20 GB'."""
    if count < 1000:
        return f"{count} bytes"
    for unit, size in (("kB", 1e3), ("MB", 1e6)):
        if count < 1000 * size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 1e9:.2f} GB"


@contextlib.contextmanager
def full_disk_is_a_user_error(folder: Path, file_name: str, expected_bytes: int | None = None) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT while writing into `folder` into one UserError saying what is needed and free."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        needed = f"needs {format_bytes(expected_bytes)}, " if expected_bytes is not None else ""
        try:
            free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        raise UserError(f"cannot write {file_name} in {folder}: {error.strerror} ({needed}{free}); free space "
                        f"there or choose another folder (--cache-dir for features, --output-dir for results)"
                        ) from error


def _create_temporary(path: Path) -> Path:
    """A new empty `.<name>.<random>.tmp` beside `path`, mode 0666 & ~umask as `open(path, "w")` would make it
    (tempfile.mkstemp makes 0600, which locks out the other users and nodes of a shared cache)."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def write_atomically(path: Path, write: Callable[[Path], Any], expected_bytes: int | None = None) -> None:
    """Call write(temporary_path), then rename it to `path`: readers never see a half-written file.

    The file's mode follows the umask; a full disk (or quota) is one UserError naming the folder, the space
    needed (`expected_bytes`, when the caller knows it) and the space free."""
    with full_disk_is_a_user_error(path.parent, path.name, expected_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _create_temporary(path)
        try:
            write(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def remove_unfinished_files(folder: Path, is_unfinished: Callable[[str], bool]) -> None:
    """Delete the files of `folder` whose name `is_unfinished` accepts; log their number and total size.

    Call it only while holding the lock that every writer of such files holds, so that a live writer's file
    is never among them: only those a killed run left behind are."""
    count = size = 0
    for path in sorted(folder.iterdir()):
        if is_unfinished(path.name) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                size += path.stat().st_size
                path.unlink()
                count += 1
    if count:
        log.info("removed %d unfinished file%s (%s) that an interrupted run left in %s", count,
                 "" if count == 1 else "s", format_bytes(size), folder)


def is_temporary(name: str) -> bool:
    """Whether `name` is a file `write_atomically` writes before renaming it: `.<name>.<random>.tmp`."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` while writing `what`; a run that has to wait logs that it waits.

    Advisory and POSIX-only: it excludes other runs of this code, not other programs, and depends on the file
    system honouring flock (local disks do; some network file systems ignore it)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run to finish writing %s (lock: %s)", what, lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def require_writable(folder: Path, what: str) -> None:
    """Fail now, not after hours of extraction, when `folder` cannot be created or written: a probe file is
    written in it, then the probe and the folders made for it are removed (a run that fails later leaves no empty
    folder behind; its writers create the folder again)."""
    folder = Path(folder)
    created = [parent for parent in [folder, *folder.parents] if not parent.exists()]
    try:
        for attempt in range(10):  # another process (a torchrun rank) may remove the folder it made meanwhile
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    break
            except (FileNotFoundError, FileExistsError):
                if attempt == 9:
                    raise
    except OSError as error:
        raise UserError(f"{what} {folder} is not writable ({error.strerror}); choose another folder") from None
    finally:
        for parent in created:  # deepest first
            with contextlib.suppress(OSError):  # not empty: another process writes there now
                parent.rmdir()
