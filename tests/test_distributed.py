"""torchrun with 2 CPU processes (gloo), on one node or as two nodes, writes the same cache entries and
results.csv as one process.

The torchrun launches are real `python -m torch.distributed.run main.py` processes, fresh interpreters each."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.main_process import MainProcess, start_main

pytestmark = pytest.mark.slow  # each torchrun launch starts fresh interpreters (launcher and ranks)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run, and no oversubscription


def start(launcher: list[str], args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*launcher, str(REPO / "main.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENVIRONMENT)


def finish(process: subprocess.Popen | MainProcess) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stdout, stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def common_args(data_root, small_model_yaml) -> list[str]:
    return ["--model", str(small_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
            "--ood-data", "inaturalist", "textures", "--detectors", "nnguide", "knn", "energy",
            "--data-root", str(data_root), "--device", "cpu", "--batch-size", "4", "--num-workers", "0",
            "--bank-ratio", "0.5", "--no-plots", "--set", "chunk_size=7"]


@pytest.fixture(scope="module")
def runs(request, common_args, tmp_path_factory) -> dict[int | None, tuple[Path, list]]:
    """The single-process run (key None) and the torchrun launches of every node count this session selected,
    started side by side (most of each is fresh interpreters importing torch, one process at a time): each
    as (its work folder, its processes, the first being the launcher of global rank 0). Each starts from a cache
    holding half the bank (a smaller bank_ratio), so the ranks share out only the rows still missing."""
    args = [*common_args, "--output-dir", "out", "--cache-dir", "cache"]
    half_bank = tmp_path_factory.mktemp("half-bank")
    smaller = [*args[:args.index("--bank-ratio")], "--bank-ratio", "0.25", *args[args.index("--bank-ratio") + 2:]]
    finish(start_main(smaller, cwd=half_bank, env=ENVIRONMENT))

    def work_folder(name: str) -> Path:
        work = tmp_path_factory.mktemp(name)
        shutil.copytree(half_bank / "cache", work / "cache")
        return work
    started: dict[int | None, tuple[Path, list]] = {}
    work = work_folder("single")
    started[None] = (work, [start_main(args, cwd=work, env=ENVIRONMENT)])
    selected = [item.callspec.params["nodes"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")]
    for nodes in selected:
        work = work_folder(f"nodes{nodes}")
        if nodes == 1:
            launches = [start([*TORCHRUN, "--standalone", "--nproc_per_node=2"], args, work)]
        else:
            rendezvous = [f"--nnodes={nodes}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}"]
            launches = [start([*TORCHRUN, *rendezvous, f"--node_rank={rank}"], args, work) for rank in range(nodes)]
        started[nodes] = (work, launches)
    yield started
    for _, processes in started.values():
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def single_process_run(runs) -> tuple[Path, str]:
    """The single-process run's work folder and its log."""
    work, (process,) = runs[None]
    return work, finish(process)[1]


@pytest.mark.parametrize("nodes", [1, 2])
def test_two_ranks_give_the_single_process_cache_and_results(nodes, runs, single_process_run):
    """Two nodes (two torchrun launches on this machine, one process each) make every rank's local rank 0:
    shards and the main rank must follow the global rank."""
    work, launches = runs[nodes]
    stdouts, logs = zip(*[finish(launch) for launch in launches])
    assert "".join(stdouts).count("results: ") == 1 and "results: " in stdouts[0]  # only global rank 0 reports
    single, single_log = single_process_run
    for log in (single_log, logs[0]):  # rank 0's launcher passes on the log of rank 0
        # the half bank's last chunk, [7, 12), is kept up to a batch boundary (rows 7-10) and the rest forwarded
        assert "extracting 13 of 24 images of imagenet1k-train-seed0" in log

    assert (work / "out/results.csv").read_bytes() == (single / "out/results.csv").read_bytes()
    single_files = sorted(path.relative_to(single / "cache") for path in (single / "cache").rglob("rows_*"))
    distributed_files = sorted(path.relative_to(work / "cache") for path in (work / "cache").rglob("rows_*"))
    assert single_files == distributed_files and len(single_files) > 6
    for relative in single_files:
        assert (work / "cache" / relative).read_bytes() == (single / "cache" / relative).read_bytes()
    assert not list((work / "cache").rglob("shard-*"))
