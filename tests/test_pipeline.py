"""main.py end to end on generated data in the official layouts, with a random-initialised small CNN in SupCon's
checkpoint layout (conftest.py's small_model_yaml: its 128-d features keep the covariance detectors' fits fast;
the ResNet-50 SupCon checkpoint runs through main.py in test_reliability.py, test_bad_input.py and
test_cache_integrity.py)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main
from dataloaders import bank_indices, build_dataset, subset_indices
from errors import UserError
from models import build_backbone
from ood_evaluation.bootstrap import METRICS
from ood_evaluation.resampling import metrics_from_counts, sets_resample_counts
from ood_evaluation.metrics import ood_metrics
from pipeline.config.experiment import resolve_experiment
from pipeline.config.loading import load_dataset_config, load_model_config
from pipeline.report.scores import read_scores

REPO = Path(__file__).resolve().parents[1]
OOD_SETS = ["inaturalist", "textures", "cifar10", "svhn"]
DETECTORS = ["nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd"]
MODEL, FEATURE_DIM = "small-cnn-supcon", 128  # small_model_yaml's stem (the tables' model, the cache folder)
VIM_PRINCIPAL_DIM = "detectors.vim.principal_dim=16"  # the 24-image bank spans 23 directions: 500 would be arbitrary


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def with_detectors(argv: list[str], *detectors: str) -> list[str]:
    """`argv` with its --detectors list replaced (and ViM's override dropped with ViM): later runs need only
    the detectors their assertions read."""
    start = argv.index("--detectors") + 1
    argv = [*argv[:start], *detectors, *argv[start + len(DETECTORS):]]
    vim_override = argv.index(VIM_PRINCIPAL_DIM)
    return argv if "vim" in detectors else [*argv[:vim_override - 1], *argv[vim_override + 1:]]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The runs here forward a small CNN over 32x32 images in batches of 8: starting a second thread costs more
    than such calls compute, and on a busy machine each waits for that thread's turn on a core (about ten times
    slower). One thread, as figures/two_moons.py takes for its tiny matmuls; the number of threads changes no
    result these tests compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_run(data_root, small_model_yaml, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    argv = ["--model", str(small_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
            "--ood-data", *OOD_SETS, "--detectors", *DETECTORS, "--data-root", str(data_root),
            "--output-dir", str(work / "out"), "--cache-dir", str(work / "cache"), "--device", "cpu",
            "--batch-size", "8", "--num-workers", "0", "--bank-ratio", "0.5", "--set", "chunk_size=7",
            "--set", VIM_PRINCIPAL_DIM, "--no-plots"]  # nine detectors' plots take seconds: see the manifest's test
    assert main.main(argv) == 0
    return work, argv


def test_results_csv_has_one_row_per_ood_set_and_detector(first_run):
    work, _ = first_run
    rows = read_csv(work / "out/results.csv")
    assert list(rows[0]) == ["model", "train_data", "id_data", "ood_data", "detector", "auroc", "fpr95",
                             "aupr_in", "aupr_out", "dtacc", "id_acc", "checkpoint",
                             *[f"{metric}_ci_{end}" for metric in ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc")
                               for end in ("low", "high")]]
    assert [(row["ood_data"], row["detector"]) for row in rows] == \
        [(ood, det) for det in DETECTORS for ood in OOD_SETS]
    for row in rows:
        assert row["model"] == MODEL and row["train_data"] == "imagenet1k"
        assert row["checkpoint"].endswith(f"{MODEL}.pt")  # the model YAML's; --checkpoint names another
        for metric in ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc", "id_acc"):
            assert 0.0 <= float(row[metric]) <= 100.0
    assert (work / "out/results.md").read_text().count("\n| nnguide |") == 1
    config = yaml.safe_load((work / "out/config.yaml").read_text())
    assert config["bank_ratio"] == 0.5 and "skipped_files" in config["provenance"]
    assert config["provenance"]["versions"]["torch"] == torch.__version__ and "git" in config["provenance"]


def test_bank_is_the_official_seeded_sample_and_features_match_the_network(first_run, data_root, small_model_yaml):
    work, _ = first_run
    (bank_entry,) = (work / f"cache/{MODEL}").glob("imagenet1k-train-seed0-*")
    cached = np.concatenate([np.load(path) for path in sorted(bank_entry.glob("rows_*.npy"))])
    assert cached.shape == (24, FEATURE_DIM)  # int(48 * 0.5) rows, in chunks of 7
    np.random.seed(0)
    official = np.arange(48)
    np.random.shuffle(official)
    np.testing.assert_array_equal(bank_indices(48, 0.5, 0), official[:24])

    config = load_model_config(str(small_model_yaml))
    backbone = build_backbone(config, REPO / "pretrained_models")
    transform = config.transform.build()
    train_files = sorted((data_root / "imagenet1k/imagenet/train").glob("*/*"))
    for row in (0, 9, 23):
        with Image.open(train_files[official[row]]) as image:
            expected = backbone.features(transform(image.convert("RGB"))[None])[0]
        # batched and single-image convolutions differ in float rounding only
        np.testing.assert_allclose(cached[row], expected.detach().numpy(), rtol=1e-4, atol=1e-3)


def test_second_run_extracts_nothing_and_gives_identical_results(first_run, caplog):
    work, argv = first_run
    stored = {path: path.stat().st_mtime_ns for path in (work / "cache").rglob("rows_*.npy")}
    second_out = work / "again"
    argv = [*argv[:argv.index("--output-dir")], "--output-dir", str(second_out),
            *argv[argv.index("--output-dir") + 2:], "--no-plots"]  # plots read no cache and write no results.csv
    with caplog.at_level("INFO"):
        assert main.main(argv) == 0
    assert "extracting" not in caplog.text
    assert {path: path.stat().st_mtime_ns for path in (work / "cache").rglob("rows_*.npy")} == stored
    assert (second_out / "results.csv").read_bytes() == (work / "out/results.csv").read_bytes()


def test_larger_bank_extracts_only_the_new_images(first_run, caplog):
    """The 24-image bank's chunks of 7 end with a partial one, [21, 24): the 36-image bank keeps it up to a batch
    boundary of its chunk, [21, 28) in batches of 8, so its 3 rows are computed again in the batch a fresh
    extraction computes them in, with the 12 new images."""
    work, argv = first_run
    argv = [*with_detectors(argv, "knn"), "--bank-ratio", "0.75", "--output-dir", str(work / "bigger"), "--no-plots"]
    with caplog.at_level("INFO"):
        assert main.main(argv) == 0
    assert "extracting 15 of 36 images of imagenet1k-train-seed0" in caplog.text
    assert caplog.text.count("extracting") == 1


def test_official_flag_aliases(first_run, data_root, small_model_yaml):
    work, _ = first_run
    argv = ["-m", str(small_model_yaml), "-td", "imagenet1k", "-id", "imagenet1k", "-ood", *OOD_SETS,
            "--ood_detectors", "nnguide", "energy", "--data_root_path", str(data_root), "-bs", "8", "-nw", "0",
            "--output-dir", str(work / "aliases"), "--cache-dir", str(work / "cache"), "--device", "cpu",
            "--bank-ratio", "0.5", "--set", "chunk_size=7", "--no-plots"]
    assert main.main(argv) == 0
    first = [row for row in read_csv(work / "out/results.csv") if row["detector"] in ("nnguide", "energy")]
    assert read_csv(work / "aliases/results.csv") == first and len(first) == 2 * len(OOD_SETS)


def test_detector_hyper_parameter_override(first_run):
    work, argv = first_run
    assert main.main([*with_detectors(argv, "nnguide"), "--set", "detectors.nnguide.k=3", "--output-dir",
                      str(work / "k3"), "--no-plots"]) == 0
    k3 = {row["ood_data"]: row for row in read_csv(work / "k3/results.csv") if row["detector"] == "nnguide"}
    k10 = {row["ood_data"]: row for row in read_csv(work / "out/results.csv") if row["detector"] == "nnguide"}
    assert any(k3[name]["auroc"] != k10[name]["auroc"] for name in OOD_SETS)
    assert "k: 3" in (work / "k3/config.yaml").read_text()


def test_datasets_given_as_yaml_paths_are_cached_under_the_cache_dir_and_named_by_their_stem(first_run, tmp_path,
                                                                                              caplog):
    work, argv = first_run
    configs = tmp_path / "my-configs"
    configs.mkdir()
    inaturalist, imagenet_again = configs / "my-inat.yaml", configs / "imagenet-again.yaml"
    inaturalist.write_text((REPO / "configs/datasets/inaturalist.yaml").read_text())
    imagenet_again.write_text((REPO / "configs/datasets/imagenet1k.yaml").read_text())  # the ID set once more
    ood = argv.index("--ood-data")
    argv = [*argv[:ood + 1], str(inaturalist), str(imagenet_again), *argv[ood + 1 + len(OOD_SETS):],
            "--output-dir", str(work / "yaml-paths"), "--no-plots"]
    argv = with_detectors(argv, "energy")
    with caplog.at_level("INFO"):
        assert main.main(argv) == 0
    assert sorted(configs.iterdir()) == [imagenet_again, inaturalist]  # nothing written beside the YAML files
    assert list((work / f"cache/{MODEL}").glob("my-inat-test-*"))
    assert {row["ood_data"] for row in read_csv(work / "yaml-paths/results.csv")} == {"my-inat", "imagenet-again"}
    assert str(configs) not in (work / "yaml-paths/results.md").read_text()
    assert "OOD set 'imagenet-again' holds the same images as the ID set 'imagenet1k'" in caplog.text
    assert "OOD set 'my-inat'" not in caplog.text


@pytest.fixture(scope="module", autouse=True)
def user_error_run(request, tmp_path_factory):
    """`python main.py --config <a YAML with a misspelt key>` in a fresh interpreter (several seconds of imports),
    started as this module starts when test_user_errors_are_one_line_with_exit_code_2 is selected: it runs beside
    the tests before it, and that test (last in the module) waits for it."""
    if not any(item.name == "test_user_errors_are_one_line_with_exit_code_2"
               and getattr(item, "module", None) is request.module for item in request.session.items):
        yield None
        return
    bad_yaml = tmp_path_factory.mktemp("user-error") / "bad.yaml"
    bad_yaml.write_text("model: resnet50-supcon\nbank_ratoi: 0.1\n")
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(bad_yaml)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    yield bad_yaml, process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("experiment", sorted((REPO / "configs/experiments").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_every_shipped_experiment_resolves(experiment):
    """Every model, dataset and detector an experiment YAML names exists, with valid hyper-parameters."""
    resolved = resolve_experiment(experiment, {}, [])
    assert resolved.config.ood_data and list(resolved.detectors) == list(resolved.config.detectors)
    assert set(resolved.datasets) == {resolved.config.train_data, resolved.config.id_data, *resolved.config.ood_data}


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "resnet50-supcom"], "unknown model 'resnet50-supcom' (did you mean 'resnet50-supcon'?)"),
    (["--ood-data", "inaturalst"], "unknown dataset 'inaturalst' (did you mean 'inaturalist'?)"),
    (["--detectors", "nnguid"], "unknown detector 'nnguid' (did you mean 'nnguide'?)"),
    (["--bank-ratio", "1.5"], "config key 'bank_ratio' must be in (0, 1], got 1.5"),
    (["--batch-size", "0"], "config key 'batch_size' must be a positive integer, got 0"),
    (["--set", "seed=zero"], "key 'seed' must be int, got 'zero'"),
    (["--set", "detectors.nnguide.kk=3"], "detector 'nnguide' has no hyper-parameter 'kk' (did you mean 'k'?)"),
    (["--set", "bank_ration=0.1"], "unknown key 'bank_ration' (did you mean 'bank_ratio'?)"),
])
def test_config_mistakes_name_the_key_and_the_closest_valid_one(args, message, tmp_path, data_root, capsys):
    defaults = {"--model": "resnet50-supcon", "--train-data": "imagenet1k", "--id-data": "imagenet1k",
                "--ood-data": "inaturalist", "--detectors": "nnguide"}
    argv = [item for flag, value in defaults.items() if flag not in args for item in (flag, value)]
    argv += [*args, "--data-root", str(data_root), "--output-dir", str(tmp_path / "out"),
             "--pretrained-dir", str(tmp_path / "no-weights"), "--device", "cpu"]
    assert main.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_the_output_folder_holds_one_runs_tables_and_plots_listed_in_its_manifest(first_run):
    """The first run's folder (no plots), then a run with plots: one detector's, drawn in a fraction of the time
    of the first run's nine (tests/test_plots.py draws many detectors' figures)."""
    work, argv = first_run
    assert main.main([*with_detectors(argv, "energy"), "--plots", "--output-dir", str(work / "plotted")]) == 0
    plots = [f"{kind}_{name}.png" for name in OOD_SETS for kind in ("scores", "roc")]
    for out, expected in ((work / "out", []), (work / "plotted", plots)):
        manifest = json.loads((out / "results-manifest.json").read_text())
        assert manifest["complete"] is True
        assert set(manifest["files"]) >= {"results.csv", "results.md", "config.yaml", *expected}
        assert not [name for name in manifest["files"] if name.endswith(".png") and name not in expected]
        visible = {path.name for path in out.iterdir() if not path.name.startswith(".")}
        assert visible == {*manifest["files"], "results-manifest.json"}


def cached_rows(entry: Path) -> np.ndarray:
    return np.concatenate([np.load(path) for path in sorted(entry.glob("rows_*.npy"))])


def cache_entry(cache: Path, pattern: str) -> Path:
    """The one cache entry matching `pattern`."""
    (entry,) = cache.glob(pattern)
    return entry


def test_subsets_are_stratified_marked_in_every_output_and_are_the_full_sets_rows(first_run, data_root, caplog):
    """A debug run on subsets: the names carry the size (imagenet1k[8]) in the tables and the cache, results.md
    and the terminal say so, and the subset's features are the full set's features of the same images."""
    work, argv = first_run
    argv = [*with_detectors(argv, "nnguide"), "--set", "detectors.nnguide.k=2", "--set", "subsets.imagenet1k=8",
            "--set", "subsets.textures=4", "--set", "subsets.svhn=500", "--output-dir", str(work / "subset"),
            "--no-plots"]
    with caplog.at_level("INFO"):
        assert main.main(argv) == 0
    assert "subsets.svhn=500 is not below the 9 images of svhn's test split" in caplog.text  # the whole set, said
    rows = read_csv(work / "subset/results.csv")
    assert {(row["train_data"], row["id_data"]) for row in rows} == {("imagenet1k[8]", "imagenet1k[8]")}
    assert [row["ood_data"] for row in rows] == ["inaturalist", "textures[4]", "cifar10", "svhn"]
    notes = ["imagenet1k train: 8 of 48 images", "imagenet1k test: 8 of 20 images", "textures test: 4 of 10 images"]
    assert f"**Subsets, not the full sets (a debug run; seeded, stratified by class): {'; '.join(notes)}.**" in \
        (work / "subset/results.md").read_text()
    config = yaml.safe_load((work / "subset/config.yaml").read_text())
    assert config["subsets"] == {"imagenet1k": 8, "textures": 4, "svhn": 500}
    assert config["provenance"]["subsets"] == notes
    assert "extracting 4 of 4 images of imagenet1k[8]-train-seed0" in caplog.text  # bank_ratio 0.5 of the 8

    test_split = build_dataset(load_dataset_config("imagenet1k"), "test", data_root, transform=None)
    chosen = subset_indices(test_split.labels, 8)
    assert np.bincount(test_split.labels[chosen]).tolist() == [2, 2, 2, 2]  # 4 classes of 5: stratified
    cache = work / f"cache/{MODEL}"
    full_entry, subset_entry = (cache_entry(cache, pattern) for pattern in ("imagenet1k-test-*",
                                                                                   "imagenet1k[[]8]-test-*"))
    # batched convolutions differ in float rounding only
    np.testing.assert_allclose(cached_rows(subset_entry), cached_rows(full_entry)[chosen], rtol=1e-4, atol=1e-3)


def test_bank_in_list_order_is_the_first_images_of_the_train_split(first_run, data_root, small_model_yaml, caplog):
    """bank_order: list (OpenOOD's NNGuide bank on CIFAR, the first images of its unshuffled train list): the bank
    is the split's first int(N * bank_ratio) images, each forwarded in its own entry (none taken from the seeded
    bank's), and equal to the network's features of those images."""
    work, argv = first_run
    cache = work / f"cache/{MODEL}"
    argv = [*with_detectors(argv, "nnguide"), "--set", "detectors.nnguide.k=2", "--set", "bank_order=list",
            "--bank-ratio", "0.25", "--output-dir", str(work / "list-order"), "--no-plots"]
    with caplog.at_level("INFO"):
        assert main.main(argv) == 0
    assert "extracting 12 of 12 images of imagenet1k-train-in-order" in caplog.text
    listed = cached_rows(cache_entry(cache, "imagenet1k-train-in-order-*"))
    assert listed.shape == (12, FEATURE_DIM)
    config = load_model_config(str(small_model_yaml))
    backbone = build_backbone(config, REPO / "pretrained_models")
    train_files = sorted((data_root / "imagenet1k/imagenet/train").glob("*/*"))[:12]
    images = []
    for path in train_files:
        with Image.open(path) as image:
            images.append(config.transform.build()(image.convert("RGB")))
    expected = backbone.features(torch.stack(images)).detach().numpy()
    np.testing.assert_allclose(listed, expected, rtol=1e-4, atol=1e-3)


def test_scores_npz_holds_every_images_score_with_its_id_and_gives_the_tables_metrics(first_run, data_root):
    """The per-image scores stored with a run: arrays only, aligned with the image ids, and the metrics in
    results.csv are ood_metrics of exactly these scores."""
    work, _ = first_run
    stored = read_scores(work / "out")
    assert stored.id_set == "imagenet1k" and stored.detectors == DETECTORS and stored.ood_sets == OOD_SETS
    test_split = build_dataset(load_dataset_config("imagenet1k"), "test", data_root, transform=None)
    assert stored.image_ids["imagenet1k"].tolist() == test_split.image_ids
    assert stored.image_ids["svhn"].tolist() == [f"test_32x32.mat#{row}" for row in range(9)]
    for row in read_csv(work / "out/results.csv"):
        metrics = ood_metrics(stored.scores["imagenet1k"][row["detector"]],
                              stored.scores[row["ood_data"]][row["detector"]])
        assert float(row["auroc"]) == 100 * metrics["auroc"] and float(row["fpr95"]) == 100 * metrics["fpr95"]
    with np.load(work / "out/scores.npz", allow_pickle=False) as arrays:  # no object arrays anywhere
        assert all(arrays[key].dtype != object for key in arrays.files)


def test_reading_scores_of_a_folder_without_them_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"scores.npz does not exist: is .* a run's output folder"):
        read_scores(tmp_path)
    (tmp_path / "scores.npz").write_text("not numpy")
    with pytest.raises(UserError, match=r"scores.npz is not a scores file of this repository"):
        read_scores(tmp_path)


@pytest.mark.slow  # three pipeline runs, two new banks
def test_a_bank_seed_sweep_summarises_each_numbers_spread_over_the_draws(first_run, caplog):
    work, argv = first_run
    argv = [*with_detectors(argv, "nnguide", "energy"), "--set", "detectors.nnguide.k=2", "--set", "seed=0,1,2",
            "--output-dir", str(work / "seeds"), "--no-plots"]
    with caplog.at_level("INFO"):
        assert main.main(argv) == 0
    # seed 0's bank is cached by the first run; the other seeds' banks are extracted in their own entries
    assert re.findall(r"extracting (\d+) of 24 images of imagenet1k-train-seed(\d)", caplog.text) == [("24", "1"),
                                                                                                      ("24", "2")]
    runs = {seed: {(row["ood_data"], row["detector"]): row for row in read_csv(work / f"seeds/seed={seed}/results.csv")}
            for seed in ("0", "1", "2")}
    summary = read_csv(work / "seeds/seed-summary.csv")
    assert [(row["ood_data"], row["detector"]) for row in summary] == list(runs["0"])
    for row in summary:
        for metric in ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc"):
            values = [float(runs[seed][row["ood_data"], row["detector"]][metric]) for seed in runs]
            assert [float(row[f"{metric}_{name}"]) for name in ("mean", "std", "min", "max")] == pytest.approx(
                [np.mean(values), np.std(values), min(values), max(values)], abs=1e-12)
        assert row["seeds"] == "3"
    nnguide_aurocs = [float(runs[seed]["textures", "nnguide"]["auroc"]) for seed in runs]
    assert len(set(nnguide_aurocs)) > 1  # the draws differ, so the spread is not trivially zero
    energy = [row for row in summary if row["detector"] == "energy"]
    assert all(float(row["auroc_std"]) == 0 for row in energy)  # energy reads no bank: the same for every seed
    summary_md = (work / "seeds/seed-summary.md").read_text()
    assert "| textures | nnguide |" in summary_md
    assert summary_md.rstrip().splitlines()[-1].startswith("mean ± population standard deviation [min, max] over "
                                                           "the bank seeds 0, 1, 2")
    sweep_md = (work / "seeds/sweep.md").read_text()  # the runs' own intervals: brackets, said under the table
    assert "±" not in sweep_md and sweep_md.rstrip().splitlines()[-1].startswith("[low, high]: the 95% percentile")
    assert re.search(r"\| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] \|", sweep_md)


def test_every_metric_has_its_bootstrap_interval_from_the_stored_scores(first_run):
    """results.csv's intervals and averages.csv's are the percentiles of one set of resamples per detector of the
    run's own scores (1000, seed 0, 95%): each resample draws the ID images once and each OOD set apart, and an
    average averages its sets' metrics within each resample. Restated here from the resamples' counts with
    metrics_from_counts, checked against scikit-learn one resample at a time (NNGuide's first 20). results.md
    shows each cell, the average's too, as value [low, high]."""
    work, _ = first_run
    stored = read_scores(work / "out")
    rows = {(row["detector"], row["ood_data"]): row for row in read_csv(work / "out/results.csv")}
    averages = read_csv(work / "out/averages.csv")
    assert [(row["detector"], row["average"], row["ood_sets"]) for row in averages] == [
        (detector, "Avg-all", ";".join(OOD_SETS)) for detector in DETECTORS]  # no Avg-4: no SUN, no Places
    id_size = stored.scores["imagenet1k"]["nnguide"].size
    id_counts, ood_counts = sets_resample_counts(id_size, [stored.scores[name]["nnguide"].size for name in OOD_SETS],
                                                 1000, 0)
    for detector, average in zip(DETECTORS, averages):
        id_scores = stored.scores["imagenet1k"][detector]
        resampled = np.stack([metrics_from_counts(id_scores, stored.scores[name][detector], id_counts, counts)
                              for name, counts in zip(OOD_SETS, ood_counts)], axis=1)     # (1000, sets, metrics)
        if detector == "nnguide":  # the first 20 resamples (scikit-learn takes milliseconds a call)
            restated = np.array([[[ood_metrics(np.repeat(id_scores, id_counts[draw]),
                                               np.repeat(stored.scores[name][detector], counts[draw]))[metric]
                                   for metric in METRICS] for name, counts in zip(OOD_SETS, ood_counts)]
                                 for draw in range(20)])
            np.testing.assert_allclose(resampled[:20], restated, rtol=0, atol=1e-9)
        for row, sets in [*[(rows[detector, name], [index]) for index, name in enumerate(OOD_SETS)],
                          (average, list(range(len(OOD_SETS))))]:
            low, high = np.percentile(resampled[:, sets].mean(axis=1), [2.5, 97.5], axis=0)
            for column, metric in enumerate(METRICS):
                if f"{metric}_ci_low" in row:  # results.csv has no interval for fpr95_ood_positive
                    assert (float(row[f"{metric}_ci_low"]), float(row[f"{metric}_ci_high"])) == pytest.approx(
                        (100 * low[column], 100 * high[column]), abs=1e-7), (detector, row.get("ood_data"), metric)
        assert float(average["auroc"]) == pytest.approx(np.mean([float(rows[detector, name]["auroc"])
                                                                 for name in OOD_SETS]), abs=1e-12)
    markdown = (work / "out/results.md").read_text()
    for row in (rows["nnguide", "inaturalist"], averages[0]):
        low, high = float(row["auroc_ci_low"]), float(row["auroc_ci_high"])
        assert f"| {float(row['auroc']):.2f} [{low:.2f}, {high:.2f}] |" in markdown
    assert "±" not in markdown and markdown.rstrip().splitlines()[-1].startswith("[low, high]: the 95% percentile")


@pytest.mark.slow  # `python main.py` in a fresh interpreter (user_error_run): its import-time output is checked too
def test_user_errors_are_one_line_with_exit_code_2(user_error_run):
    bad_yaml, process = user_error_run
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        f"error: {bad_yaml} + command line: unknown key 'bank_ratoi' (did you mean 'bank_ratio'?); "
        "valid keys: " + stderr.split("valid keys: ")[1].strip()]
    assert "Traceback" not in stderr


def test_the_python_api_returns_what_the_files_hold(first_run, data_root, small_model_yaml, tmp_path):
    """resolve_experiment + run_experiment return the typed result of the command line's run, with nothing
    written; write_result writes from it the same results.csv, byte for byte, and the same scores.npz."""
    from pipeline.api import ExperimentResult, resolve_experiment, run_experiment, write_result
    work, _ = first_run
    flags = {"model": str(small_model_yaml), "train_data": "imagenet1k", "id_data": "imagenet1k",
             "ood_data": OOD_SETS, "detectors": DETECTORS, "data_root": str(data_root),
             "output_dir": str(tmp_path / "api"), "cache_dir": str(work / "cache"), "device": "cpu",
             "batch_size": 8, "num_workers": 0, "bank_ratio": 0.5, "plots": False}
    result = run_experiment(resolve_experiment(None, flags, ["chunk_size=7", VIM_PRINCIPAL_DIM]))
    assert isinstance(result, ExperimentResult) and not (tmp_path / "api").exists()
    written = {(row["ood_data"], row["detector"]): row for row in read_csv(work / "out/results.csv")}
    assert [(row.ood_data, row.detector) for row in result.rows] == list(written)
    for row in result.rows:
        fields = written[row.ood_data, row.detector]
        assert {metric: float(fields[metric]) for metric in ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc")} \
            == {metric: row.metrics[metric] for metric in ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc")}
        assert (float(fields["auroc_ci_low"]), float(fields["auroc_ci_high"])) == row.intervals["auroc"]
        assert float(fields["id_acc"]) == row.id_acc == result.id_accuracy
    stored = read_scores(work / "out")
    assert result.scores.id_set == stored.id_set == "imagenet1k" and result.scores.detectors == DETECTORS
    for name in [stored.id_set, *OOD_SETS]:
        assert result.scores.image_ids[name].tolist() == stored.image_ids[name].tolist()
        for detector in DETECTORS:
            np.testing.assert_array_equal(result.scores.scores[name][detector], stored.scores[name][detector])
    write_result(result)
    assert (tmp_path / "api/results.csv").read_bytes() == (work / "out/results.csv").read_bytes()
    assert (tmp_path / "api/averages.csv").read_bytes() == (work / "out/averages.csv").read_bytes()


def test_aggregating_the_default_layout_after_a_sweep_leaves_the_sweeps_runs_out(first_run, tmp_path, monkeypatch,
                                                                                 capsys):
    """A sweep's folders sit inside its run's folder (logs/<model>/<ID set>/sweep-<key>/<key>=<value>/): the
    aggregation of logs/ tabulates the run and says which sweeps it left out; a sweep's table is its sweep.md."""
    from pipeline.tools.aggregate import main as aggregate_main
    work, argv = first_run
    output = argv.index("--output-dir")
    argv = with_detectors([*argv[:output], *argv[output + 2:]], "nnguide", "energy")
    monkeypatch.chdir(tmp_path)
    assert main.main(argv) == 0
    assert main.main([*argv, "--set", "detectors.nnguide.k=1,2"]) == 0
    run = Path("logs") / MODEL / "imagenet1k"
    assert (run / "results.csv").is_file()
    assert (run / "sweep-detectors.nnguide.k/detectors.nnguide.k=2/results.csv").is_file()
    capsys.readouterr()
    assert aggregate_main(["logs"]) == 0
    printed = capsys.readouterr().out
    assert "left out the runs of 1 sweep(s)" in printed and str(run / "sweep-detectors.nnguide.k") in printed
    header, *lines = list(csv.reader((Path("logs") / f"{MODEL}__imagenet1k.csv").open()))
    written = {(row["detector"], row["ood_data"]): row for row in read_csv(run / "results.csv")}
    for line in lines:
        for column, value in zip(header[1:2 * len(OOD_SETS) + 1], line[1:2 * len(OOD_SETS) + 1]):
            ood_data, metric = column.rsplit(" ", 1)
            assert value == f"{float(written[line[0], ood_data][metric.lower()]):.2f}"
    assert aggregate_main([str(run / "sweep-detectors.nnguide.k")]) == 2  # only a sweep: its table is sweep.md
    assert "sweep.md" in capsys.readouterr().err


def test_the_output_folder_belongs_to_the_user(first_run, data_root, tmp_path, capsys):
    """A run replaces and deletes only files a run of ours wrote there as they are now: a hand-written config.yaml
    beside results, an edited result file and a folder in a file's place are each refused, naming them, with
    nothing touched; a folder inside the cache or inside an image set the run reads is refused before any work."""
    work, argv = first_run
    output = argv.index("--output-dir")

    def run_into(folder: Path, *extra: str) -> tuple[int, str]:
        changed = [*argv]
        changed[output + 1] = str(folder)
        code = main.main([*with_detectors(changed, "energy"), *extra])
        return code, capsys.readouterr().err

    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my experiment, with comments\nseed: 0\n")
    code, error = run_into(mine)
    assert code == 2 and error.count("\n") == 1 and "config.yaml" in error and str(mine) in error
    assert (mine / "config.yaml").read_text() == "# my experiment, with comments\nseed: 0\n"
    assert sorted(path.name for path in mine.iterdir()) == ["config.yaml"]

    ours = tmp_path / "ours"
    assert run_into(ours)[0] == 0
    (ours / "notes.txt").write_text("mine")
    assert run_into(ours)[0] == 0 and (ours / "notes.txt").read_text() == "mine"  # never listed: left alone
    (ours / "results.md").write_text((ours / "results.md").read_text() + "\nmy remark\n")
    code, error = run_into(ours)
    assert code == 2 and "results.md" in error and "my remark" in (ours / "results.md").read_text()
    (ours / "results.md").unlink()
    (ours / "results.csv").unlink()
    (ours / "results.csv").mkdir()
    code, error = run_into(ours)
    assert code == 2 and "results.csv/" in error and error.count("\n") == 1

    for inside in (work / "cache" / "out", data_root / "inaturalist/iNaturalist/images/out"):
        code, error = run_into(inside)
        assert code == 2 and str(inside) in error and not inside.exists()


def test_the_same_command_gives_the_same_files_on_an_empty_and_on_a_warm_cache(first_run, tmp_path, monkeypatch):
    """A 36-image bank on an empty cache, and after runs that left a 24-image bank of the same seed, another seed's
    bank and other OOD sets in the cache: the same scores and the same result files, byte for byte. The network
    is made batch-sensitive (each feature moves by a thousandth of its batch's mean), as real kernels can be, so a
    row computed in another batch than a fresh extraction's would show."""
    from models import Backbone
    from pipeline.report.scores import read_scores
    features = Backbone.features
    monkeypatch.setattr(Backbone, "features", lambda self, images: (lambda raw: raw + 1e-3 * raw.mean(
        dim=0, keepdim=True))(features(self, images)))
    _, argv = first_run
    cache, output = argv.index("--cache-dir"), argv.index("--output-dir")

    def run(cache_dir: Path, out: Path, *extra: str) -> None:
        changed = [*argv]
        changed[cache + 1], changed[output + 1] = str(cache_dir), str(out)
        assert main.main([*with_detectors(changed, "nnguide", "knn", "energy"), *extra]) == 0

    run(tmp_path / "empty", tmp_path / "cold", "--bank-ratio", "0.75")
    run(tmp_path / "warm", tmp_path / "before-1", "--bank-ratio", "0.5")
    run(tmp_path / "warm", tmp_path / "before-2", "--seed", "1", "--ood-data", "cifar10", "textures")
    run(tmp_path / "warm", tmp_path / "warm-run", "--bank-ratio", "0.75")
    cold, warm = read_scores(tmp_path / "cold"), read_scores(tmp_path / "warm-run")
    for name in cold.scores:
        for detector in ("nnguide", "knn"):
            np.testing.assert_array_equal(warm.scores[name][detector], cold.scores[name][detector])
    for name in ("results.csv", "results_openood.csv", "averages.csv", "results.md"):
        assert (tmp_path / "warm-run" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes(), name
