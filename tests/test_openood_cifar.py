"""OpenOOD v1.5's CIFAR benchmarks end to end: run.sh --openood-cifar's runs, and both experiments on a generated
miniature of OpenOOD's data layout with two checkpoints, aggregated into near/far tables of mean ± std."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import main
from pipeline.tools.aggregate import collect, openood_tables
from pipeline.tools.aggregate import main as aggregate_main
from pipeline.config.loading import load_model_config
from tests.checkpoints import write_openood_resnet18_32x32_checkpoint
from tests.datagen import write_openood_classic_layout
from tests.test_aggregate import fake_python

REPO = Path(__file__).resolve().parents[1]
CIFAR10_OOD = ["openood-cifar10-cifar100", "openood-cifar10-tin", "openood-cifar10-mnist", "openood-cifar10-svhn",
               "openood-cifar10-texture", "openood-cifar10-places365"]


@pytest.mark.slow  # twelve interpreters started by run.sh
def test_run_sh_openood_cifar_runs_both_settings_for_each_benchmark_and_checkpoint(tmp_path):
    log = tmp_path / "calls.jsonl"
    environment = {key: value for key, value in os.environ.items() if key not in ("DATA_ROOT", "OUTPUT_ROOT")}
    environment.update(PYTHON=str(fake_python(tmp_path)), FAKE_LOG=str(log))
    completed = subprocess.run([str(REPO / "run.sh"), "--openood-cifar", "--data-root", "/data", "--",
                                "--batch-size", "500"], check=False, cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    expected = []
    for benchmark in ("cifar10", "cifar100"):
        for checkpoint in ("s0", "s1", "s2"):
            for setting, experiment in (("paper-settings", f"openood-v1.5-{benchmark}"),
                                        ("openood-nnguide", f"openood-v1.5-{benchmark}-nnguide")):
                expected.append([
                    "main.py", "--config", f"configs/experiments/{experiment}.yaml", "--checkpoint",
                    f"{benchmark}_resnet18_32x32_base_e100_lr0.1_default/{checkpoint}/best.ckpt",
                    "--data-root", "/data", "--output-dir",
                    str(tmp_path / "logs/openood-cifar" / f"openood-resnet18-{benchmark}" / checkpoint / setting),
                    "--batch-size", "500"])
    assert [json.loads(line) for line in log.read_text().splitlines()] == expected
    for model in ("openood-resnet18-cifar10", "openood-resnet18-cifar100"):  # the checkpoints run.sh names exist
        assert load_model_config(model).checkpoint == expected[0 if model.endswith("10") else 6][4]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory) -> tuple[Path, Path]:
    """OpenOOD's classic-benchmark layout with 12 images per list, and two random checkpoints (s0, s1) where
    OpenOOD's zip puts them."""
    root = tmp_path_factory.mktemp("openood-cifar")
    write_openood_classic_layout(root / "data", per_list=12, seed=3)
    for number, checkpoint in enumerate(("s0", "s1")):
        path = root / "pretrained/cifar10_resnet18_32x32_base_e100_lr0.1_default" / checkpoint / "best.ckpt"
        path.parent.mkdir(parents=True)
        write_openood_resnet18_32x32_checkpoint(path, num_classes=10, seed=number)
    return root / "data", root / "pretrained"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


@pytest.mark.slow  # four pipeline runs with ResNet-18 forwards
def test_both_cifar10_experiments_and_two_checkpoints_give_openoods_near_far_table(miniature, tmp_path, capsys):
    data_root, pretrained = miniature
    # the miniature's 12-image train list: the paper's 1% and OpenOOD's 600 would be empty, ViM's 256 dimensions
    # and K 100 larger than the bank
    small = {"openood-v1.5-cifar10": ["--detectors", "nnguide", "energy", "knn", "--set", "bank_ratio=1.0",
                                      "--set", "detectors.nnguide.k=2", "--set", "detectors.knn.k=2"],
             "openood-v1.5-cifar10-nnguide": ["--set", "bank_ratio=0.5", "--set", "detectors.nnguide-openood.k=2"]}
    for checkpoint in ("s0", "s1"):
        for experiment, overrides in small.items():
            argv = ["--config", str(REPO / f"configs/experiments/{experiment}.yaml"), "--data-root", str(data_root),
                    "--pretrained-dir", str(pretrained), "--cache-dir", str(tmp_path / "cache"),
                    "--checkpoint", f"cifar10_resnet18_32x32_base_e100_lr0.1_default/{checkpoint}/best.ckpt",
                    "--output-dir", str(tmp_path / "runs" / checkpoint / experiment), "--device", "cpu",
                    "--num-workers", "0", "--no-plots", *overrides]
            assert main.main(argv) == 0
    openood_nnguide = read_rows(tmp_path / "runs/s0/openood-v1.5-cifar10-nnguide/results.csv")
    assert {row["detector"] for row in openood_nnguide} == {"nnguide-openood"}
    assert [row["ood_data"] for row in openood_nnguide] == CIFAR10_OOD
    assert "openood-cifar10-train-in-order" in " ".join(path.name for path in (tmp_path / "cache").rglob("*"))

    rows = collect(tmp_path / "runs", openood=True)
    (table,) = openood_tables(rows).values()
    per_checkpoint = {checkpoint: {(row["detector"], row["ood_data"]): row
                                   for path in (tmp_path / "runs" / checkpoint).rglob("results_openood.csv")
                                   for row in read_rows(path)} for checkpoint in ("s0", "s1")}
    near, far = CIFAR10_OOD[:2], CIFAR10_OOD[2:]
    for detector in ("nnguide", "energy", "knn", "nnguide-openood"):
        lines = {line[1]: line[2:] for line in table[1:] if line[0] == detector}
        assert list(lines) == [*near, "Near-OOD", *far, "Far-OOD"]
        for label, sets in (("Near-OOD", near), ("Far-OOD", far), (CIFAR10_OOD[3], CIFAR10_OOD[3:4])):
            # each checkpoint's average over the sets, then mean and population std over the two checkpoints
            averages = [np.mean([float(per_checkpoint[checkpoint][detector, name]["auroc"]) for name in sets])
                        for checkpoint in ("s0", "s1")]
            assert lines[label][1] == f"{np.mean(averages):.2f} ± {np.std(averages):.2f}"
    assert aggregate_main([str(tmp_path / "runs"), "--openood"]) == 0
    printed = capsys.readouterr().out
    assert "openood-resnet18-cifar10: ID openood-cifar10, bank from openood-cifar10 (mean ± std over 2 " \
           "checkpoints) (OpenOOD v1.5 CIFAR-10)" in printed
    assert "Near-OOD averages openood-cifar10-cifar100, openood-cifar10-tin" in printed
