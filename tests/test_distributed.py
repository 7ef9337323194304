"""torchrun with 2 CPU processes (gloo), on one node or as two nodes, writes the same cache entries and
results.csv as one process.

The torchrun launches are real `python -m torch.distributed.run main.py` processes, fresh interpreters each."""
from __future__ import annotations

import os
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
def common_args(data_root, tiny_model_yaml) -> list[str]:
    return ["--model", str(tiny_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
            "--ood-data", "inaturalist", "textures", "--detectors", "nnguide", "knn", "energy",
            "--data-root", str(data_root), "--device", "cpu", "--batch-size", "4", "--num-workers", "0",
            "--bank-ratio", "0.5", "--no-plots", "--set", "chunk_size=7"]


@pytest.fixture(scope="module")
def single_process_run(common_args, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("single")
    finish(start_main([*common_args, "--output-dir", "out", "--cache-dir", "cache"], cwd=work, env=ENVIRONMENT))
    return work


@pytest.mark.parametrize("nodes", [1, 2])
def test_two_ranks_give_the_single_process_cache_and_results(nodes, common_args, single_process_run, tmp_path):
    """Two nodes (two torchrun launches on this machine, one process each) make every rank's local rank 0:
    shards and the main rank must follow the global rank."""
    args = [*common_args, "--output-dir", "out", "--cache-dir", "cache"]
    if nodes == 1:
        stdouts = [finish(start([*TORCHRUN, "--standalone", "--nproc_per_node=2"], args, tmp_path))[0]]
    else:
        rendezvous = [f"--nnodes={nodes}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}"]
        launches = [start([*TORCHRUN, *rendezvous, f"--node_rank={rank}"], args, tmp_path) for rank in range(nodes)]
        stdouts = [finish(launch)[0] for launch in launches]
    assert "".join(stdouts).count("results: ") == 1 and "results: " in stdouts[0]  # only global rank 0 reports

    single = single_process_run
    assert (tmp_path / "out/results.csv").read_bytes() == (single / "out/results.csv").read_bytes()
    single_files = sorted(path.relative_to(single / "cache") for path in (single / "cache").rglob("rows_*"))
    distributed_files = sorted(path.relative_to(tmp_path / "cache") for path in (tmp_path / "cache").rglob("rows_*"))
    assert single_files == distributed_files and len(single_files) > 6
    for relative in single_files:
        assert (tmp_path / "cache" / relative).read_bytes() == (single / "cache" / relative).read_bytes()
    assert not list((tmp_path / "cache").rglob("shard-*"))
