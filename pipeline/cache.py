"""The feature cache: raw penultimate features of an ordered image list, stored as row-range files.

An entry is a folder named after the hash of its key (model + weights checksum, dataset + image list
fingerprint, order, transform, precision, cache format), holding `key.json`, files `rows_<start>_<end>.npy`
and, beside each, `rows_<start>_<end>.json` with the file's sha256, shape and the rows whose image could
not be decoded. Every file is written to a temporary name and renamed, the `.json` before its `.npy`, so a
rows file that exists is complete and described; one whose checksum or shape does not match is reported,
deleted and recomputed. Rows missing from an entry are extracted and added, which makes an interrupted
extraction resume where it stopped and lets a larger bank (a prefix of the same permutation) reuse the
smaller one. `FeatureEntry.locked()` serialises the processes that share an entry. Arrays only: everything
is read with allow_pickle=False.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: a sha256 / shape / broken-rows sidecar per rows file, and a lock file
_ROWS_FILE = re.compile(r"rows_(\d{9})_(\d{9})\.npy")


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(temporary_path), then rename it to `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@dataclass(frozen=True)
class StoredRows:
    """One verified rows file: rows [start, end) of the entry, and which of them are broken images."""

    start: int
    end: int
    features: np.ndarray  # (end - start, D) float32; NaN rows where the image could not be decoded
    broken: tuple[int, ...]  # entry row indices (not offsets) of images that could not be decoded


class FeatureEntry:
    """One cache entry; rows are indices into its ordered image list."""

    def __init__(self, cache_dir: Path, key: dict[str, Any], label: str) -> None:
        key = {"cache_format": CACHE_FORMAT_VERSION, **key}
        self.directory = Path(cache_dir) / f"{label}-{key_digest(key)[:16]}"
        self.key = key
        key_file = self.directory / "key.json"
        stored = None
        if key_file.is_file():
            try:
                stored = json.loads(key_file.read_text())
            except json.JSONDecodeError:
                log.warning("cache file %s is corrupt; rewriting it", key_file)
        if stored is None:
            write_atomically(key_file, lambda path: path.write_text(json.dumps(key, indent=1, sort_keys=True)))
        elif stored != json.loads(json.dumps(key)):
            raise UserError(f"cache entry {self.directory} holds a different key; delete the folder")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive flock on `<entry>/lock`: one process at a time verifies, extracts and writes.

        Advisory and POSIX-only: it excludes other runs of this code, not other programs, and depends on
        the file system honouring flock (local disks do; some network file systems ignore it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "lock").open("a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another run to finish writing %s", self.directory)
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def stored_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every rows file, sorted."""
        ranges = []
        for path in self.directory.iterdir():
            match = _ROWS_FILE.fullmatch(path.name)
            if match:
                ranges.append((int(match.group(1)), int(match.group(2))))
        return sorted(ranges)

    def clear(self) -> None:
        """Delete every rows file and its sidecar (`--recompute`); the key stays."""
        for start, end in self.stored_ranges():
            self._delete(start, end)

    def load(self, num_rows: int) -> list[StoredRows]:
        """Every rows file that overlaps [0, num_rows), each read once and verified against its sidecar.

        A file that is unreadable or whose checksum or shape differs is reported, deleted and left out."""
        loaded = []
        for start, end in self.stored_ranges():
            if start >= num_rows:
                continue
            rows = self._load_verified(start, end)
            if rows is None:
                self._delete(start, end)
            else:
                loaded.append(rows)
        return loaded

    def write_rows(self, start: int, features: np.ndarray, broken: list[int]) -> StoredRows:
        """Store rows [start, start + len(features)); `broken` are entry row indices of undecodable images."""
        end = start + len(features)
        array = np.ascontiguousarray(features, dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, array)
        data = buffer.getvalue()
        sidecar = {"sha256": hashlib.sha256(data).hexdigest(), "shape": list(array.shape), "dtype": "float32",
                   "broken_rows": sorted(broken)}
        write_atomically(self._path(start, end, ".json"), lambda path: path.write_text(json.dumps(sidecar)))
        write_atomically(self._path(start, end, ".npy"), lambda path: path.write_bytes(data))
        return StoredRows(start, end, array, tuple(sorted(broken)))

    def _load_verified(self, start: int, end: int) -> StoredRows | None:
        path = self._path(start, end, ".npy")
        try:
            data = path.read_bytes()
            sidecar = json.loads(self._path(start, end, ".json").read_text())
        except FileNotFoundError as error:
            log.warning("cache file %s has no checksum (%s); recomputing it", path, error.filename)
            return None
        except json.JSONDecodeError:
            log.warning("cache file %s has a corrupt checksum file; recomputing it", path)
            return None
        if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
            log.warning("cache file %s does not match its checksum (truncated or corrupted); recomputing it", path)
            return None
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as error:
            log.warning("cache file %s cannot be read (%s); recomputing it", path, error)
            return None
        if (list(array.shape) != sidecar.get("shape") or array.ndim != 2 or len(array) != end - start
                or array.dtype != np.float32):
            log.warning("cache file %s holds %s %s, expected %d float32 rows; recomputing it", path,
                        array.dtype, array.shape, end - start)
            return None
        return StoredRows(start, end, array, tuple(sidecar.get("broken_rows", ())))

    def _delete(self, start: int, end: int) -> None:
        for suffix in (".npy", ".json"):  # the data first: a rows file never outlives its sidecar
            self._path(start, end, suffix).unlink(missing_ok=True)

    def _path(self, start: int, end: int, suffix: str) -> Path:
        return self.directory / f"rows_{start:09d}_{end:09d}{suffix}"


def missing_ranges(stored: list[StoredRows], num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges of [0, num_rows) not in `stored`, cut into pieces of at most chunk_size rows."""
    missing, position = [], 0
    for start, end in sorted((rows.start, rows.end) for rows in stored) + [(num_rows, num_rows)]:
        gap_end = min(start, num_rows)
        for piece_start in range(position, gap_end, chunk_size):
            missing.append((piece_start, min(piece_start + chunk_size, gap_end)))
        position = max(position, end)
        if position >= num_rows:
            break
    return missing


def assemble(stored: list[StoredRows], num_rows: int) -> tuple[np.ndarray, list[int]]:
    """Rows [0, num_rows) as one float32 array, and the broken rows among them; all must be stored."""
    parts, broken, position = [], [], 0
    for rows in sorted(stored, key=lambda rows: (rows.start, rows.end)):
        if position >= num_rows:
            break
        if rows.start > position or rows.end <= position:
            continue
        parts.append(rows.features[position - rows.start:num_rows - rows.start])
        broken += [row for row in rows.broken if position <= row < num_rows]
        position = min(rows.end, num_rows)
    if position < num_rows:
        raise RuntimeError(f"rows {position}..{num_rows} are not stored")
    return (np.concatenate(parts) if len(parts) > 1 else parts[0]), broken
