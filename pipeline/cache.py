"""The feature cache: raw penultimate features of an ordered image list, stored as row-range files.

An entry is a folder named after the hash of its key (model + weights checksum, dataset + image list
fingerprint, order, transform, precision, cache format), holding `key.json` and files
`rows_<start>_<end>.npy`. Files are written to a temporary name and renamed, so a file that exists is
complete; rows missing from an entry are extracted and added, which makes an interrupted extraction
resume where it stopped and lets a larger bank (a prefix of the same permutation) reuse the smaller one.
Arrays only: everything is read with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from errors import UserError

CACHE_FORMAT_VERSION = 1
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


class FeatureEntry:
    """One cache entry; rows are indices into its ordered image list."""

    def __init__(self, cache_dir: Path, key: dict[str, Any], label: str) -> None:
        key = {"cache_format": CACHE_FORMAT_VERSION, **key}
        self.directory = Path(cache_dir) / f"{label}-{key_digest(key)[:16]}"
        self.key = key
        key_file = self.directory / "key.json"
        if key_file.is_file():
            stored = json.loads(key_file.read_text())
            if stored != json.loads(json.dumps(key)):
                raise UserError(f"cache entry {self.directory} holds a different key; delete the folder")
        else:
            write_atomically(key_file, lambda path: path.write_text(json.dumps(key, indent=1, sort_keys=True)))

    def stored_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every complete rows file, sorted."""
        ranges = []
        for path in self.directory.iterdir():
            match = _ROWS_FILE.fullmatch(path.name)
            if match:
                ranges.append((int(match.group(1)), int(match.group(2))))
        return sorted(ranges)

    def missing_ranges(self, num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
        """Row ranges of [0, num_rows) not yet stored, cut into pieces of at most chunk_size rows."""
        missing, position = [], 0
        for start, end in self.stored_ranges() + [(num_rows, num_rows)]:
            gap_end = min(start, num_rows)
            for piece_start in range(position, gap_end, chunk_size):
                missing.append((piece_start, min(piece_start + chunk_size, gap_end)))
            position = max(position, end)
            if position >= num_rows:
                break
        return missing

    def write_rows(self, start: int, features: np.ndarray) -> None:
        end = start + len(features)
        array = np.ascontiguousarray(features, dtype=np.float32)

        def save(path: Path) -> None:
            with path.open("wb") as file:
                np.save(file, array)
        write_atomically(self.directory / f"rows_{start:09d}_{end:09d}.npy", save)

    def read(self, num_rows: int) -> np.ndarray:
        """Rows [0, num_rows) as one float32 array; all of them must be stored."""
        parts, position = [], 0
        for start, end in self.stored_ranges():
            if position >= num_rows:
                break
            if start > position or end <= position:
                continue
            array = np.load(self.directory / f"rows_{start:09d}_{end:09d}.npy", allow_pickle=False)
            if array.ndim != 2 or len(array) != end - start:
                raise UserError(f"cache file {self.directory}/rows_{start:09d}_{end:09d}.npy has shape "
                                f"{array.shape}, expected {end - start} rows; delete it to recompute")
            parts.append(array[position - start:num_rows - start])
            position = min(end, num_rows)
        if position < num_rows:
            raise RuntimeError(f"{self.directory}: rows {position}..{num_rows} are not stored")
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
