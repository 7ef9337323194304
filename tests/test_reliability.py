"""Reliability: the cache never lies, interrupted runs lose nothing, bad input is one clear error line."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from dataloaders.base import ArrayImageDataset
from pipeline.features.extract import ExtractionSettings, FeatureExtractor, quiet_when_the_run_stops
from tests.datagen import write_class_folders, write_flat_folder
from tests.main_process import MainProcess, start_main

REPO = Path(__file__).resolve().parents[1]
# main.py runs side by side: one thread each, or OpenMP's spinning threads oversubscribe the CPUs
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# Tests wait for the event they mean; a timeout only ends a hang, however slow or loaded the machine
HANG = 120  # seconds


def wait_for(condition: Callable[[], bool], what: str, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- the cache, in process, with a stand-in backbone ------------------------------------------------

class CountingBackbone(torch.nn.Module):
    """Mean colour per image as its 'features'; counts the images it forwards and can be held mid-batch."""

    feature_dim = row_dim = 3

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.forwarded = 0
        self.gate = gate
        self.entered = threading.Event()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=HANG)
        self.forwarded += len(images)
        return images.mean(dim=(2, 3))  # (N, 3)


def colour_dataset(count: int = 10) -> ArrayImageDataset:
    pixels = np.random.default_rng(0).integers(0, 256, size=(count, 4, 4, 3), dtype=np.uint8)
    return ArrayImageDataset("arrays", pixels, [f"img{i}" for i in range(count)], [0] * count, [],
                             torchvision.transforms.ToTensor())


def extract(cache: Path, backbone: CountingBackbone, dataset: ArrayImageDataset, recompute: bool = False,
            extractor: FeatureExtractor | None = None) -> np.ndarray:
    settings = ExtractionSettings(torch.device("cpu"), batch_size=2, num_workers=0, amp="off",
                                  channels_last=False, chunk_size=3, recompute=recompute)
    extractor = extractor or FeatureExtractor(backbone, {"model": "counting"}, cache, settings)
    return extractor.features(dataset, {"dataset": "colours", "images": dataset.fingerprint()}, "colours")


def rows_files(cache: Path) -> list[Path]:
    """The cache's rows files; none while the folder is missing, or while a run's writability probe of it (made,
    then removed) comes and goes under the scan."""
    try:
        return sorted(cache.rglob("rows_*.npy"))
    except FileNotFoundError:
        return []


def test_an_extraction_stopped_by_an_error_leaves_autograd_on(tmp_path, monkeypatch):
    """Inference mode is entered per batch, not held across the batches' `yield`: an error while a rows file is
    written (here a full disk) must not leave the rest of the process without autograd."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("pipeline.features.cache.FeatureEntry.write_rows", full_disk)
    try:
        extract(tmp_path, CountingBackbone(), colour_dataset(10))
    except OSError as error:
        stopped = error  # its traceback keeps the extraction's frames, and the batches' generator, alive
    assert stopped.errno == 28
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_truncated_or_corrupted_rows_files_are_reported_and_recomputed(tmp_path, caplog):
    dataset = colour_dataset(10)
    clean = extract(tmp_path, CountingBackbone(), dataset)
    files = rows_files(tmp_path)
    assert [path.name for path in files] == ["rows_000000000_000000003.npy", "rows_000000003_000000006.npy",
                                             "rows_000000006_000000009.npy", "rows_000000009_000000010.npy"]
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    data = bytearray(files[2].read_bytes())
    data[-1] ^= 0x40  # one flipped bit in the last feature value: np.load alone would not notice
    files[2].write_bytes(bytes(data))

    backbone = CountingBackbone()
    with caplog.at_level(logging.INFO):
        again = extract(tmp_path, backbone, dataset)
    assert str(files[0]) in caplog.text and str(files[2]) in caplog.text and "checksum" in caplog.text
    assert str(files[1]) not in caplog.text and "6 of 10" in caplog.text  # the two files' rows extracted again
    assert backbone.forwarded == 6
    np.testing.assert_array_equal(again, clean)


def test_rows_file_without_its_checksum_is_recomputed(tmp_path, caplog):
    dataset = colour_dataset(10)
    clean = extract(tmp_path, CountingBackbone(), dataset)
    checksum = rows_files(tmp_path)[1].with_suffix(".json")
    checksum.unlink()
    backbone = CountingBackbone()
    with caplog.at_level(logging.INFO):
        np.testing.assert_array_equal(extract(tmp_path, backbone, dataset), clean)
    assert str(checksum) in caplog.text and backbone.forwarded == 3


def test_recompute_re_extracts_each_entry_once_per_run(tmp_path):
    dataset = colour_dataset(10)
    clean = extract(tmp_path, CountingBackbone(), dataset)
    backbone = CountingBackbone()
    settings = ExtractionSettings(torch.device("cpu"), 2, 0, "off", False, 3, recompute=True)
    extractor = FeatureExtractor(backbone, {"model": "counting"}, tmp_path, settings)
    np.testing.assert_array_equal(extract(tmp_path, backbone, dataset, extractor=extractor), clean)
    assert backbone.forwarded == 10
    extract(tmp_path, backbone, dataset, extractor=extractor)  # the same run asks again: served from the cache
    assert backbone.forwarded == 10


def test_second_run_waits_for_the_entry_lock_then_reuses_the_rows(tmp_path, caplog):
    dataset = colour_dataset(10)
    gate = threading.Event()
    first, second = CountingBackbone(gate), CountingBackbone()
    results: dict[str, np.ndarray] = {}
    runs = {name: threading.Thread(target=lambda name=name, backbone=backbone: results.__setitem__(
        name, extract(tmp_path, backbone, dataset))) for name, backbone in (("first", first), ("second", second))}
    with caplog.at_level(logging.INFO):
        runs["first"].start()
        assert first.entered.wait(timeout=HANG)  # the first run holds the lock, in the middle of its first batch
        runs["second"].start()
        wait_for(lambda: "waiting for another run" in caplog.text, "the second run to wait for the lock")
        assert second.forwarded == 0
        gate.set()
        for run in runs.values():
            run.join(timeout=HANG)
            assert not run.is_alive()
    [lock] = tmp_path.glob("*/*/lock")
    assert str(lock) in caplog.text  # the second run said which lock it waits for
    assert (first.forwarded, second.forwarded) == (10, 0)
    np.testing.assert_array_equal(results["first"], results["second"])


@pytest.mark.slow  # a spawned worker is a fresh interpreter: it imports torch
def test_spawned_workers_receive_only_the_rows_they_read(tmp_path, monkeypatch):
    """Python 3.14 on Linux (forkserver) and macOS (spawn) pickle the dataset into every worker: a 1% bank
    must not ship the whole train split. Spawned workers then give the single process's features."""
    import pipeline.features.extract
    shipped: list[int] = []

    def spawning_loader(dataset, settings, batches=None, collate_fn=None):
        shipped.append(len(dataset.dataset))
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=1,
                                           multiprocessing_context="spawn")

    dataset = colour_dataset(30)
    settings = ExtractionSettings(torch.device("cpu"), batch_size=2, num_workers=0, amp="off",
                                  channels_last=False, chunk_size=3)
    in_process = FeatureExtractor(CountingBackbone(), {"model": "counting"}, tmp_path / "a", settings).features(
        dataset, {"dataset": "colours"}, "colours", num_rows=7)
    monkeypatch.setattr(pipeline.features.extract, "make_loader", spawning_loader)
    spawned = FeatureExtractor(CountingBackbone(), {"model": "counting"}, tmp_path / "b", settings).features(
        dataset, {"dataset": "colours"}, "colours", num_rows=7)
    assert shipped == [7]
    np.testing.assert_array_equal(spawned, in_process)


# ---- main.py as a subprocess (forked from an interpreter that has imported it: tests/main_process.py) --

def main_arguments(data_root: Path, model_yaml: Path, work: Path, *extra: str) -> list[str]:
    return ["--model", str(model_yaml), "--train-data", "imagenet1k",
            "--id-data", "imagenet1k", "--ood-data", "inaturalist", "--detectors", "energy", "knn",
            "--set", "detectors.knn.k=1", "--data-root", str(data_root), "--output-dir", str(work / "out"),
            "--cache-dir", str(work / "cache"), "--device", "cpu", "--bank-ratio", "1.0", "--no-plots", *extra]


def run_main(*runs: list[str]) -> list[subprocess.CompletedProcess]:
    """Run main.py with each argument list, side by side; results in order."""
    processes = [start_main(arguments, env=ONE_THREAD) for arguments in runs]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=HANG)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def wait_for_rows_files(cache: Path, process: MainProcess) -> None:
    """Returns once the run has written its first rows file: it extracts the bank, whose loader's workers run."""
    wait_for(lambda: rows_files(cache) or process.poll() is not None, f"a rows file in {cache}")
    assert rows_files(cache), f"the run ended (exit code {process.poll()}) before it wrote a rows file"


@pytest.mark.slow  # three runs of main.py as processes: a clean one, a killed one, its resumption
def test_killed_run_resumes_at_the_last_complete_file_with_identical_results(data_root, tiny_model_yaml,
                                                                             tmp_path):
    # 48 bank images in files of 4, batches of 2: 12 files, so the kill lands mid-way through the bank
    settings = ["--batch-size", "2", "--num-workers", "0", "--set", "chunk_size=4"]
    clean = start_main(main_arguments(data_root, tiny_model_yaml, tmp_path / "clean", *settings), env=ONE_THREAD)
    arguments = main_arguments(data_root, tiny_model_yaml, tmp_path / "killed", *settings)
    process = start_main(arguments, env=ONE_THREAD)
    wait_for_rows_files(tmp_path / "killed/cache", process)
    process.kill()
    process.wait(timeout=HANG)
    done = len(rows_files(tmp_path / "killed/cache"))
    assert 0 < done < 12
    (resumed,) = run_main(arguments)  # while the clean run goes on
    assert clean.wait(timeout=HANG) == 0, clean.communicate()[1]

    assert resumed.returncode == 0, resumed.stderr
    assert f"{48 - 4 * done} of 48" in resumed.stderr and "imagenet1k-train-seed0" in resumed.stderr
    assert (tmp_path / "killed/out/results.csv").read_bytes() == (tmp_path / "clean/out/results.csv").read_bytes()


def child_pids(pid: int) -> set[int]:
    listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(line) for line in listed.split()}


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum, whole_group", [
    (signal.SIGINT, True),    # Ctrl-C in a terminal: the whole process group
    (signal.SIGTERM, True),   # a pre-empted cluster job (Slurm signals every process of the job)
    (signal.SIGTERM, False),  # kill PID, docker stop: the main process alone, which then stops its workers
], ids=["ctrl-c", "sigterm-group", "sigterm-main"])
def test_a_signal_stops_the_run_with_one_line_and_no_workers_left(signum, whole_group, data_root, tiny_model_yaml,
                                                                  tmp_path):
    arguments = main_arguments(data_root, tiny_model_yaml, tmp_path, "--batch-size", "1",
                               "--num-workers", "2", "--set", "chunk_size=2")
    process = start_main(arguments, env=ONE_THREAD, new_session=True)
    wait_for_rows_files(tmp_path / "cache", process)
    workers = child_pids(process.pid)
    assert len(workers) >= 2
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    _, stderr = process.communicate(timeout=HANG)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted;")  # the first signal's notice, not "again"
    assert "Traceback" not in stderr
    # the exit is reported once the run's process is reaped, after it reaped its workers: none may run on
    assert not [pid for pid in workers if is_running(pid)]


def test_a_second_signal_while_stopping_exits_at_once_without_a_traceback(data_root, tiny_model_yaml, tmp_path):
    """Two signals land together: the run is held (SIGSTOP) while both are sent to its main thread, so that when
    it goes on, the second is handled while the first one's KeyboardInterrupt unwinds. Two SIGINTs would merge into
    one while pending: the second is a SIGTERM."""
    arguments = main_arguments(data_root, tiny_model_yaml, tmp_path, "--batch-size", "1",
                               "--num-workers", "2", "--set", "chunk_size=2")
    process = start_main(arguments, env=ONE_THREAD, new_session=True)
    wait_for_rows_files(tmp_path / "cache", process)
    os.kill(process.pid, signal.SIGSTOP)
    for signum in (signal.SIGINT, signal.SIGTERM):  # to the main thread: no other thread of the run handles one
        assert ctypes.CDLL(None, use_errno=True).tgkill(process.pid, process.pid, signum) == 0
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=HANG)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted again; exiting now (rerun the same command to resume)"


def test_a_loader_worker_prints_no_traceback_for_a_handover_the_stopping_run_cut(monkeypatch, capsys):
    """A worker's shared-memory handover thread (multiprocessing's resource_sharer) reports what fails through
    sys.excepthook; when the main process stops mid-batch, that traceback would follow main.py's one-line notice.
    Other errors are still printed."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # Python's own, as in a fresh worker
    quiet_when_the_run_stops(worker_id=0)
    for error in (ConnectionResetError("reset by peer"), BrokenPipeError(), EOFError(), ValueError("a real bug")):
        try:
            raise error
        except (ConnectionError, EOFError, ValueError):  # resource_sharer._serve catches every exception
            sys.excepthook(*sys.exc_info())
    printed = capsys.readouterr().err
    assert "ValueError: a real bug" in printed
    assert not [name for name in ("ConnectionResetError", "BrokenPipeError", "EOFError") if name in printed]


@pytest.fixture(scope="module")
def broken_image_root(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny data root whose ImageNet val has a truncated JPEG and a text file named .JPEG."""
    root = tmp_path_factory.mktemp("broken")
    write_class_folders(root / "imagenet1k/imagenet/train", ["n01", "n02"], per_class=3, seed=1)
    val = write_class_folders(root / "imagenet1k/imagenet/val", ["n01", "n02"], per_class=3, seed=2)
    write_flat_folder(root / "inaturalist/iNaturalist/images", count=4, seed=3)
    val[1].write_bytes(val[1].read_bytes()[:200])
    val[4].write_text("not an image\n")
    return root, val[1]


@pytest.mark.slow  # three runs of main.py as processes
def test_broken_image_stops_the_run_with_its_path_unless_skipped(broken_image_root, tiny_model_yaml, tmp_path):
    root, truncated = broken_image_root
    stopped, skipped = run_main(main_arguments(root, tiny_model_yaml, tmp_path / "stop", "--num-workers", "2"),
                                main_arguments(root, tiny_model_yaml, tmp_path / "skip", "--skip-broken-images"))
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(truncated) in error  # raised in a loader worker
    assert "--skip-broken-images" in error

    assert skipped.returncode == 0, skipped.stderr
    for value in ("imagenet1k-test", "skipped 2", "n01/img1.JPEG", "n02/img1.JPEG"):
        assert value in skipped.stderr
    config = (tmp_path / "skip/out/config.yaml").read_text()
    assert "broken_images:\n    imagenet1k-test:\n    - n01/img1.JPEG\n    - n02/img1.JPEG\n" in config
    # the cache remembers them: without the flag still an error, with nothing extracted again
    (again,) = run_main(main_arguments(root, tiny_model_yaml, tmp_path / "skip"))
    assert again.returncode == 2 and "extracting" not in again.stderr
    last_line = again.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(truncated) in last_line


def test_bad_input_is_one_error_line_with_exit_code_2(data_root, tiny_model_yaml, tmp_path):
    unwritable = tmp_path / "a-file"  # a folder under a file: unwritable even for root, unlike chmod
    unwritable.write_text("")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: resnet50-supcon\nood_data: [inaturalist\n")
    cases = {
        "the data root": (["--data-root", str(tmp_path / "nowhere")], [str(tmp_path / "nowhere"), "--data-root"]),
        "an unwritable output directory": (["--output-dir", str(unwritable / "out")],
                                           [str(unwritable / "out"), "--output-dir"]),
        "a YAML syntax error": (["--config", str(bad_yaml)], [f"{bad_yaml}:3"]),  # the file and the line
        "a missing checkpoint": (["--model", "resnet50-supcon", "--pretrained-dir", str(tmp_path / "empty")],
                                 ["resnet50-supcon.pt"]),
    }
    runs = []
    for extra, _ in cases.values():
        arguments = main_arguments(data_root, tiny_model_yaml, tmp_path / "run")
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in arguments:
                arguments[arguments.index(flag) + 1] = value
            else:
                arguments += [flag, value]
        runs.append(arguments)
    for (what, (_, values)), result in zip(cases.items(), run_main(*runs)):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
        for value in values:
            assert value in lines[0], (what, lines[0])
