"""main.py's command line as a new user meets it: the demo only when bare, defaults that match run.sh, a run's own
output folder, a --help that lists the names, and the provenance config.yaml records."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from errors import UserError
from pipeline.config.experiment import DEFAULT_DETECTORS, ResolvedExperiment, resolve_experiment
from pipeline.config.loading import available
from pipeline.run.experiment import ImageSets
from pipeline.run.provenance import environment, git_state
from pipeline.report.outputs import write_result
from tests.fake_results import fake_result

REPO = Path(__file__).resolve().parents[1]


def test_help_describes_every_flag_once_and_lists_the_registered_names():
    parser = main.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "default ~" not in text
    undescribed = [action.option_strings for action in parser._actions
                   if not action.help or action.help == argparse.SUPPRESS]
    assert undescribed == []
    assert re.search(r"With no arguments, `python main.py`\s+runs the offline demo", text)
    assert re.search(r"A --set value with commas\s+\(--set detectors.nnguide.k=1,10,100\) runs a sweep", text)
    flat = " ".join(text.split())
    for kind in ("models", "datasets", "detectors"):
        assert f"{kind} (configs/{kind}): {', '.join(available(kind))}" in flat
    assert "--model, --model_name, -m MODEL" in text  # aliases named once, before the value


# prints OPENBLAS_THREAD_TIMEOUT as it is when numpy is first imported, the moment OpenBLAS reads it
NUMPY_LOAD_WATCH = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            print("at numpy's load:", os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Watch())
import main
"""


@pytest.mark.parametrize("given, expected", [(None, "20"), ("24", "24")])
def test_main_sets_openblas_thread_timeout_before_numpy_loads_unless_the_user_did(given, expected):
    """OpenBLAS reads it once, at load: set later, its idle threads would spin and slow the search's top-k."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_THREAD_TIMEOUT"}
    env.update({"OPENBLAS_THREAD_TIMEOUT": given} if given else {})
    printed = subprocess.run([sys.executable, "-c", NUMPY_LOAD_WATCH], cwd=REPO, env=env, capture_output=True,
                             text=True, check=True).stdout
    assert printed.splitlines() == [f"at numpy's load: {expected}"]


@pytest.mark.parametrize("argv", [["--output-dir", "somewhere"], ["--data-root", "d", "--ood-data", "svhn"],
                                  ["--debug"]])
def test_flags_without_a_model_or_config_are_an_error_not_the_demo(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main.main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert "--model" in error and "--config" in error and "`python main.py`" in error  # the ways to start a run
    assert list(tmp_path.iterdir()) == []  # nothing ran: no logs/demo, no cache


def test_bare_command_line_is_the_demo():
    assert main.parse_args([]).config == main.DEMO_EXPERIMENT
    assert main.parse_args(["--model", "resnet50-supcon"]).config is None


def test_default_detectors_are_run_sh_s_and_fill_a_run_that_names_none():
    run_sh = (REPO / "run.sh").read_text()
    (default,) = re.findall(r'^DETECTORS="\$\{DETECTORS:-([^}]*)\}"$', run_sh, flags=re.MULTILINE)
    assert tuple(default.split()) == DEFAULT_DETECTORS
    resolved = resolve_experiment(None, {"model": "resnet50-supcon", "train_data": "imagenet1k",
                                         "id_data": "imagenet1k", "ood_data": ["inaturalist"]}, [])
    assert tuple(resolved.config.detectors) == tuple(resolved.detectors) == DEFAULT_DETECTORS


def test_a_run_without_output_dir_writes_to_its_own_folder(tmp_path):
    flags = {"model": "resnet50-supcon", "train_data": "imagenet1k", "id_data": "imagenet1k-v2-a",
             "ood_data": ["inaturalist"], "detectors": ["knn"]}
    assert resolve_experiment(None, flags, []).config.output_dir == "logs/resnet50-supcon/imagenet1k-v2-a"
    model_yaml = tmp_path / "my-model.yaml"
    model_yaml.write_text((REPO / "configs/models/resnet50-supcon.yaml").read_text())
    assert resolve_experiment(None, {**flags, "model": str(model_yaml)}, []).config.output_dir == \
        "logs/my-model/imagenet1k-v2-a"
    sweep = resolve_experiment(None, flags, ["detectors.knn.k=5"], default_subfolder="sweep-detectors.knn.k")
    assert sweep.config.output_dir == "logs/resnet50-supcon/imagenet1k-v2-a/sweep-detectors.knn.k"
    given = resolve_experiment(None, {**flags, "output_dir": "mine"}, [], default_subfolder="sweep-k")
    assert given.config.output_dir == "mine"


def rows(ood_sets: list[str]) -> list[dict]:
    return [{"model": "m", "train_data": "imagenet1k", "id_data": "imagenet1k", "ood_data": name, "detector": "knn",
             "auroc": 90.0, "fpr95": 30.0, "aupr_in": 80.0, "aupr_out": 70.0, "dtacc": 85.0, "id_acc": 75.0}
            for name in ood_sets]


def test_results_md_explains_avg_4_only_where_the_table_has_it(tmp_path):
    write_result(fake_result(rows(["inaturalist", "openimage-o"])), tmp_path / "two")
    write_result(fake_result(rows(["inaturalist", "sun", "places", "textures"])), tmp_path / "paper")
    two, paper = ((tmp_path / name / "results.md").read_text() for name in ("two", "paper"))
    assert "Avg-4" not in two and "Avg-all averages every OOD column." in two
    assert "Avg-4 (iNaturalist, SUN, Places, Textures) is the paper's Average" in paper and "| Avg-4 FPR95" in paper


def test_provenance_names_the_versions_faiss_and_the_commit():
    record = environment(torch.device("cpu"))
    assert set(record["versions"]) == {"python", "torch", "torchvision", "numpy", "scikit-learn", "scipy",
                                       "matplotlib"}
    assert record["versions"]["torch"] == torch.__version__ and all(record["versions"].values())
    assert record["device"] == "cpu" and "gpu" not in record and "cuda" not in record
    faiss = pytest.importorskip("faiss")
    assert record["faiss"]["version"] == faiss.__version__ and record["faiss"]["gpus"] >= 0


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout


def test_git_state_is_the_commit_and_whether_files_differ_from_it(tmp_path):
    assert git_state(tmp_path) is None  # not a checkout
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("logs/\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/results.csv").write_text("ignored outputs leave the checkout clean")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "new.yaml").write_text("an untracked config can change a run\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


def test_subsets_name_datasets_of_the_run_and_positive_counts():
    flags = {"model": "resnet50-supcon", "train_data": "cifar10", "id_data": "cifar10", "ood_data": ["svhn"],
             "detectors": ["knn"]}
    assert resolve_experiment(None, flags, ["subsets.svhn=500"]).config.subsets == {"svhn": 500}
    with pytest.raises(UserError) as misspelt:
        resolve_experiment(None, flags, ["subsets.svhm=500"])
    for value in ("'subsets'", "'svhm'", "'svhn'", "cifar10"):  # the key, the typo, the suggestion, a valid one
        assert value in str(misspelt.value)
    with pytest.raises(UserError) as zero:
        resolve_experiment(None, flags, ["subsets.svhn=0"])
    assert "'subsets.svhn'" in str(zero.value) and "got 0" in str(zero.value)
    with pytest.raises(UserError) as fraction:
        resolve_experiment(None, flags, ["subsets.svhn=0.5"])
    assert "'subsets'.svhn" in str(fraction.value) and "int" in str(fraction.value) and "0.5" in str(fraction.value)


def test_a_detector_given_plainly_and_with_options_is_refused_naming_both_places():
    """The later entry would silently replace the first: [knn, {knn: {k: 5}}] runs one knn, with k 5."""
    flags = {"model": "resnet50-supcon", "train_data": "imagenet1k", "id_data": "imagenet1k",
             "ood_data": ["inaturalist"], "detectors": ["knn", "energy", {"knn": {"k": 5}}]}
    with pytest.raises(UserError) as repeated:
        resolve_experiment(None, flags, [])
    assert all(value in str(repeated.value) for value in ("'detectors'", "'knn'", "items 1 and 3"))


def test_subset_seed_is_an_option_checked_like_the_bank_seed():
    flags = {"model": "resnet50-supcon", "train_data": "cifar10", "id_data": "cifar10", "ood_data": ["svhn"],
             "detectors": ["knn"]}
    assert resolve_experiment(None, flags, []).config.subset_seed == 0
    assert resolve_experiment(None, flags, ["subset_seed=7"]).config.subset_seed == 7
    for wrong in ("-1", str(2**32)):  # numpy's RandomState takes [0, 2**32)
        with pytest.raises(UserError) as out_of_range:
            resolve_experiment(None, flags, [f"subset_seed={wrong}"])
        assert "'subset_seed'" in str(out_of_range.value) and wrong in str(out_of_range.value)
    with pytest.raises(UserError) as fraction:
        resolve_experiment(None, flags, ["subset_seed=0.5"])
    assert "'subset_seed'" in str(fraction.value) and "0.5" in str(fraction.value)


def test_another_subset_seed_is_another_cache_entry_and_the_same_seed_finds_its_own(data_root, small_model_yaml,
                                                                                      tmp_path, caplog):
    """The subset seed reaches the cache key through the images: another seed keeps other images, so the image
    list's fingerprint (the key's "images": the ids in order) differs and the run extracts into a new entry; the
    same seed keeps the same images and finds its entry again, extracting nothing."""
    flags = {"model": str(small_model_yaml), "train_data": "imagenet1k", "id_data": "imagenet1k",
             "ood_data": ["textures"], "detectors": ["energy"], "data_root": str(data_root)}
    # textures: 2 classes of 5 test images; 4 keeps 2 of each class's 5, which the seed picks
    def image_sets(experiment: ResolvedExperiment) -> ImageSets:
        return ImageSets(experiment, experiment.model.transform.build())

    subsets = {seed: image_sets(resolve_experiment(None, flags, ["subsets.textures=4", f"subset_seed={seed}"]))
               .dataset("textures", "test") for seed in (0, 1)}
    assert len(subsets[0]) == len(subsets[1]) == 4 and subsets[0].image_ids != subsets[1].image_ids
    assert subsets[0].fingerprint() != subsets[1].fingerprint()

    def argv(seed: int) -> list[str]:
        return ["--model", str(small_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
                "--ood-data", "textures", "--detectors", "energy", "--data-root", str(data_root),
                "--output-dir", str(tmp_path / f"out-{seed}"), "--cache-dir", str(tmp_path / "cache"),
                "--device", "cpu", "--num-workers", "0", "--bank-ratio", "0.25", "--no-plots",
                "--set", "bootstrap=0", "--set", "subsets.textures=4", "--set", f"subset_seed={seed}"]

    def entries() -> list[str]:
        return sorted(path.name for path in (tmp_path / "cache").rglob("textures[[]4]-test-*") if path.is_dir())

    with caplog.at_level("INFO"):
        assert main.main(argv(0)) == 0
        (seed_0,) = entries()
        caplog.clear()
        assert main.main(argv(1)) == 0
        assert len(entries()) == 2 and seed_0 in entries()
        assert "extracting 4 of 4 images of textures[4]-test" in caplog.text
        caplog.clear()
        assert main.main(argv(0)) == 0  # seed 0 again: its entry, nothing extracted
    assert len(entries()) == 2
    assert "textures[4]-test: all 4 images' features are cached" in caplog.text
    assert "images of textures[4]" not in caplog.text
