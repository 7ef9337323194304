"""A run's output folder: `write_result` writes an ExperimentResult as results.csv, results_openood.csv,
averages.csv, results.md, config.yaml, scores.npz and the plots, replacing the previous run's files as one set.

`results-manifest.json`, written last, lists the complete set, so the folder never holds two runs' files at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from errors import UserError
from pipeline.files import exclusive_lock, full_disk_is_a_user_error, remove_unfinished_files
from pipeline.config.experiment import ResolvedExperiment, display_name
from pipeline.report.manifest import file_sha256, is_result_file_name, listed_files, write_manifest
from pipeline.report.plots import safe_file_name, score_plot_writers
from pipeline.report.rows import (AVERAGE_COLUMNS, AVERAGES_FILE, CSV_COLUMNS, OPENOOD_COLUMNS, OPENOOD_FILE,
                                  RESULTS_FILE, csv_text)
from pipeline.report.scores import SCORES_FILE, scores_writer
from pipeline.report.tables import (format_markdown, format_terminal, has_interval, intervals_legend, paper_table,
                                    paper_table_legend)
from pipeline.result import ExperimentResult

log = logging.getLogger(__name__)

# the keys of config.yaml that make a run another run: its results are not comparable rows of the same table
RUN_IDENTITY = ("model", "train_data", "id_data", "ood_data", "detectors")
_STAGING = ".results-staging"     # a run's files before they are renamed in; a killed run's is removed by the next
_RESULTS_LOCK = ".results.lock"   # exclusive_lock: one run at a time stages and replaces a folder's results


TEXT_FILES = (RESULTS_FILE, OPENOOD_FILE, "results.md", "config.yaml", AVERAGES_FILE)  # result_documents' files


def result_documents(result: ExperimentResult) -> tuple[dict[str, str], str]:
    """({file name: text} of the run's text files, the terminal table). The notes (e.g. that the sets are subsets)
    go above the table, in results.md and the terminal."""
    rows, averages, notes = result.rows, result.averages, result.notes
    table = paper_table(rows, averages)
    first = rows[0]
    title = (f"# {first.model}: ID {first.id_data}, bank from {first.train_data} "
             f"(ID accuracy {first.id_acc:.2f}%)\n\n" + "".join(f"**{note}**\n\n" for note in notes)
             + f"{paper_table_legend(table)}\n\n")
    below = (f"\n{intervals_legend(f'{100 * result.config.ci_level:g}%')}\n"
             if any(has_interval(cell) for line in table[1:] for cell in line) else "")
    resolved = {**result.config.to_dict(), "provenance": dict(result.provenance)}
    documents = {RESULTS_FILE: csv_text(rows, CSV_COLUMNS), OPENOOD_FILE: csv_text(rows, OPENOOD_COLUMNS),
                 "results.md": title + format_markdown(table) + below,
                 "config.yaml": yaml.safe_dump(resolved, sort_keys=False),
                 AVERAGES_FILE: csv_text(averages, AVERAGE_COLUMNS)}
    return documents, "".join(f"{note}\n" for note in notes) + format_terminal(table) + below.rstrip("\n")


def write_result(result: ExperimentResult, output_dir: Path | str | None = None) -> str:
    """Replace the previous results in `output_dir` (default: the config's) with this result's files, as one set:
    the tables, config.yaml, scores.npz and, when the config asks for them, the plots. Returns the terminal table."""
    documents, terminal = result_documents(result)
    writers: dict[str, Callable[[Path], Any]] = {name: (lambda path, text=text: path.write_text(text))
                                                 for name, text in documents.items()}
    writers[SCORES_FILE] = scores_writer(result.scores)
    if result.config.plots:
        writers.update(score_plot_writers(result.scores))
    replace_run_files(Path(output_dir if output_dir is not None else result.config.output_dir), writers,
                      result.config.to_dict())
    return terminal


def check_output_dir(experiment: ResolvedExperiment, output_dir: Path | str | None = None) -> None:
    """Before anything runs: the output folder (default: the config's) lies neither inside the cache nor inside an
    image folder the run reads (its plots would become images of that set), and holds no file a run would replace
    that no run of ours wrote."""
    config = experiment.config
    output = Path(output_dir if output_dir is not None else config.output_dir)
    resolved = output.expanduser().resolve()
    inputs = {"the feature cache (--cache-dir)": Path(config.cache_dir)}
    for name, dataset in experiment.datasets.items():
        inputs.update({f"the {split} images of dataset '{name}'": Path(config.data_root) / folder
                       for split, folder in dataset.splits.items()})
    for what, place in inputs.items():
        if resolved.is_relative_to(place.expanduser().resolve()):
            raise UserError(f"--output-dir {output} is inside {what} ({place}); choose a folder outside it")
    names = [*TEXT_FILES, SCORES_FILE]
    if config.plots:
        names += [f"{kind}_{safe_file_name(display_name(name))}.png" for name in config.ood_data
                  for kind in ("scores", "roc")]
    refuse_foreign_files(output, names)


def replace_run_files(output_dir: Path, writers: Mapping[str, Callable[[Path], Any]],
                      resolved_config: Mapping[str, Any]) -> None:
    """`replace_result_files`, saying in the log when the folder held another run's results (RUN_IDENTITY)."""
    previous = _run_identity_on_disk(output_dir)
    replace_result_files(output_dir, writers)
    current = yaml.safe_load(yaml.safe_dump({key: resolved_config.get(key) for key in RUN_IDENTITY}))
    if previous is not None and previous != current:
        log.warning("%s held another run's results (model %s, ID %s, OOD %s, detectors %s); replaced them whole",
                    output_dir, previous.get("model", "?"), previous.get("id_data", "?"),
                    previous.get("ood_data", "?"), list(previous.get("detectors") or ["?"]))
    elif previous is not None:
        log.info("replaced the previous results of this run in %s", output_dir)


def _run_identity_on_disk(output_dir: Path) -> dict[str, Any] | None:
    """RUN_IDENTITY's values from the config.yaml of the results the folder holds; None without any."""
    if "config.yaml" not in listed_files(output_dir):
        return None
    try:
        config = yaml.safe_load((output_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):  # removed or edited by hand: the results are replaced all the same
        return {}
    return {key: config.get(key) for key in RUN_IDENTITY} if isinstance(config, dict) else {}


def replace_result_files(output_dir: Path, writers: Mapping[str, Callable[[Path], Any]]) -> list[Path]:
    """Replace the files of the folder's previous run by `writers`' ({file name: write(path)}) as one set.

    Under the folder's lock, every file is first written into `.results-staging/`; then the manifest is marked
    incomplete (listing the old files and the new), the files it lists are removed, the new ones renamed in,
    and the manifest, written last, lists them with their sha256. A run killed while writing leaves the previous
    results whole (its staging folder is removed by the next run); one killed while renaming leaves a manifest
    saying "complete": false, whose files the next run removes. Files the manifest never listed (the user's own,
    a sweep's subfolders) are left alone."""
    for name in writers:
        if not is_result_file_name(name):
            raise ValueError(f"result file name {name!r} is not a plain file name, or is the manifest's")
    output_dir = Path(output_dir)
    with exclusive_lock(output_dir / _RESULTS_LOCK, f"the results in {output_dir}"):
        refuse_foreign_files(output_dir, writers)
        staging = output_dir / _STAGING
        if staging.is_dir():
            remove_unfinished_files(staging, lambda name: True)
        staging.mkdir(exist_ok=True)
        checksums = {}
        for name, write in writers.items():  # the slow part (plots): the previous results stay whole meanwhile
            with full_disk_is_a_user_error(output_dir, name):  # the staging folder is private: no temporaries
                write(staging / f"{name}.part")
            checksums[name] = hashlib.sha256((staging / f"{name}.part").read_bytes()).hexdigest()
        replaced = set(listed_files(output_dir)) | set(writers)
        write_manifest(output_dir, complete=False, files=dict.fromkeys(sorted(replaced)))
        for name in replaced:
            (output_dir / name).unlink(missing_ok=True)
        for name in writers:
            os.replace(staging / f"{name}.part", output_dir / name)
        write_manifest(output_dir, complete=True, files=checksums)
        staging.rmdir()
    return [output_dir / name for name in writers]


def foreign_files(output_dir: Path, names: Iterable[str]) -> list[str]:
    """Of `names` and the files the folder's manifest lists, those the folder holds that no run of ours wrote as
    they are now: a file the manifest does not list, one it lists with another checksum (changed since), or a
    folder in a file's place."""
    if not output_dir.is_dir():  # nothing there yet (or a file in its place: require_writable reports that)
        return []
    listed = listed_files(output_dir)
    foreign = []
    for name in sorted(set(names) | set(listed)):
        path = output_dir / name
        if path.is_dir():
            foreign.append(f"{name}/")
        elif path.is_file() and (name not in listed or listed[name] not in (None, file_sha256(path))):
            foreign.append(name)
    return foreign


def refuse_foreign_files(output_dir: Path, names: Iterable[str]) -> None:
    """A UserError naming the files of `foreign_files`: a run replaces and deletes only what a run of ours wrote."""
    foreign = foreign_files(Path(output_dir), names)
    if foreign:
        raise UserError(f"{output_dir} holds {', '.join(foreign)}, which no run of this repository wrote there as "
                        f"they are now; a run never replaces them: move them, or choose another --output-dir")
