"""Data integrity of what runs write: file modes, a killed run's leftovers, lock holders, feature widths, full
disks, and a results folder that always holds one run's files."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import main
import pipeline.report.outputs
from errors import UserError
from pipeline.features.cache import FeatureEntry
from pipeline.features.extract import ExtractionSettings, FeatureExtractor
from pipeline.files import exclusive_lock, is_temporary, write_atomically
from pipeline.report.manifest import RESULTS_MANIFEST
from pipeline.report.outputs import replace_run_files, result_documents, write_result
from tests.fake_results import fake_result
from tests.main_process import start_main
from tests.test_reliability import (HANG, ONE_THREAD, REPO, CountingBackbone, colour_dataset, extract,
                                   main_arguments, wait_for)

PIPELINE_FILES = {"results.csv", "results_openood.csv", "results.md", "config.yaml"}


class WiderBackbone(CountingBackbone):
    """The counting backbone's three features padded with zeros to `feature_dim`: another model's width."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = self.row_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(super().features(images), (0, self.feature_dim - 3))  # (N, feature_dim)


def entry_folder(cache: Path) -> Path:
    (entry,) = (cache / "counting").iterdir()
    return entry


def cleanup_message(caplog: pytest.LogCaptureFixture) -> str:
    """The one log message about a killed run's unfinished files."""
    (message,) = [record.getMessage() for record in caplog.records if "unfinished" in record.getMessage()]
    return message


def fake_rows(run: str, ood_sets: list[str]) -> list[dict]:
    """Result rows whose model name is `run`, so every file written from them names its run."""
    metrics = {"auroc": 90.0, "fpr95": 30.0, "aupr_in": 80.0, "aupr_out": 70.0, "dtacc": 85.0,
               "fpr95_ood_positive": 31.0, "id_acc": 75.0}
    return [{"model": run, "train_data": "imagenet1k", "id_data": "imagenet1k", "ood_data": name,
             "detector": "knn", **metrics} for name in ood_sets]


def write_run(folder: Path, run: str, ood_sets: list[str], **extra) -> None:
    """The text files of a result of `run` with one placeholder plot per OOD set naming the run, and `extra`
    writers, replaced in `folder` as write_result replaces a run's files."""
    result = fake_result(fake_rows(run, ood_sets))
    documents, _ = result_documents(result)
    writers = {name: (lambda path, text=text: path.write_text(text)) for name, text in documents.items()
               if name in PIPELINE_FILES}
    writers.update({f"scores_{name}.png": (lambda path, text=f"{run} plot of {name}": path.write_text(text))
                    for name in ood_sets})
    replace_run_files(folder, {**writers, **extra}, result.config.to_dict())


def runs_in(folder: Path) -> dict[str, str]:
    """{file name: the run it names} for every file a run writes that is in `folder`."""
    found = {}
    for path in folder.iterdir():
        if path.name in PIPELINE_FILES or path.name.startswith("scores_"):
            (run,) = {word for word in ("run-A", "run-B", "run-C") if word in path.read_text()}
            found[path.name] = run
    return found


def manifest(folder: Path) -> dict:
    return json.loads((folder / RESULTS_MANIFEST).read_text())


# ---- file modes follow the umask -----------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_cache_and_result_files_follow_the_umask(umask, tmp_path):
    previous = os.umask(umask)
    try:
        extract(tmp_path / "cache", CountingBackbone(), colour_dataset(4))
        write_result(fake_result(fake_rows("run-A", ["inaturalist"]), plots=True), tmp_path / "out")
    finally:
        os.umask(previous)
    written = list(tmp_path.rglob("*"))
    assert {path.name for path in written} >= {"key.json", "lock", "rows_000000000_000000003.json",
                                                "rows_000000003_000000004.npy", RESULTS_MANIFEST, ".results.lock",
                                                *PIPELINE_FILES, "scores_inaturalist.png", "roc_inaturalist.png"}
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ---- a killed run's temporary files --------------------------------------------------------------------

def test_a_killed_runs_temporary_files_and_shards_are_removed_by_the_next_run(tmp_path, caplog):
    dataset = colour_dataset(10)
    clean = extract(tmp_path, CountingBackbone(), dataset)
    entry = entry_folder(tmp_path)
    leftovers = [entry / ".rows_000000009_000000010.npy.0123abcd.tmp", entry / ".key.json.4567cdef.tmp",
                 entry / "shard-00001.npz"]  # the last: a torchrun rank's rows, never joined
    for path, size in zip(leftovers, (3000, 0, 1000)):
        path.write_bytes(b"x" * size)
    (entry / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO):
        np.testing.assert_array_equal(extract(tmp_path, CountingBackbone(), dataset), clean)
    message = cleanup_message(caplog)
    assert "removed 3" in message and "4.0 kB" in message and str(entry) in message  # how many, their size, where
    assert not any(path.exists() for path in leftovers) and (entry / "notes.txt").exists()


def test_every_file_of_an_entry_is_written_under_its_lock(tmp_path):
    """Other torchrun ranks and other runs open entries without the lock: they must not write, or the lock
    holder's cleanup could remove their live temporary file."""
    entry = FeatureEntry(tmp_path, {"model": "counting"}, "colours")
    assert not entry.directory.exists()
    with entry.locked():
        assert json.loads((entry.directory / "key.json").read_text())["model"] == "counting"


def test_a_live_lock_holders_temporary_file_is_not_removed(tmp_path, caplog):
    dataset = colour_dataset(10)
    clean = extract(tmp_path, CountingBackbone(), dataset)
    entry = entry_folder(tmp_path)
    live = entry / ".rows_000000000_000000003.npy.live0001.tmp"
    results: dict[str, np.ndarray] = {}
    second = threading.Thread(target=lambda: results.__setitem__("features",
                                                                 extract(tmp_path, CountingBackbone(), dataset)))
    with caplog.at_level(logging.INFO):
        with exclusive_lock(entry / "lock", "a test"):  # another run, in the middle of writing a file
            live.write_bytes(b"being written")
            second.start()
            wait_for(lambda: str(entry / "lock") in caplog.text, "the second run to wait for the lock")
            assert live.read_bytes() == b"being written"
            os.replace(live, entry / "finished.bin")  # the holder completes its write, then lets go
        second.join(timeout=HANG)
        assert not second.is_alive()
    assert (entry / "finished.bin").read_bytes() == b"being written"
    assert "unfinished" not in caplog.text
    np.testing.assert_array_equal(results["features"], clean)


def test_a_killed_runs_staged_results_are_removed_by_the_next_run(tmp_path, caplog):
    staging = tmp_path / ".results-staging"
    staging.mkdir()
    (staging / "results.csv.part").write_text("a killed run's")
    (staging / ".results.md.part.89abcdef.tmp").write_text("")
    with caplog.at_level(logging.INFO):
        write_run(tmp_path, "run-A", ["inaturalist"])
    message = cleanup_message(caplog)
    assert "removed 2" in message and "14 bytes" in message and str(staging) in message
    assert not staging.exists() and set(runs_in(tmp_path).values()) == {"run-A"}


# ---- a waiting run ---------------------------------------------------------------------------------------

def test_a_waiting_run_says_what_it_waits_for_and_takes_the_lock_once_released(tmp_path, caplog):
    lock = tmp_path / "lock"
    taken = threading.Event()

    def take() -> None:
        with exclusive_lock(lock, "the entry"):
            taken.set()
    with caplog.at_level(logging.INFO):
        with exclusive_lock(lock, "the entry"):
            waiter = threading.Thread(target=take)
            waiter.start()
            wait_for(lambda: "the entry" in caplog.text, "the waiter to say what it waits for")
            assert not taken.is_set()
        waiter.join(timeout=HANG)
    assert taken.is_set() and str(lock) in caplog.text


# ---- cache rows of another model's width ---------------------------------------------------------------

def test_rows_of_another_width_are_reported_deleted_and_recomputed(tmp_path, caplog):
    """A cache folder copied from another model, or a model config edited: the rows and sidecars agree, but
    their width is not the model's."""
    dataset = colour_dataset(10)
    extract(tmp_path, CountingBackbone(), dataset)  # 3 features per image
    wider = WiderBackbone(5)
    with caplog.at_level(logging.INFO):
        features = extract(tmp_path, wider, dataset)
    entry = entry_folder(tmp_path)
    for value in (str(entry / "rows_000000000_000000003.npy"), "width 3", "5 wide"):  # the file, its width, ours
        assert value in caplog.text
    assert features.shape == (10, 5) and wider.forwarded == 10
    again = WiderBackbone(5)
    np.testing.assert_array_equal(extract(tmp_path, again, dataset), features)
    assert again.forwarded == 0


def test_one_copied_rows_file_of_another_width_is_the_only_one_recomputed(tmp_path, caplog):
    dataset = colour_dataset(10)
    clean = extract(tmp_path / "ours", CountingBackbone(), dataset)
    extract(tmp_path / "theirs", WiderBackbone(4), dataset)
    for suffix in (".npy", ".json"):  # a file and its sidecar, consistent with each other, from another model
        name = f"rows_000000003_000000006{suffix}"
        shutil.copyfile(entry_folder(tmp_path / "theirs") / name, entry_folder(tmp_path / "ours") / name)
    backbone = CountingBackbone()
    with caplog.at_level(logging.INFO):
        np.testing.assert_array_equal(extract(tmp_path / "ours", backbone, dataset), clean)
    for value in (str(entry_folder(tmp_path / "ours") / "rows_000000003_000000006.npy"), "width 4", "3 wide"):
        assert value in caplog.text
    assert backbone.forwarded == 3


# ---- a full disk ---------------------------------------------------------------------------------------

def disk_full(code: int = errno.ENOSPC):
    """A writer (or Path.write_bytes) failing as on a full disk, or with another error `code`."""
    def write(*args) -> None:
        raise OSError(code, os.strerror(code))
    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_cache_disk_is_one_user_error_naming_the_folder_and_the_space(code, tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", disk_full(code))
    with pytest.raises(UserError) as error:
        extract(tmp_path, CountingBackbone(), colour_dataset(10))
    entry = entry_folder(tmp_path)
    message = str(error.value)
    # the file, its folder, the error, the space it needs (3 x 3 float32 and the .npy header), the way out
    for value in ("rows_000000000_000000003.npy", str(entry), os.strerror(code), "164 bytes", "--cache-dir"):
        assert value in message
    assert re.search(r"[0-9.]+ (bytes|kB|MB|GB) free", message)  # the free space, measured
    assert not [path for path in entry.iterdir() if is_temporary(path.name)]


def test_a_full_results_disk_names_the_output_folder_and_keeps_the_previous_results(tmp_path):
    write_run(tmp_path, "run-A", ["inaturalist"])
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with pytest.raises(UserError) as error:
        write_run(tmp_path, "run-B", ["inaturalist"], **{"roc_inaturalist.png": disk_full()})
    for value in ("roc_inaturalist.png", str(tmp_path), os.strerror(errno.ENOSPC)):
        assert value in str(error.value)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path):
    with pytest.raises(PermissionError):
        write_atomically(tmp_path / "a.txt", disk_full(errno.EACCES), expected_bytes=10)


def test_main_reports_a_full_disk_as_one_error_line(data_root, tiny_model_yaml, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Path, "write_bytes", disk_full())
    argv = main_arguments(data_root, tiny_model_yaml, tmp_path, "--num-workers", "0")
    assert main.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ")
    for value in ("rows_000000000_000000048.npy", str(tmp_path / "cache"), os.strerror(errno.ENOSPC), "393.3 kB"):
        assert value in error  # 393.3 kB: 48 x 2048 float32


# ---- the results folder holds one run's files ----------------------------------------------------------

def test_results_replace_the_previous_runs_as_one_set_and_leave_other_files_alone(tmp_path):
    write_run(tmp_path, "run-A", ["inaturalist", "textures"])
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "k=1").mkdir()  # a sweep value's folder
    write_run(tmp_path / "k=1", "run-A", ["inaturalist"])
    write_run(tmp_path, "run-B", ["inaturalist"])
    assert runs_in(tmp_path) == dict.fromkeys([*PIPELINE_FILES, "scores_inaturalist.png"], "run-B")
    listed = manifest(tmp_path)
    assert listed["complete"] is True
    assert listed["files"] == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
                               for name in runs_in(tmp_path)}
    assert (tmp_path / "notes.txt").read_text() == "mine" and set(runs_in(tmp_path / "k=1").values()) == {"run-A"}


def test_replacing_another_runs_results_is_said_and_a_rerun_of_the_same_run_is_not_a_warning(tmp_path, caplog):
    write_run(tmp_path, "run-A", ["inaturalist", "textures"])
    with caplog.at_level(logging.INFO, logger="pipeline.report.outputs"):
        write_run(tmp_path, "run-B", ["inaturalist"])
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    for value in (str(tmp_path), "run-A", "textures"):  # the folder, the replaced run's model and an OOD set
        assert value in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.report.outputs"):
        write_run(tmp_path, "run-B", ["inaturalist"])
    (record,) = caplog.records
    assert record.levelno == logging.INFO and str(tmp_path) in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.report.outputs"):
        write_run(tmp_path / "fresh", "run-C", ["inaturalist"])
    assert caplog.records == []  # an empty folder: nothing replaced, nothing to say


class Killed(BaseException):
    """Stands for SIGKILL in the middle of writing: nothing after it runs."""


def test_a_run_killed_while_writing_its_files_leaves_the_previous_results_whole(tmp_path):
    write_run(tmp_path, "run-A", ["inaturalist", "textures"])
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

    def killed(path: Path) -> None:
        raise Killed

    with pytest.raises(Killed):  # results.csv and others are written; the first plot is not
        write_run(tmp_path, "run-B", ["inaturalist"], **{"scores_inaturalist.png": killed})
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before
    write_run(tmp_path, "run-C", ["svhn"])
    assert runs_in(tmp_path) == dict.fromkeys([*PIPELINE_FILES, "scores_svhn.png"], "run-C")


def test_a_run_killed_while_renaming_leaves_an_incomplete_folder_of_its_own_files(tmp_path, monkeypatch):
    write_run(tmp_path, "run-A", ["inaturalist", "textures"])
    renamed: list[str] = []
    real_replace = os.replace

    def replace_once(source, target) -> None:
        if str(source).endswith(".part"):
            if renamed:
                raise Killed
            renamed.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(pipeline.report.outputs.os, "replace", replace_once)
    with pytest.raises(Killed):
        write_run(tmp_path, "run-B", ["inaturalist"])
    monkeypatch.setattr(pipeline.report.outputs.os, "replace", real_replace)
    assert runs_in(tmp_path) == {"results.csv": "run-B"}  # a part of run B, nothing of run A
    listed = manifest(tmp_path)
    assert listed["complete"] is False and set(listed["files"]) == {*PIPELINE_FILES, "scores_inaturalist.png",
                                                                    "scores_textures.png"}
    write_run(tmp_path, "run-C", ["svhn"])
    assert runs_in(tmp_path) == dict.fromkeys([*PIPELINE_FILES, "scores_svhn.png"], "run-C")
    assert manifest(tmp_path)["complete"] is True and not (tmp_path / ".results-staging").exists()


# ---- main.py killed while writing: the rerun cleans up -------------------------------------------------

KILLED_MAIN = '''"""main.py, killed as by SIGKILL (os._exit: nothing else runs) at a write; KILL_AT=rows|results."""
import os
import pathlib
import sys

sys.path.insert(0, {repo!r})
real_write_bytes, real_replace = pathlib.Path.write_bytes, os.replace
rows_written = []


def write_bytes(path, data):
    if path.name.startswith(".rows_") and os.environ["KILL_AT"] == "rows":
        rows_written.append(path)
        if len(rows_written) == 2:  # half of the second rows file is on disk
            real_write_bytes(path, data[:len(data) // 2])
            os._exit(137)
    return real_write_bytes(path, data)


def replace(source, target):
    if os.environ["KILL_AT"] == "results" and os.path.basename(target) == "results.md":
        os._exit(137)  # results.csv and results_openood.csv are renamed in, the others are staged
    return real_replace(source, target)


pathlib.Path.write_bytes, os.replace = write_bytes, replace
import main  # noqa: E402

sys.exit(main.main(sys.argv[1:]))
'''


@pytest.mark.slow  # three runs of main.py as processes, two of them killed
def test_main_killed_while_writing_then_rerun_leaves_no_leftovers_and_whole_results(data_root, tiny_model_yaml,
                                                                                   tmp_path):
    script = tmp_path / "killed_main.py"
    script.write_text(KILLED_MAIN.format(repo=str(REPO)))
    arguments = main_arguments(data_root, tiny_model_yaml, tmp_path, "--num-workers", "0")

    def run(kill_at: str) -> subprocess.CompletedProcess:
        process = start_main(arguments, env={**ONE_THREAD, "KILL_AT": kill_at},
                             script=script if kill_at else REPO / "main.py")
        stdout, stderr = process.communicate(timeout=HANG)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    assert run("rows").returncode == 137
    (half_written,) = [path for path in (tmp_path / "cache").rglob("*") if is_temporary(path.name)]
    size = half_written.stat().st_size

    killed = run("results")
    assert killed.returncode == 137
    (cleanup,) = [line for line in killed.stderr.splitlines() if "unfinished" in line]
    assert "removed 1" in cleanup and f"{size / 1e3:.1f} kB" in cleanup and str(half_written.parent) in cleanup
    assert manifest(tmp_path / "out")["complete"] is False
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"results.csv", "results_openood.csv",
                                                                   RESULTS_MANIFEST, ".results.lock",
                                                                   ".results-staging"}

    rerun = run("")
    assert rerun.returncode == 0, rerun.stderr
    assert str(tmp_path / "out/.results-staging") in rerun.stderr  # its leftovers removed
    listed = manifest(tmp_path / "out")
    assert listed["complete"] is True and set(listed["files"]) == PIPELINE_FILES | {"scores.npz", "averages.csv"}
    for name, sha256 in listed["files"].items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == sha256
    assert not [path for path in tmp_path.rglob("*") if is_temporary(path.name) or path.suffix == ".part"]


def test_an_entry_this_user_cannot_write_is_read_when_complete_and_named_when_not(tmp_path, monkeypatch, caplog):
    """Another user's entry in a shared cache (this process runs as root, which may write anywhere, so
    writability is what the entry reports): complete, its rows are read without its lock and nothing in it is
    touched; lacking rows, the run stops with one error naming the entry."""
    dataset = colour_dataset(10)
    complete = extract(tmp_path / "cache", CountingBackbone(), dataset)
    entry = entry_folder(tmp_path / "cache")
    before = {path.name: path.stat().st_mtime_ns for path in entry.iterdir()}
    monkeypatch.setattr(FeatureEntry, "writable", lambda self: False)
    backbone = CountingBackbone()
    with caplog.at_level(logging.INFO):
        np.testing.assert_array_equal(extract(tmp_path / "cache", backbone, dataset), complete)
    assert backbone.forwarded == 0 and "read-only" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in entry.iterdir()} == before
    (entry / "rows_000000009_000000010.npy").unlink()
    with pytest.raises(UserError) as lacking:
        extract(tmp_path / "cache", CountingBackbone(), dataset)
    assert str(entry) in str(lacking.value) and "9..9" in str(lacking.value) and "not writable" in str(lacking.value)


class BatchSensitiveBackbone(CountingBackbone):
    """Mean colour plus a thousandth of its batch's mean: each row depends on the batch it is computed in, as
    convolution kernels chosen per batch shape can make a real network's last bits depend on it."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        colours = super().features(images)
        return colours + 1e-3 * colours.mean(dim=0, keepdim=True)


def test_a_bank_extended_from_a_smaller_one_equals_a_fresh_extraction(tmp_path):
    """The 4-row prefix ends inside the batch [3, 5) of the chunk [3, 6): extending it to 10 rows recomputes row 3
    in that batch, so the entry holds what a fresh 10-row extraction holds, byte for byte."""
    dataset = colour_dataset(10)

    def features(cache: Path, num_rows: int) -> np.ndarray:
        settings = ExtractionSettings(torch.device("cpu"), batch_size=2, num_workers=0, amp="off",
                                      channels_last=False, chunk_size=3)
        extractor = FeatureExtractor(BatchSensitiveBackbone(), {"model": "counting"}, cache, settings)
        return extractor.features(dataset, {"dataset": "colours", "images": dataset.fingerprint()}, "colours",
                                  num_rows)

    prefix = features(tmp_path / "grown", 4)
    grown = features(tmp_path / "grown", 10)
    fresh = features(tmp_path / "fresh", 10)
    assert not np.array_equal(prefix[3], fresh[3])     # row 3 alone in its batch differs: the test has teeth
    np.testing.assert_array_equal(grown, fresh)
    assert sorted(path.name for path in entry_folder(tmp_path / "grown").glob("rows_*.npy")) == \
        sorted(path.name for path in entry_folder(tmp_path / "fresh").glob("rows_*.npy"))
