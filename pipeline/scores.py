"""Per-image scores stored with a run (scores.npz), so comparisons, intervals and plots can be redone without
re-scoring. Arrays only (numpy's own format, read with allow_pickle=False): the detector names, the set names
(the ID set first), and per set its image ids and a (detectors, images) matrix of scores."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from errors import UserError

SCORES_FILE = "scores.npz"


@dataclasses.dataclass(frozen=True)
class RunScores:
    """A run's scores: `scores[set][detector]` (N,) float64 aligned with `image_ids[set]`; the ID set first."""

    id_set: str
    detectors: list[str]
    image_ids: dict[str, np.ndarray]
    scores: dict[str, dict[str, np.ndarray]]

    @property
    def ood_sets(self) -> list[str]:
        return [name for name in self.image_ids if name != self.id_set]


def scores_writer(id_set: str, id_scores: dict[str, np.ndarray], ood_scores: dict[str, dict[str, np.ndarray]],
                  image_ids: dict[str, list[str]]) -> Callable[[Path], None]:
    """write(path) of scores.npz for `write_results(extra_files=...)`: `id_scores[detector]`,
    `ood_scores[set][detector]` and each set's `image_ids`, in the scores' order."""
    detectors = list(id_scores)
    per_set = {id_set: id_scores, **ood_scores}
    arrays: dict[str, np.ndarray] = {"detectors": np.array(detectors), "sets": np.array(list(per_set))}
    for name, by_detector in per_set.items():
        matrix = np.stack([np.asarray(by_detector[detector], dtype=np.float64) for detector in detectors])
        if matrix.shape[1] != len(image_ids[name]):
            raise ValueError(f"{name}: {matrix.shape[1]} scores but {len(image_ids[name])} image ids")
        arrays[f"ids:{name}"] = np.array(image_ids[name], dtype=str)
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
