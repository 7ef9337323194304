"""torchrun with 2 CPU processes (gloo) writes the same cache entries and results.csv as one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(launcher: list[str], args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in both runs, and no oversubscription
    return subprocess.run([*launcher, str(REPO / "main.py"), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=300)


def test_two_ranks_give_the_single_process_cache_and_results(data_root, tiny_model_yaml, tmp_path):
    common = ["--model", str(tiny_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
              "--ood-data", "inaturalist", "textures", "--detectors", "nnguide", "knn", "energy",
              "--data-root", str(data_root), "--device", "cpu", "--batch-size", "4", "--num-workers", "0",
              "--bank-ratio", "0.5", "--no-plots", "--set", "chunk_size=7"]
    single = run([sys.executable], [*common, "--output-dir", "single", "--cache-dir", "cache-single"], tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    distributed = run(torchrun, [*common, "--output-dir", "dist", "--cache-dir", "cache-dist"], tmp_path)
    assert distributed.returncode == 0, distributed.stderr
    assert distributed.stdout.count("results: ") == 1  # only rank 0 reports

    assert (tmp_path / "dist/results.csv").read_bytes() == (tmp_path / "single/results.csv").read_bytes()
    single_files = sorted(path.relative_to(tmp_path / "cache-single")
                          for path in (tmp_path / "cache-single").rglob("rows_*"))
    distributed_files = sorted(path.relative_to(tmp_path / "cache-dist")
                               for path in (tmp_path / "cache-dist").rglob("rows_*"))
    assert single_files == distributed_files and len(single_files) > 6
    for relative in single_files:
        assert (tmp_path / "cache-dist" / relative).read_bytes() == (tmp_path / "cache-single" / relative).read_bytes()
    assert not list((tmp_path / "cache-dist").rglob("shard-*"))
