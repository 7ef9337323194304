"""The feature cache: raw penultimate features of an ordered image list, stored as row-range files.

An entry is a folder named after the hash of its key (model + weights checksum, dataset + image list
fingerprint, order, transform, precision, cache format), holding `key.json`, files `rows_<start>_<end>.npy`
and, beside each, `rows_<start>_<end>.json` with the file's sha256, shape and the rows whose image could
not be decoded. Every file is written to a temporary name and renamed, the `.json` before its `.npy`, so a
rows file that exists is complete and described; one whose checksum or shape does not match is reported,
deleted and recomputed. Rows missing from an entry are extracted and added, which makes an interrupted
extraction resume where it stopped and lets a larger bank (a prefix of the same permutation) reuse the
smaller one. `FeatureEntry.locked()` serialises the processes that share an entry and, once it holds the lock,
removes the temporary files a killed run left in it. Arrays only: everything is read with allow_pickle=False.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from errors import UserError
from pipeline.files import exclusive_lock, is_temporary, remove_unfinished_files, write_atomically

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: a sha256 / shape / broken-rows sidecar per rows file, and a lock file
_ROWS_FILE = re.compile(r"rows_(\d{9})_(\d{9})\.npy")
_SHARD_FILE = re.compile(r"shard-\d{5}\.npz")  # one torchrun rank's rows, joined by rank 0 and then deleted

def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _is_unfinished_entry_file(name: str) -> bool:
    """A killed run's file in a cache entry: a temporary file, or a torchrun rank's shard."""
    return is_temporary(name) or _SHARD_FILE.fullmatch(name) is not None


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
        stored = self._stored_key(report_corrupt=False)
        if stored is not None and stored != json.loads(json.dumps(key)):
            raise UserError(f"cache entry {self.directory} holds a different key; delete the folder")

    def writable(self) -> bool:
        """Whether this user can take the entry's lock and write in it (a missing entry can be made)."""
        if not self.directory.exists():
            return True
        lock = self.directory / "lock"
        return os.access(self.directory, os.W_OK | os.X_OK) and (not lock.exists() or os.access(lock, os.W_OK))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the entry's lock (`exclusive_lock` on `<entry>/lock`): one process at a time verifies, extracts
        and writes. Taking it, first remove what a killed run left (temporary files, torchrun shards) and
        write `key.json` if it is missing: every file of an entry is written under its lock (torchrun's other
        ranks write their shards only after rank 0, which holds it, has cleaned up and sent them their rows)."""
        with exclusive_lock(self.directory / "lock", str(self.directory)):
            remove_unfinished_files(self.directory, _is_unfinished_entry_file)
            if self._stored_key(report_corrupt=True) is None:
                write_atomically(self.directory / "key.json",
                                 lambda path: path.write_text(json.dumps(self.key, indent=1, sort_keys=True)))
            yield

    def _stored_key(self, report_corrupt: bool) -> dict[str, Any] | None:
        """The key in `key.json`; None when the file is missing or corrupt (reported if `report_corrupt`)."""
        key_file = self.directory / "key.json"
        try:
            return json.loads(key_file.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            if report_corrupt:
                log.warning("cache file %s is corrupt; rewriting it", key_file)
            return None

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
            self.delete_rows(start, end)

    def load(self, num_rows: int, feature_dim: int, images_sha256: Callable[[int, int], str] | None = None,
             delete_failed: bool = True) -> list[StoredRows]:
        """Every rows file that overlaps [0, num_rows), each read once and verified against its sidecar and
        against the model's feature width `feature_dim`.

        A file that is unreadable, whose checksum or shape differs from its sidecar, or whose rows are not
        `feature_dim` wide (a folder copied from another model, an edited model config) is reported, deleted
        and left out, to be recomputed. With `images_sha256` ((start, end) -> the content hash of those rows'
        images now), so is a file whose recorded hash differs or that was written without one. Without
        `delete_failed` (an entry this user cannot write), such files are only left out."""
        loaded = []
        for start, end in self.stored_ranges():
            if start >= num_rows:
                continue
            rows = self.read_verified(start, end, feature_dim, images_sha256)
            if rows is not None:
                loaded.append(rows)
            elif delete_failed:
                self.delete_rows(start, end)
        return loaded

    def write_rows(self, start: int, features: np.ndarray, broken: list[int],
                   images_sha256: str | None = None) -> StoredRows:
        """Store rows [start, start + len(features)); `broken` are entry row indices of undecodable images;
        `images_sha256`, the content hash of the rows' images, is recorded for runs that verify it."""
        end = start + len(features)
        array = np.ascontiguousarray(features, dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, array)
        data = buffer.getvalue()
        sidecar = {"sha256": hashlib.sha256(data).hexdigest(), "shape": list(array.shape), "dtype": "float32",
                   "broken_rows": sorted(broken)}
        if images_sha256 is not None:
            sidecar["images_sha256"] = images_sha256
        write_atomically(self._path(start, end, ".json"), lambda path: path.write_text(json.dumps(sidecar)))
        write_atomically(self._path(start, end, ".npy"), lambda path: path.write_bytes(data), len(data))
        return StoredRows(start, end, array, tuple(sorted(broken)))

    def read_verified(self, start: int, end: int, feature_dim: int,
                      images_sha256: Callable[[int, int], str] | None = None) -> StoredRows | None:
        """Rows file [start, end) if it passes `load`'s checks, else None (with a warning). It deletes nothing,
        so a process may read another entry without holding that entry's lock: files appear and vanish whole."""
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
        if array.shape[1] != feature_dim:  # its sidecar agrees: written by another model, or before a config edit
            log.warning("cache file %s holds features of width %d, the model's are %d wide (a cache folder copied "
                        "from another model, or an edited model config?); recomputing it", path, array.shape[1],
                        feature_dim)
            return None
        if images_sha256 is not None:
            recorded = sidecar.get("images_sha256")  # no record: nothing to compare, so no image is read
            if recorded is None or recorded != images_sha256(start, end):
                reason = "were cached without their content hash" if recorded is None else "have changed"
                log.warning("the images of cache file %s %s (--verify-image-content); recomputing it", path, reason)
                return None
        return StoredRows(start, end, array, tuple(sidecar.get("broken_rows", ())))

    def delete_rows(self, start: int, end: int) -> None:
        for suffix in (".npy", ".json"):  # the data first: a rows file never outlives its sidecar
            self._path(start, end, suffix).unlink(missing_ok=True)

    def _path(self, start: int, end: int, suffix: str) -> Path:
        return self.directory / f"rows_{start:09d}_{end:09d}{suffix}"


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of the entry's grid to (re)write, rows [start, end): the rows from `compute_from` on are forwarded,
    the ones before it come from the stored files."""

    start: int
    compute_from: int
    end: int

    def supersedes(self, rows: StoredRows) -> bool:
        """Whether the chunk's new file replaces the stored file `rows`: one that lies within the chunk."""
        return self.start <= rows.start and rows.end <= self.end


def plan_chunks(stored: list[StoredRows], num_rows: int, chunk_size: int, batch_size: int) -> list[ChunkPlan]:
    """The chunks [k * chunk_size, (k + 1) * chunk_size) of [0, num_rows) that `stored` does not cover whole, each
    forwarded from its first uncovered row rounded down to a batch boundary of the chunk. So every row is
    computed in the batch a fresh extraction computes it in, whatever the cache held before: the last, partial
    chunk of a smaller bank of the same order keeps its rows up to that boundary and recomputes the rest."""
    covered = np.zeros(num_rows, dtype=bool)
    for rows in stored:
        covered[rows.start:min(rows.end, num_rows)] = True
    plans = []
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        if not covered[start:end].all():
            first_missing = int(np.argmin(covered[start:end]))
            plans.append(ChunkPlan(start, start + first_missing // batch_size * batch_size, end))
    return plans


def assemble(stored: list[StoredRows], num_rows: int, start: int = 0) -> tuple[np.ndarray, list[int]]:
    """Rows [start, num_rows) as one float32 array, and the broken rows among them; all must be stored."""
    parts, broken, position = [], [], start
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
