"""Per-image scores stored with a run (scores.npz), so comparisons, intervals and plots can be redone without
re-scoring. Arrays only (numpy's own format, read with allow_pickle=False): the detector names, the set names
(the ID set first), and per set its image ids and a (detectors, images) matrix of scores."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from errors import UserError
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
    """The scores.npz of a run's output folder; a UserError names the file when it is missing or not one."""
    path = Path(run_dir) / SCORES_FILE
    try:
        with np.load(path, allow_pickle=False) as stored:
            detectors = [str(name) for name in stored["detectors"]]
            sets = [str(name) for name in stored["sets"]]
            image_ids = {name: stored[f"ids:{name}"] for name in sets}
            scores = {name: dict(zip(detectors, stored[f"scores:{name}"])) for name in sets}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: is {run_dir} a run's output folder (written by this version)?") \
            from None
    except (OSError, ValueError, KeyError) as error:  # not a zip / not numpy's format / a key missing
        raise UserError(f"{path} is not a scores file of this repository ({error})") from None
    return RunScores(sets[0], detectors, image_ids, scores)
