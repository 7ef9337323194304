"""Per-image scores stored with a run (scores.npz), so comparisons, intervals and plots can be redone without
re-scoring. Arrays only (numpy's own format, read with allow_pickle=False): the detector names, the set names
(the ID set first), and per set its image ids and a (detectors, images) matrix of scores."""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from errors import UserError
from pipeline.report.manifest import check_against_manifest
from pipeline.result import RunScores

SCORES_FILE = "scores.npz"


def scores_writer(scores: RunScores) -> Callable[[Path], None]:
    """write(path) of scores.npz: every set's image ids and (detectors, images) score matrix, the ID set first."""
    arrays: dict[str, np.ndarray] = {"detectors": np.array(scores.detectors), "sets": np.array(list(scores.scores))}
    for name, by_detector in scores.scores.items():
        matrix = np.stack([np.asarray(by_detector[detector], dtype=np.float64) for detector in scores.detectors])
        if matrix.shape[1] != len(scores.image_ids[name]):
            raise ValueError(f"{name}: {matrix.shape[1]} scores but {len(scores.image_ids[name])} image ids")
        arrays[f"ids:{name}"] = np.array(scores.image_ids[name], dtype=str)
        arrays[f"scores:{name}"] = matrix

    def write(path: Path) -> None:
        with path.open("wb") as file:
            np.savez_compressed(file, **arrays)
    return write


def read_scores(run_dir: Path) -> RunScores:
    """The scores.npz of a run's output folder, checked against the folder's manifest and against itself (one
    finite score per image id, per detector, for every set); a UserError names the file and what is wrong."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} a run's output folder (written by this version)?")
    check_against_manifest(path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            detectors = [str(name) for name in stored["detectors"]]
            sets = [str(name) for name in stored["sets"]]
            image_ids = {name: stored[f"ids:{name}"] for name in sets}
            matrices = {name: stored[f"scores:{name}"] for name in sets}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # not numpy's, or cut short
        raise UserError(f"{path} is not a scores file of this repository ({error})") from None
    for name, matrix in matrices.items():
        expected = (len(detectors), len(image_ids[name]))
        if matrix.ndim != 2 or matrix.shape != expected or not np.isfinite(matrix).all() or not expected[1]:
            raise UserError(f"{path}: the scores of set '{name}' are {matrix.dtype} {matrix.shape}, expected finite "
                            f"numbers of shape {expected} (detectors, images)")
    if not sets or len(set(detectors)) < len(detectors):
        raise UserError(f"{path}: no sets, or a detector named twice ({detectors})")
    return RunScores(sets[0], detectors, image_ids, {name: dict(zip(detectors, matrices[name])) for name in sets})
