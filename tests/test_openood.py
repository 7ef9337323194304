"""OpenOOD v1.5's ImageNet-1K benchmark: image-list datasets, its configs, its table, its FPR95, run.sh --openood."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from dataloaders import build_dataset
from dataloaders.imagelist import image_list
from errors import UserError
from ood_evaluation.metrics import ood_metrics
from pipeline.report.rows import OPENOOD_COLUMNS
from pipeline.tools.aggregate import collect, openood_tables
from pipeline.tools.aggregate import main as aggregate_main
from pipeline.config.experiment import resolve_experiment
from pipeline.config.loading import load_dataset_config
from tests.datagen import write_class_folders
from tests.test_aggregate import fake_python

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs/experiments/openood-v1.5-imagenet.yaml"
DEFAULT_DETECTORS = ["nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd"]
# config name -> (OpenOOD's list file, the image folder its paths are relative to, the folder of our images)
OPENOOD_SETS = {
    "openood-imagenet-test": ("test_imagenet.txt", "images_largescale", "imagenet_1k/val"),
    "openood-ssb-hard": ("test_ssb_hard.txt", "images_largescale", "ssb_hard"),
    "openood-ninco": ("test_ninco.txt", "images_largescale", "ninco"),
    "openood-inaturalist": ("test_inaturalist.txt", "images_largescale", "inaturalist"),
    "openood-textures": ("test_textures.txt", "images_classic", "texture"),
    "openood-openimage-o": ("test_openimage_o.txt", "images_largescale", "openimage_o"),
}
OOD_SETS = list(OPENOOD_SETS)[1:]


def write_list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def openood_root(tmp_path_factory) -> Path:
    """A data root as OpenOOD lays out its data folder under openood/, plus an imagenet1k train folder (the bank).

    Each list names a class 'a b' (a path with a space) and class 'c', two images each, labels 0 and 1 for the
    ID set and -1 for the OOD sets, as OpenOOD's lists give them."""
    root = tmp_path_factory.mktemp("datasets")
    write_class_folders(root / "imagenet1k/imagenet/train", ["n0", "n1", "n2", "n3"], per_class=4, size=(32, 32))
    for seed, (name, (list_name, image_folder, set_folder)) in enumerate(OPENOOD_SETS.items()):
        images = root / "openood" / image_folder
        files = write_class_folders(images / set_folder, ["a b", "c"], per_class=2, size=(32, 32), seed=seed)
        labels = [j // 2 for j in range(4)] if name == "openood-imagenet-test" else [-1] * 4
        write_list(root / "openood/benchmark_imglist/imagenet" / list_name,
                   [f"{file.relative_to(images).as_posix()} {label}" for file, label in zip(files, labels)])
    return root


# ---- the image_list format ----------------------------------------------------------------------------

@pytest.fixture
def listed(tmp_path: Path) -> tuple[Path, list[Path]]:
    """lists/test.txt over images/: a comment, a blank line, a path with a space, and a file that is missing."""
    files = write_class_folders(tmp_path / "images", ["cat", "sea lion"], per_class=2)
    list_file = write_list(tmp_path / "lists/test.txt", [
        "# path label", "sea lion/img1.JPEG 3", "", "cat/img0.JPEG -1",
        "  sea lion/img0.JPEG\t7  ", "cat/gone.JPEG 1", "cat/img1.JPEG 0"])
    return list_file, files


def test_image_list_reads_paths_and_labels_in_file_order(listed):
    list_file, _ = listed
    dataset = image_list(list_file, "test", transform=None, image_root="../images", skip_missing=True)
    assert dataset.image_ids == ["sea lion/img1.JPEG", "cat/img0.JPEG", "sea lion/img0.JPEG", "cat/img1.JPEG"]
    assert dataset.labels.dtype == np.int64 and dataset.labels.tolist() == [3, -1, 7, 0]
    assert dataset.skipped == ["cat/gone.JPEG"]
    image, label = dataset[0]
    with Image.open(list_file.parents[1] / "images/sea lion/img1.JPEG") as expected:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected.convert("RGB")))
    assert label == 3
    # the fingerprint follows the list: another order is another image list
    reordered = write_list(list_file.with_name("reordered.txt"),
                           ["cat/img0.JPEG -1", "sea lion/img1.JPEG 3", "sea lion/img0.JPEG 7", "cat/img1.JPEG 0"])
    assert image_list(reordered, "test", None, image_root="../images").fingerprint() != dataset.fingerprint()


def test_a_missing_listed_file_is_an_error_naming_it(listed):
    list_file, _ = listed
    with pytest.raises(UserError) as error:
        image_list(list_file, "test", transform=None, image_root="../images")
    message = str(error.value)
    assert "1 of the 5" in message and str(list_file) in message and "cat/gone.JPEG" in message
    assert "skip_missing" in str(error.value)


@pytest.mark.parametrize("line, wrong", [("cat/img0.JPEG dog", "'dog'"),  # a label that is not an integer
                                         ("cat/img0.JPEG", "'cat/img0.JPEG'"),  # no label
                                         ("/abs/img0.JPEG 1", "'/abs/img0.JPEG'")])  # an absolute path
def test_a_malformed_line_names_the_list_file_and_line(tmp_path, line, wrong):
    list_file = write_list(tmp_path / "bad.txt", ["# header", "ok.jpg 1", line])
    with pytest.raises(UserError) as error:
        image_list(list_file, "test", transform=None)
    assert f"{list_file}, line 3" in str(error.value) and wrong in str(error.value)


def test_a_missing_list_file_or_image_root_is_an_error(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope.txt"))):
        image_list(tmp_path / "nope.txt", "test", transform=None)
    list_file = write_list(tmp_path / "list.txt", ["a.jpg 1"])
    with pytest.raises(UserError) as error:
        image_list(list_file, "test", transform=None, image_root="images")
    assert "'images'" in str(error.value) and str((tmp_path / "images").resolve()) in str(error.value)


def test_openood_dataset_configs_read_openood_layout(openood_root):
    for name, (_, image_folder, set_folder) in OPENOOD_SETS.items():
        dataset = build_dataset(load_dataset_config(name), "test", openood_root, transform=None)
        assert dataset.root == (openood_root / "openood" / image_folder).resolve()
        assert dataset.image_ids == [f"{set_folder}/{cls}/img{j}.JPEG" for cls in ("a b", "c") for j in (0, 1)]
        assert dataset.labels.tolist() == ([0, 0, 1, 1] if name == "openood-imagenet-test" else [-1] * 4)


def test_openood_experiment_resolves_with_any_model_and_k_100():
    config = resolve_experiment(EXPERIMENT, {"model": "regnet-y-16gf-swag-e2e-v1"},
                                ["detectors.nnguide.k=100"]).config
    assert (config.model, config.train_data, config.id_data) == ("regnet-y-16gf-swag-e2e-v1", "imagenet1k",
                                                                  "openood-imagenet-test")
    assert config.ood_data == OOD_SETS
    assert config.detectors["nnguide"]["k"] == 100 and (config.seed, config.bank_ratio) == (0, 0.01)


def test_main_runs_the_openood_experiment_on_generated_lists(openood_root, small_model_yaml, tmp_path):
    argv = ["--config", str(EXPERIMENT), "--model", str(small_model_yaml), "--detectors", "nnguide", "energy",
            "--data-root", str(openood_root), "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--batch-size", "8", "--num-workers", "0",
            "--bank-ratio", "0.5", "--no-plots", "--set", "detectors.nnguide.k=2"]
    assert main.main(argv) == 0
    with (tmp_path / "out/results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["ood_data"], row["detector"]) for row in rows] == \
        [(ood, detector) for detector in ("nnguide", "energy") for ood in OOD_SETS]
    assert {row["id_data"] for row in rows} == {"openood-imagenet-test"}
    assert {row["train_data"] for row in rows} == {"imagenet1k"}
    # the OpenOOD-convention file the aggregation reads, one row per result, same AUROC
    with (tmp_path / "out/results_openood.csv").open() as handle:
        openood_rows = list(csv.DictReader(handle))
    assert [row["auroc"] for row in openood_rows] == [row["auroc"] for row in rows]
    assert all(0 <= float(row["fpr95_ood_positive"]) <= 100 for row in openood_rows)
    assert aggregate_main([str(tmp_path / "out"), "--openood"]) == 0


# ---- OpenOOD's FPR95 convention --------------------------------------------------------------------------

def test_fpr95_ood_positive_differs_from_the_papers_on_a_hand_checked_case():
    # ID scores 1..20; OOD: 18 at 0 and a tail at 10.5 and 12.5.
    # Paper (ID positive): TPR 19/20 = 0.95 first at threshold 2, which accepts the OOD 10.5 and 12.5: 2/20.
    # OpenOOD (OOD positive): 95% of the OOD = 19 images; the first threshold detecting them (score <= 10.5)
    # rejects ID 1..10: 10/20.
    id_scores = np.arange(1, 21, dtype=float)
    ood_scores = np.array([0.0] * 18 + [10.5, 12.5])
    metrics = ood_metrics(id_scores, ood_scores)
    assert metrics["fpr95"] == pytest.approx(0.10)
    assert metrics["fpr95_ood_positive"] == pytest.approx(0.50)
    # Mirror case: a tail of ID below the OOD. Paper: the last ID (score -5) is outside the 95%, TPR 0.95 at
    # threshold 1 accepts no OOD: 0. OpenOOD: all 20 OOD (score 0.5) are caught at 0.5, rejecting ID -5: 1/20.
    metrics = ood_metrics(np.array([-5.0, *range(1, 20)]), np.full(20, 0.5))
    assert metrics["fpr95"] == pytest.approx(0.0) and metrics["fpr95_ood_positive"] == pytest.approx(0.05)


# ---- the OpenOOD-shaped table ---------------------------------------------------------------------------

# detector -> ood set -> (auroc, fpr95_ood_positive, aupr_in, aupr_out); energy has no NINCO result
REGNET = {
    "nnguide": {"openood-ssb-hard": (80.0, 60.0, 70.0, 90.0), "openood-ninco": (90.0, 40.0, 80.0, 94.0),
                "openood-inaturalist": (99.0, 3.0, 98.0, 99.5), "openood-textures": (95.0, 20.0, 90.0, 97.0),
                "openood-openimage-o": (97.0, 10.0, 94.0, 98.0)},
    "energy": {"openood-ssb-hard": (70.0, 80.0, 60.0, 85.0), "openood-inaturalist": (90.0, 40.0, 80.0, 95.0),
               "openood-textures": (85.0, 50.0, 75.0, 90.0), "openood-openimage-o": (88.0, 45.0, 82.0, 91.0)},
}


def write_openood_results(folder: Path, model: str, id_data: str,
                          results: dict[str, dict[str, tuple[float, float, float, float]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "results_openood.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=OPENOOD_COLUMNS)
        writer.writeheader()
        for detector, per_set in results.items():
            for ood_data, (auroc, fpr95, aupr_in, aupr_out) in per_set.items():
                writer.writerow({"model": model, "train_data": "imagenet1k", "id_data": id_data, "ood_data": ood_data,
                                 "detector": detector, "auroc": auroc, "fpr95_ood_positive": fpr95,
                                 "aupr_in": aupr_in, "aupr_out": aupr_out, "id_acc": 86.1})
    return folder / "results_openood.csv"


@pytest.fixture
def openood_results(tmp_path: Path) -> Path:
    write_openood_results(tmp_path / "runs/regnet/openood", "regnet", "openood-imagenet-test", REGNET)
    # a paper-protocol run also writes results_openood.csv; it has no OpenOOD set, so it gets no table
    write_openood_results(tmp_path / "runs/regnet/imagenet1k", "regnet", "imagenet1k",
                          {"nnguide": {"inaturalist": (99.0, 2.0, 99.0, 99.0)}})
    return tmp_path / "runs"


def test_openood_table_per_set_rows_and_near_far_averages(openood_results):
    tables = openood_tables(collect(openood_results, openood=True))
    assert list(tables) == [("regnet", "openood-imagenet-test")]
    header, *lines = tables[("regnet", "openood-imagenet-test")]
    assert header == ["Detector", "OOD set", "FPR95", "AUROC", "AUPR-in", "AUPR-out", "ID Acc"]
    # Near-OOD = mean of SSB-hard and NINCO: FPR (60 + 40) / 2 = 50, AUROC (80 + 90) / 2 = 85,
    # AUPR-in (70 + 80) / 2 = 75, AUPR-out (90 + 94) / 2 = 92.
    # Far-OOD = mean of iNaturalist, Textures, OpenImage-O: FPR (3 + 20 + 10) / 3 = 11, AUROC (99 + 95 + 97) / 3 = 97,
    # AUPR-in (98 + 90 + 94) / 3 = 94, AUPR-out (99.5 + 97 + 98) / 3 = 98.1666...
    assert lines[:7] == [
        ["nnguide", "openood-ssb-hard", "60.00", "80.00", "70.00", "90.00", "86.10"],
        ["nnguide", "openood-ninco", "40.00", "90.00", "80.00", "94.00", "86.10"],
        ["nnguide", "Near-OOD", "50.00", "85.00", "75.00", "92.00", "86.10"],
        ["nnguide", "openood-inaturalist", "3.00", "99.00", "98.00", "99.50", "86.10"],
        ["nnguide", "openood-textures", "20.00", "95.00", "90.00", "97.00", "86.10"],
        ["nnguide", "openood-openimage-o", "10.00", "97.00", "94.00", "98.00", "86.10"],
        ["nnguide", "Far-OOD", "11.00", "97.00", "94.00", "98.17", "86.10"]]
    # energy has no NINCO: that row and the near-OOD average are "-"; far-OOD: FPR (40 + 50 + 45) / 3 = 45,
    # AUROC (90 + 85 + 88) / 3 = 87.666..., AUPR-in (80 + 75 + 82) / 3 = 79, AUPR-out (95 + 90 + 91) / 3 = 92.
    assert lines[8:10] == [["energy", "openood-ninco", "-", "-", "-", "-", "86.10"],
                           ["energy", "Near-OOD", "-", "-", "-", "-", "86.10"]]
    assert lines[13] == ["energy", "Far-OOD", "45.00", "87.67", "79.00", "92.00", "86.10"]


def test_aggregate_openood_writes_its_own_files(openood_results, tmp_path, capsys):
    output_dir = tmp_path / "tables"
    assert aggregate_main([str(openood_results), "--output-dir", str(output_dir), "--openood"]) == 0
    printed = capsys.readouterr().out
    assert "regnet: ID openood-imagenet-test, bank from imagenet1k (OpenOOD v1.5 ImageNet-1K)" in printed
    assert "OOD positive" in printed and "tables_openood.md" in printed
    with (output_dir / "regnet__openood-imagenet-test__openood.csv").open() as handle:
        assert list(csv.reader(handle)) == openood_tables(collect(openood_results, openood=True))[
            ("regnet", "openood-imagenet-test")]
    markdown = (output_dir / "regnet__openood-imagenet-test__openood.md").read_text()
    assert "| nnguide | Near-OOD | 50.00 | 85.00 | 75.00 | 92.00 | 86.10 |" in markdown
    assert (output_dir / "tables_openood.md").read_text().startswith("# regnet: ID openood-imagenet-test")
    assert not (output_dir / "tables.md").exists()


def test_aggregate_openood_without_openood_sets_is_an_error(tmp_path):
    write_openood_results(tmp_path / "paper", "regnet", "imagenet1k", {"nnguide": {"sun": (90.0, 30.0, 80.0, 80.0)}})
    with pytest.raises(UserError) as error:
        openood_tables(collect(tmp_path, openood=True))
    assert str(tmp_path / "paper") in str(error.value) and "openood-ninco" in str(error.value)  # where, the sets
    with pytest.raises(UserError) as error:
        collect(tmp_path / "paper" / "nothing", openood=True)
    assert "results_openood.csv" in str(error.value) and str(tmp_path / "paper" / "nothing") in str(error.value)


# ---- run.sh --openood -----------------------------------------------------------------------------------

def test_run_sh_openood_runs_the_experiment_once_per_model_then_its_tables(tmp_path):
    fake = fake_python(tmp_path)
    log = tmp_path / "calls.jsonl"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DETECTORS", "DATA_ROOT", "OUTPUT_ROOT", "ID_SETS")}
    environment.update(PYTHON=str(fake), FAKE_LOG=str(log), MODELS="resnet50-supcon vit-b16-swag-e2e-v1")
    completed = subprocess.run([str(REPO / "run.sh"), "--openood", "--data-root", "/data", "--", "--set",
                                "detectors.nnguide.k=100"], check=False, cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr

    def expected(model: str, detectors: list[str]) -> list[str]:
        return ["main.py", "--model", model, "--config", "configs/experiments/openood-v1.5-imagenet.yaml",
                "--detectors", *detectors, "--data-root", "/data",
                "--output-dir", str(tmp_path / "logs/openood" / model / "openood-v1.5-imagenet"),
                "--set", "detectors.nnguide.k=100"]

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [expected("resnet50-supcon", DEFAULT_DETECTORS),
                     expected("vit-b16-swag-e2e-v1", [*DEFAULT_DETECTORS, "nnguide-vim"])]
    assert "vit-b16-swag-e2e-v1: ID openood-imagenet-test" in completed.stdout
    assert (tmp_path / "logs/openood/resnet50-supcon__openood-imagenet-test__openood.md").exists()
    assert (tmp_path / "logs/openood/tables_openood.md").exists()
