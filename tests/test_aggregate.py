"""The paper-table aggregation over many results.csv files, and run.sh driven by a fake interpreter."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from errors import UserError
from ood_evaluation.definitions import METRIC_NAMES
from pipeline.report.outputs import write_result
from pipeline.report.rows import CSV_COLUMNS
from pipeline.report.tables import with_interval
from pipeline.tools.aggregate import collect, main, paper_tables, spread_legend
from tests.fake_results import average_of, fake_result, result_row

REPO = Path(__file__).resolve().parents[1]
PAPER_OOD = ["inaturalist", "sun", "places", "textures", "openimage-o"]
DEFAULT_DETECTORS = ["nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd"]

# (detector, ood_data, fpr95, auroc); energy has no OpenImage-O result.
REACT_IMAGENET = [
    ("nnguide", "inaturalist", 11.12, 97.7), ("nnguide", "sun", 21.5, 96.25), ("nnguide", "places", 31.47, 93.1),
    ("nnguide", "textures", 15.03, 95.04), ("nnguide", "openimage-o", 35.1, 92.49),
    ("energy", "inaturalist", 50.0, 90.0), ("energy", "sun", 60.0, 85.0), ("energy", "places", 70.0, 80.0),
    ("energy", "textures", 40.0, 88.0),
]
REACT_V2A = [("nnguide", "inaturalist", 5.0, 99.0), ("nnguide", "textures", 7.0, 98.0)]


def write_results(folder: Path, id_data: str, results: list[tuple[str, str, float, float]],
                  model: str = "resnet50-react", checkpoint: str = "resnet50-0676ba61.pth") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for detector, ood_data, fpr95, auroc in results:
            writer.writerow({"model": model, "train_data": "imagenet1k", "id_data": id_data, "ood_data": ood_data,
                             "detector": detector, "auroc": auroc, "fpr95": fpr95, "aupr_in": 90.0,
                             "aupr_out": 80.0, "dtacc": 85.0, "id_acc": 76.13, "checkpoint": checkpoint})
    return folder / "results.csv"


@pytest.fixture
def results_root(tmp_path: Path) -> Path:
    write_results(tmp_path / "runs/resnet50-react/imagenet1k", "imagenet1k", REACT_IMAGENET)
    write_results(tmp_path / "runs/resnet50-react/imagenet1k-v2-a", "imagenet1k-v2-a", REACT_V2A)
    return tmp_path / "runs"


def test_collect_reads_every_results_csv_as_floats(results_root):
    rows = collect(results_root)
    assert len(rows) == len(REACT_IMAGENET) + len(REACT_V2A)
    assert {row.id_data for row in rows} == {"imagenet1k", "imagenet1k-v2-a"}
    assert rows[0].metrics["fpr95"] == 11.12 and isinstance(rows[0].id_acc, float)


def test_paper_tables_cells_and_both_averages(results_root):
    tables = paper_tables(collect(results_root))
    assert list(tables) == [("resnet50-react", "imagenet1k"), ("resnet50-react", "imagenet1k-v2-a")]

    header, nnguide, energy = tables[("resnet50-react", "imagenet1k")]
    assert header == ["Detector", *[f"{name} {metric}" for name in [*PAPER_OOD, "Avg-4", "Avg-all"]
                                    for metric in ("FPR95", "AUROC")]]
    # Avg-4 = (11.12 + 21.5 + 31.47 + 15.03) / 4 = 19.78, (97.7 + 96.25 + 93.1 + 95.04) / 4 = 95.5225;
    # Avg-all adds OpenImage-O: 114.22 / 5 = 22.844, 474.58 / 5 = 94.916.
    assert nnguide == ["nnguide", "11.12", "97.70", "21.50", "96.25", "31.47", "93.10", "15.03", "95.04",
                       "35.10", "92.49", "19.78", "95.52", "22.84", "94.92"]
    # No OpenImage-O for energy: its cell and the all-set average are "-", the paper's average is not.
    assert energy == ["energy", "50.00", "90.00", "60.00", "85.00", "70.00", "80.00", "40.00", "88.00",
                      "-", "-", "55.00", "85.75", "-", "-"]

    # Without the four paper sets there is no Avg-4 column.
    assert tables[("resnet50-react", "imagenet1k-v2-a")] == [
        ["Detector", "inaturalist FPR95", "inaturalist AUROC", "textures FPR95", "textures AUROC",
         "Avg-all FPR95", "Avg-all AUROC"],
        ["nnguide", "5.00", "99.00", "7.00", "98.00", "6.00", "98.50"]]


def test_main_writes_one_table_per_model_and_id_set(results_root, tmp_path, capsys):
    output_dir = tmp_path / "tables"
    assert main([str(results_root), "--output-dir", str(output_dir)]) == 0
    printed = capsys.readouterr().out
    assert "resnet50-react: ID imagenet1k, bank from imagenet1k" in printed and "Avg-4 (iNaturalist" in printed

    with (output_dir / "resnet50-react__imagenet1k.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table == paper_tables(collect(results_root))[("resnet50-react", "imagenet1k")]
    markdown = (output_dir / "resnet50-react__imagenet1k-v2-a.md").read_text()
    assert "| nnguide | 5.00 | 99.00 | 7.00 | 98.00 | 6.00 | 98.50 |" in markdown
    combined = (output_dir / "tables.md").read_text()
    assert "# resnet50-react: ID imagenet1k," in combined and "# resnet50-react: ID imagenet1k-v2-a," in combined
    assert "| 19.78 | 95.52 | 22.84 | 94.92 |" in combined


def test_duplicate_result_names_both_files(results_root):
    first = results_root / "resnet50-react/imagenet1k/results.csv"
    second = write_results(results_root / "rerun", "imagenet1k", REACT_IMAGENET[:1])
    with pytest.raises(UserError) as error:
        collect(results_root)
    for value in (str(first), str(second), "resnet50-react", "inaturalist", "nnguide"):  # both files, the result
        assert value in str(error.value)


def test_empty_root_is_a_one_line_error_with_exit_code_2(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "pipeline.tools.aggregate", str(tmp_path)], check=False, cwd=REPO,
                               capture_output=True, text=True)
    assert completed.returncode == 2
    (error,) = completed.stderr.strip().splitlines()
    assert error.startswith("error: ") and "results.csv" in error and str(tmp_path) in error


def fake_python(folder: Path) -> Path:
    """An executable that runs tests/fake_main.py (run.sh calls it as PYTHON or LAUNCHER)."""
    fake = folder / "fake_python"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests/fake_main.py"}" "$@"\n')
    fake.chmod(0o755)
    return fake


def run_script(tmp_path: Path, *arguments: str, fail_model: str = "", launcher: str = "",
               **variables: str) -> tuple[subprocess.CompletedProcess, list]:
    """run.sh with PYTHON = a fake that logs its argv and writes a one-row results.csv, and the environment
    `variables` (e.g. BENCHMARKS="cifar10"); returns (run, argvs)."""
    fake = fake_python(tmp_path)
    log = tmp_path / "calls.jsonl"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DETECTORS", "DATA_ROOT", "OUTPUT_ROOT", "LAUNCHER", "BENCHMARKS", "FAKE_FAIL_MODEL")}
    if launcher:
        environment["LAUNCHER"] = launcher.format(fake=fake)
    if fail_model:  # unset otherwise: an --openood-cifar run passes no --model, which the fake reads as ""
        environment["FAKE_FAIL_MODEL"] = fail_model
    environment.update(PYTHON=str(fake), FAKE_LOG=str(log), OUTPUT_ROOT="out",
                       MODELS="resnet50-supcon vit-b16-swag-e2e-v1", ID_SETS="imagenet1k", **variables)
    completed = subprocess.run([str(REPO / "run.sh"), *arguments], check=False, cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return completed, calls


def test_run_sh_calls_main_once_per_model_and_id_set_then_aggregates(tmp_path):
    completed, calls = run_script(tmp_path, "--data-root", "/data", "--", "--batch-size", "128",
                                  "--num-workers", "16")
    assert completed.returncode == 0, completed.stderr

    def expected(model: str, ood_sets: list[str], detectors: list[str]) -> list[str]:
        return ["main.py", "--model", model, "--train-data", "imagenet1k", "--id-data", "imagenet1k",
                "--ood-data", *ood_sets, "--detectors", *detectors, "--data-root", "/data",
                "--output-dir", str(tmp_path / "out" / model / "imagenet1k"),
                "--batch-size", "128", "--num-workers", "16"]

    assert calls == [expected("resnet50-supcon", PAPER_OOD, DEFAULT_DETECTORS),
                     expected("vit-b16-swag-e2e-v1", [*PAPER_OOD, "imagenet-o"], [*DEFAULT_DETECTORS, "nnguide-vim"])]
    assert "vit-b16-swag-e2e-v1: ID imagenet1k" in completed.stdout
    assert (tmp_path / "out/resnet50-supcon__imagenet1k.md").exists()
    assert (tmp_path / "out/tables.md").exists()


def test_run_sh_launcher_may_be_several_words(tmp_path):
    """LAUNCHER="torchrun --nproc_per_node=8"-style: its words reach the command line in front of main.py."""
    completed, calls = run_script(tmp_path, launcher="{fake} --nproc_per_node=8")
    assert completed.returncode == 0, completed.stderr
    assert [call[:2] for call in calls] == [["--nproc_per_node=8", "main.py"]] * 2


def test_run_sh_stops_at_the_first_failing_run(tmp_path):
    completed, calls = run_script(tmp_path, "--detectors", "energy", fail_model="resnet50-supcon")
    assert completed.returncode == 3
    assert len(calls) == 1 and "(resnet50-supcon, imagenet1k)" in completed.stderr
    assert not (tmp_path / "out/tables.md").exists()


def test_run_sh_keep_going_reports_failures_and_exits_non_zero(tmp_path):
    completed, calls = run_script(tmp_path, "--keep-going", "--detectors", "energy", fail_model="resnet50-supcon")
    assert completed.returncode == 1
    assert [call[2] for call in calls] == ["resnet50-supcon", "vit-b16-swag-e2e-v1"]
    assert "1 run(s) failed" in completed.stderr and "(resnet50-supcon, imagenet1k): exit code 3" in completed.stderr
    assert (tmp_path / "out/vit-b16-swag-e2e-v1__imagenet1k.md").exists()


def test_run_sh_aggregate_only_runs_nothing(tmp_path, results_root):
    completed, calls = run_script(tmp_path, "--aggregate-only", "--output-root", str(results_root))
    assert completed.returncode == 0, completed.stderr
    assert calls == [] and "resnet50-react: ID imagenet1k-v2-a" in completed.stdout


def openood_cifar_calls(tmp_path: Path, benchmark: str) -> list[list[str]]:
    """run.sh --openood-cifar's main.py calls for one benchmark: both settings for each of the three checkpoints
    (the full list of both benchmarks: tests/test_openood_cifar.py)."""
    return [["main.py", "--config", f"configs/experiments/{experiment}.yaml", "--checkpoint",
             f"{benchmark}_resnet18_32x32_base_e100_lr0.1_default/{checkpoint}/best.ckpt", "--data-root", "/data",
             "--output-dir", str(tmp_path / "out" / f"openood-resnet18-{benchmark}" / checkpoint / setting)]
            for checkpoint in ("s0", "s1", "s2")
            for setting, experiment in (("paper-settings", f"openood-v1.5-{benchmark}"),
                                        ("openood-nnguide", f"openood-v1.5-{benchmark}-nnguide"))]


@pytest.mark.slow  # seven interpreters started by run.sh
def test_run_sh_openood_cifar_runs_the_one_benchmark_named(tmp_path):
    completed, calls = run_script(tmp_path, "--openood-cifar", "--benchmarks", "cifar100", "--data-root", "/data")
    assert completed.returncode == 0, completed.stderr
    assert calls == openood_cifar_calls(tmp_path, "cifar100")


@pytest.mark.slow  # seven interpreters started by run.sh
def test_run_sh_openood_cifar_reads_the_benchmarks_from_the_environment(tmp_path):
    completed, calls = run_script(tmp_path, "--openood-cifar", "--data-root", "/data", BENCHMARKS="cifar10")
    assert completed.returncode == 0, completed.stderr
    assert calls == openood_cifar_calls(tmp_path, "cifar10")


@pytest.mark.parametrize("arguments, named", [
    (["--openood-cifar", "--benchmarks", "cifar10 tin"], ["'tin'", "cifar10 cifar100"]),  # the wrong name, the valid
    (["--openood-cifar", "--benchmarks", ""], ["at least one", "cifar10 cifar100"]),
    (["--benchmarks", "cifar10"], ["--benchmarks", "--openood-cifar only"])])
def test_run_sh_benchmarks_other_than_cifar10_and_cifar100_are_one_error_line_before_any_run(tmp_path, arguments,
                                                                                             named):
    completed, calls = run_script(tmp_path, *arguments)
    assert completed.returncode == 2 and calls == []
    (error,) = completed.stderr.splitlines()
    assert error.startswith("run.sh: ") and all(value in error for value in named)


def test_runs_of_several_checkpoints_give_mean_and_population_std_with_averages_taken_per_checkpoint(tmp_path):
    """OpenOOD's convention (scripts/eval_ood.py): each checkpoint's table, averages included, then the
    cell-wise mean and np.std (ddof 0) over the checkpoints."""
    runs = {"s0": [("nnguide", "inaturalist", 10.0, 90.0), ("nnguide", "textures", 20.0, 80.0)],
            "s1": [("nnguide", "inaturalist", 14.0, 94.0), ("nnguide", "textures", 40.0, 70.0)],
            "s2": [("nnguide", "inaturalist", 12.0, 95.0)]}  # s2 has no Textures result
    for checkpoint, results in runs.items():
        write_results(tmp_path / checkpoint, "imagenet1k", results, checkpoint=f"{checkpoint}/best.ckpt")
    header, line = paper_tables(collect(tmp_path))[("resnet50-react", "imagenet1k")]
    assert header == ["Detector", "inaturalist FPR95", "inaturalist AUROC", "textures FPR95", "textures AUROC",
                      "Avg-all FPR95", "Avg-all AUROC"]
    # iNaturalist FPR95 10, 14, 12: mean 12, std sqrt(8/3) = 1.63; AUROC 90, 94, 95: mean 93, std sqrt(14/3) = 2.16.
    # Textures and Avg-all need s2's missing Textures result: "-".
    assert line == ["nnguide", "12.00 ± 1.63", "93.00 ± 2.16", "-", "-", "-", "-"]
    (tmp_path / "s2/results.csv").unlink()
    _, line = paper_tables(collect(tmp_path))[("resnet50-react", "imagenet1k")]
    # Avg-all per checkpoint: FPR95 15 and 27 -> 21 ± 6; AUROC 85 and 82 -> 83.5 ± 1.5 (not the mean of the stds)
    assert line == ["nnguide", "12.00 ± 2.00", "92.00 ± 2.00", "30.00 ± 10.00", "75.00 ± 5.00", "21.00 ± 6.00",
                    "83.50 ± 1.50"]
    assert main([str(tmp_path)]) == 0
    assert "resnet50-react: ID imagenet1k, bank from imagenet1k (mean ± std over 2 checkpoints)" in \
        (tmp_path / "tables.md").read_text()


def test_results_csv_without_checkpoint_and_interval_columns_still_aggregates(tmp_path):
    """Files written before those columns existed hold one run of the model's own checkpoint."""
    old_columns = CSV_COLUMNS[:CSV_COLUMNS.index("checkpoint")]
    (tmp_path / "old").mkdir()
    path = tmp_path / "old/results.csv"
    path.write_text(",".join(old_columns) + "\n" + "".join(
        f"resnet50-react,imagenet1k,imagenet1k,{ood},{detector},{auroc},{fpr95},90.0,80.0,85.0,76.13\n"
        for detector, ood, fpr95, auroc in REACT_V2A))
    rows = collect(tmp_path)
    assert [row.checkpoint for row in rows] == ["", ""]
    assert paper_tables(rows)[("resnet50-react", "imagenet1k")][1] == ["nnguide", "5.00", "99.00", "7.00", "98.00",
                                                                        "6.00", "98.50"]


def test_aggregation_imports_neither_torch_nor_scikit_learn():
    """`python -m pipeline.tools.aggregate` and run.sh's table step start in a fraction of a second."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipeline.tools.aggregate; "
                             "print(sorted({'torch', 'sklearn', 'ood_detectors'} & set(sys.modules)))"],
                            cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout
    assert loaded.strip() == "[]"


# ---- --ci: the runs' bootstrap intervals in the tables ----------------------------------------------------------

HALF_WIDTHS = {"fpr95": 1.0, "auroc": 0.3, "fpr95_ood_positive": 1.2}  # per-set rows, percent; others 0.5
AVERAGE_HALF_WIDTHS = {"fpr95": 0.5, "auroc": 0.2, "fpr95_ood_positive": 0.7}


def run_rows(results: list[tuple[str, str, float, float]], checkpoint: str = "ckpt",
             intervals: bool = True) -> list[dict]:
    """Rows as a run returns them (FPR95 and AUROC given, FPR95 OOD-positive = FPR95 + 1), with intervals of
    HALF_WIDTHS around each value unless `intervals` is false (a run with bootstrap=0)."""
    rows = []
    for detector, ood_data, fpr95, auroc in results:
        row = {"model": "resnet50-react", "train_data": "imagenet1k", "id_data": "imagenet1k", "ood_data": ood_data,
               "detector": detector, "auroc": auroc, "fpr95": fpr95, "aupr_in": 90.0, "aupr_out": 80.0,
               "dtacc": 85.0, "fpr95_ood_positive": fpr95 + 1, "id_acc": 76.13, "checkpoint": checkpoint}
        rows.append({**row, **(interval_columns(percent_around(row, HALF_WIDTHS)) if intervals else {})})
    return rows


def percent_around(metrics: dict, half_widths: dict[str, float]) -> dict[str, tuple[float, float]]:
    """An interval per metric, in percent: the value ± its half width (0.5 unless given)."""
    return {metric: (metrics[metric] - half_widths.get(metric, 0.5), metrics[metric] + half_widths.get(metric, 0.5))
            for metric in METRIC_NAMES}


def interval_columns(intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {f"{metric}_ci_{end}": value for metric, bounds in intervals.items()
            for end, value in zip(("low", "high"), bounds)}


def write_run(folder: Path, rows: list[dict], averages: list[tuple[str, list[str]]] = ()) -> None:
    """The run's result files as write_result writes them; averages.csv with the given (label, sets) averages of
    each detector (intervals of AVERAGE_HALF_WIDTHS)."""
    result_rows = [result_row(row) for row in rows]
    average_rows = []
    for detector in dict.fromkeys(row.detector for row in result_rows):
        for label, sets in averages:
            averaged = [row for name in sets for row in result_rows if (row.detector, row.ood_data) == (detector, name)]
            average = average_of(averaged, label, {})
            average_rows.append(average_of(averaged, label, percent_around(average.metrics, AVERAGE_HALF_WIDTHS)))
    write_result(fake_result(result_rows, average_rows), folder)


def table_csv(path: Path) -> list[list[str]]:
    with path.open() as handle:
        return list(csv.reader(handle))


def test_ci_shows_each_runs_intervals_and_bare_values_where_none_was_stored(tmp_path):
    paper_sets = ["inaturalist", "sun", "places", "textures"]
    # One run scored the four paper sets (Avg-4 = its Avg-all); OpenImage-O came from a run without intervals.
    write_run(tmp_path / "runs/four", run_rows(REACT_IMAGENET[:4] + REACT_IMAGENET[5:]),
              [("Avg-4", paper_sets), ("Avg-all", paper_sets)])
    write_run(tmp_path / "runs/openimage-o", run_rows(REACT_IMAGENET[4:5], intervals=False))
    # A results.csv from before the interval columns and averages.csv, and two checkpoints of another model.
    old_columns = CSV_COLUMNS[:CSV_COLUMNS.index("checkpoint")]
    (tmp_path / "runs/old").mkdir()
    (tmp_path / "runs/old/results.csv").write_text(",".join(old_columns) + "\n" + "".join(
        f"resnet50-react,imagenet1k,imagenet1k-v2-a,{ood},{detector},{auroc},{fpr95},90.0,80.0,85.0,76.13\n"
        for detector, ood, fpr95, auroc in REACT_V2A))
    for checkpoint, shift in (("s0", 0.0), ("s1", 2.0)):
        rows = [{**row, "model": "resnet50-supcon", "fpr95": row["fpr95"] + shift}
                for row in run_rows(REACT_V2A, checkpoint)]
        write_run(tmp_path / "runs" / checkpoint, rows, [("Avg-all", ["inaturalist", "textures"])])

    assert main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "ci"), "--ci"]) == 0
    # Per-set cells: the run's interval (FPR95 ± 1, AUROC ± 0.3); Avg-4 from averages.csv (± 0.5, ± 0.2); Avg-all
    # averages OpenImage-O too, which no run averaged with the others: bare, as OpenImage-O's own cells are.
    header, nnguide, energy = table_csv(tmp_path / "ci/resnet50-react__imagenet1k.csv")
    assert nnguide == ["nnguide", "11.12 [10.12, 12.12]", "97.70 [97.40, 98.00]", "21.50 [20.50, 22.50]",
                       "96.25 [95.95, 96.55]", "31.47 [30.47, 32.47]", "93.10 [92.80, 93.40]", "15.03 [14.03, 16.03]",
                       "95.04 [94.74, 95.34]", "35.10", "92.49", "19.78 [19.28, 20.28]", "95.52 [95.32, 95.72]",
                       "22.84", "94.92"]
    assert energy == ["energy", "50.00 [49.00, 51.00]", "90.00 [89.70, 90.30]", "60.00 [59.00, 61.00]",
                      "85.00 [84.70, 85.30]", "70.00 [69.00, 71.00]", "80.00 [79.70, 80.30]", "40.00 [39.00, 41.00]",
                      "88.00 [87.70, 88.30]", "-", "-", "55.00 [54.50, 55.50]", "85.75 [85.55, 85.95]", "-", "-"]
    # Without --ci: the same numbers, no intervals.
    plain = table_csv(tmp_path / "plain/resnet50-react__imagenet1k.csv")
    assert plain == paper_tables(collect(tmp_path / "runs"))[("resnet50-react", "imagenet1k")]
    assert plain[1:] == [[cell.split(" [")[0] for cell in line] for line in (nnguide, energy)]
    assert "[" not in (tmp_path / "plain/tables.md").read_text().split("# resnet50-supcon")[0]

    markdown = (tmp_path / "ci/resnet50-react__imagenet1k.md").read_text()
    table, legend = markdown.split("\n\n")[2:4]  # the intervals' line sits under the table
    assert table.startswith("| Detector") and legend.startswith("[low, high]: ") and "test images" in legend
    assert "No interval for openimage-o FPR95, openimage-o AUROC, Avg-all FPR95, Avg-all AUROC:" in legend
    old = (tmp_path / "ci/resnet50-react__imagenet1k-v2-a.md").read_text()
    assert "| nnguide | 5.00 | 99.00 | 7.00 | 98.00 | 6.00 | 98.50 |" in old
    assert "No interval for inaturalist FPR95, inaturalist AUROC, textures FPR95" in old
    # Several checkpoints: mean ± std over them, with or without --ci, and the line under the table says so.
    replicates = (tmp_path / "ci/resnet50-supcon__imagenet1k.md").read_text()
    assert replicates == (tmp_path / "plain/resnet50-supcon__imagenet1k.md").read_text()
    assert "| nnguide | 6.00 ± 1.00 | 99.00 ± 0.00 |" in replicates
    assert replicates.rstrip().endswith("|\n\n" + spread_legend(2)) and "standard deviation over the 2 " \
        "checkpoints" in spread_legend(2)


def test_ci_in_the_openood_tables_reads_openood_s_fpr95_and_the_near_and_far_averages(tmp_path):
    near, far = ["openood-ssb-hard", "openood-ninco"], ["openood-inaturalist", "openood-textures"]
    results = [("nnguide", name, fpr95, auroc) for name, fpr95, auroc in zip(
        [*near, *far], [60.0, 40.0, 3.0, 20.0], [80.0, 90.0, 99.0, 95.0])]
    write_run(tmp_path / "runs/four", run_rows(results), [("Avg-all", [*near, *far]), ("Near-OOD", near)])
    write_run(tmp_path / "runs/openimage-o", run_rows([("nnguide", "openood-openimage-o", 10.0, 97.0)],
                                                      intervals=False))
    assert main([str(tmp_path / "runs"), "--openood", "--ci"]) == 0
    lines = {line[1]: line[2:] for line in table_csv(tmp_path / "runs/resnet50-react__imagenet1k__openood.csv")[1:]}
    # FPR95 is OpenOOD's (FPR95 + 1 here), its interval ± 1.2; Near-OOD's from averages.csv (± 0.7, ± 0.2).
    assert lines["openood-ssb-hard"] == ["61.00 [59.80, 62.20]", "80.00 [79.70, 80.30]", "90.00 [89.50, 90.50]",
                                         "80.00 [79.50, 80.50]", "76.13"]
    assert lines["Near-OOD"] == ["51.00 [50.30, 51.70]", "85.00 [84.80, 85.20]", "90.00 [89.50, 90.50]",
                                 "80.00 [79.50, 80.50]", "76.13"]
    assert lines["openood-openimage-o"] == ["11.00", "97.00", "90.00", "80.00", "76.13"]
    assert lines["Far-OOD"] == ["12.00", "97.00", "90.00", "80.00", "76.13"]   # its sets span two runs: bare
    markdown = (tmp_path / "runs/resnet50-react__imagenet1k__openood.md").read_text()
    assert "No interval for openood-openimage-o, Far-OOD:" in markdown and "ID Acc has no interval." in markdown


def test_run_sh_tables_show_the_runs_intervals(tmp_path):
    write_run(tmp_path / "results/four", run_rows(REACT_IMAGENET[:4]), [("Avg-4", ["inaturalist", "sun", "places",
                                                                                  "textures"])])
    completed, calls = run_script(tmp_path, "--aggregate-only", "--output-root", str(tmp_path / "results"))
    assert completed.returncode == 0, completed.stderr
    assert calls == [] and "| nnguide | 11.12 [10.12, 12.12] |" in (tmp_path / "results/tables.md").read_text()


def test_an_asymmetric_interval_is_shown_as_its_bounds():
    """A percentile interval of an FPR95 of 0 reaches up only: '0.00 ± 10.71' would read as a negative FPR."""
    assert with_interval("0.00", (0.0, 21.42)) == "0.00 [0.00, 21.42]"
    assert with_interval("-", (0.0, 21.42)) == "-" and with_interval("3.10", None) == "3.10"


def test_result_files_are_checked_before_they_are_tabulated(tmp_path, capsys):
    """An edited results.csv, an interrupted run's folder and a file that is not text are each one error line
    naming the file; a results.csv without a manifest beside it is read as it is."""
    write_run(tmp_path / "runs/a", run_rows(REACT_IMAGENET[:2]))
    assert main([str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    results = tmp_path / "runs/a/results.csv"
    original = results.read_text()

    def refused(*fragments: str) -> None:
        assert main([str(tmp_path / "runs")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and all(fragment in error for fragment in fragments), error

    results.write_text(original.replace("11.12", "1.12"))                   # a number changed by hand
    refused(str(results), "checksum")
    results.write_text(original)
    manifest = tmp_path / "runs/a/results-manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    refused("interrupted", str(tmp_path / "runs/a"))
    manifest.unlink()
    results.write_bytes(b"\xff\xfe" + original.encode("utf-16-le"))       # saved as UTF-16 by an editor
    refused(str(results), "UTF-8")
