"""Every kind of bad input, through main.py as a subprocess: exit code 2 and one `error: ...` line saying what to fix.

Complements the subprocess cases already in test_reliability.py (missing data root, unwritable output folder,
YAML syntax error, missing checkpoint, undecodable image) and test_pipeline.py (unknown config key). Each case
builds its bad input under its own folder; the runs go side by side, each forked from an interpreter that has
imported main's modules once (tests/main_process.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from tests.datagen import write_class_folders, write_flat_folder
from tests.main_process import start_main

REPO = Path(__file__).resolve().parents[1]


def valid_names(kind: str) -> list[str]:
    return sorted(path.stem for path in (REPO / "configs" / kind).glob("*.yaml"))


@dataclass(frozen=True)
class Inputs:
    """What a case builds on: its own empty folder, the shared data root and the tiny SupCon model config; and
    the small CNN's config (conftest.py), for the data cases: they fail after the model is loaded but before
    any image is read, and loading it takes milliseconds where the ResNet-50 takes a quarter of a second."""

    work: Path
    data_root: Path
    model_yaml: Path
    small_model_yaml: Path

    def model_with_checkpoint(self, checkpoint: Path) -> Path:
        """A copy of the tiny model config that loads `checkpoint`."""
        config = yaml.safe_load(self.model_yaml.read_text())
        path = self.work / "model.yaml"
        path.write_text(yaml.safe_dump({**config, "checkpoint": str(checkpoint)}))
        return path

    def edited_supcon_checkpoint(self, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
        """The tiny model's random SupCon checkpoint, saved again with `edit` applied to its model_state_dict."""
        source = yaml.safe_load(self.model_yaml.read_text())["checkpoint"]
        checkpoint = torch.load(source, weights_only=False)  # our own file: it holds an argparse.Namespace
        edit(checkpoint["model_state_dict"])
        path = self.work / "edited.pt"
        torch.save(checkpoint, path)
        return path

    def small_data_root(self) -> Path:
        """4 bank images, 4 ImageNet val images, 4 iNaturalist images plus 2 non-image files."""
        root = self.work / "datasets"
        write_class_folders(root / "imagenet1k/imagenet/train", ["n01", "n02"], per_class=2, seed=1)
        write_class_folders(root / "imagenet1k/imagenet/val", ["n01", "n02"], per_class=2, seed=2)
        write_flat_folder(root / "inaturalist/iNaturalist/images", count=4, seed=3)
        return root

    def data_root_without_inaturalist(self) -> Path:
        root = self.work / "datasets"
        root.mkdir()
        (root / "imagenet1k").symlink_to(self.data_root / "imagenet1k")
        return root


@dataclass(frozen=True)
class Case:
    """build(inputs) -> (flags replacing or adding to the base command, fragments the error line must hold)."""

    build: Callable[[Inputs], tuple[list[str], list[str]]]
    logged: Callable[[Inputs], list[str]] = lambda inputs: []  # lines before the error (log) must hold these
    quiet: bool = True  # fails before anything is logged: stderr is the error line alone
    marks: list = field(default_factory=list)


def missing_dataset_folder(inputs: Inputs) -> tuple[list[str], list[str]]:
    root = inputs.data_root_without_inaturalist()
    return (["--data-root", str(root), "--model", str(inputs.small_model_yaml)],
            [str(root / "inaturalist/iNaturalist/images"), "does not exist"])


def dataset_folder_without_images(inputs: Inputs) -> tuple[list[str], list[str]]:
    root = inputs.data_root_without_inaturalist()
    write_flat_folder(root / "inaturalist/iNaturalist/images", count=0)  # only a text file and a fake .jpg
    return (["--data-root", str(root), "--model", str(inputs.small_model_yaml)],
            [str(root / "inaturalist/iNaturalist/images"), "no images"])


def unwritable_cache_directory(inputs: Inputs) -> tuple[list[str], list[str]]:
    (inputs.work / "a-file").write_text("")  # a folder under a file: unwritable even for root, unlike chmod
    cache = inputs.work / "a-file" / "cache"
    return ["--cache-dir", str(cache)], ["--cache-dir", str(cache)]


def wrong_type_in_experiment_yaml(inputs: Inputs) -> tuple[list[str], list[str]]:
    experiment = inputs.work / "experiment.yaml"
    experiment.write_text("chunk_size: 10000\nseed: zero\n")
    return ["--config", str(experiment)], [str(experiment), "'seed'", "int", "'zero'"]


def repeated_key_in_experiment_yaml(inputs: Inputs) -> tuple[list[str], list[str]]:
    experiment = inputs.work / "experiment.yaml"
    experiment.write_text("seed: 0\nchunk_size: 10000\nseed: 1\n")  # the later key would silently win
    return ["--config", str(experiment)], [f"{experiment}:3", "'seed'", "lines 1 and 3"]


def alias_in_experiment_yaml(inputs: Inputs) -> tuple[list[str], list[str]]:
    experiment = inputs.work / "experiment.yaml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                                                       for i in range(1, 9)]  # 9**9 strings, were it expanded
    experiment.write_text("\n".join(levels) + "\nsubsets: {bomb: *a8}\n")
    return ["--config", str(experiment)], [f"{experiment}:2", "*a0", "aliases"]


def not_a_checkpoint(inputs: Inputs) -> tuple[list[str], list[str]]:
    weights = inputs.work / "resnet50-supcon.pt"
    weights.write_text("<html><body>Sign in to download this file</body></html>\n")  # a saved login page
    return ["--model", str(inputs.model_with_checkpoint(weights))], [str(weights), "not a PyTorch checkpoint"]


def checkpoint_with_wrong_keys(inputs: Inputs) -> tuple[list[str], list[str]]:
    weights = inputs.work / "wrong-keys.pt"
    with torch.device("meta"):  # the names only: no random initialisation
        resnet50_keys = [key for key in torchvision.models.resnet50().state_dict()
                         if not key.endswith("num_batches_tracked")]
    torch.save({"model_state_dict": {"encoder.conv1.weight": torch.zeros(64, 3, 3, 3),  # 7x7 in a ResNet-50
                                     "encoder.layer5.0.conv1.weight": torch.zeros(1)}}, weights)
    return ["--model", str(inputs.model_with_checkpoint(weights))], [
        str(weights), "'resnet50'",
        f"{len(resnet50_keys) - 1} missing", "bn1.weight", "bn1.bias", "bn1.running_mean",
        "1 unexpected", "layer5.0.conv1.weight",
        "1 mis-shaped", "conv1.weight (64, 3, 3, 3)", "(64, 3, 7, 7)"]


def nan_features(inputs: Inputs) -> tuple[list[str], list[str]]:
    def negative_variance(state: dict[str, torch.Tensor]) -> None:
        state["encoder.bn1.running_var"][0] = -1.0  # sqrt(-1): NaN in the stem, then in every feature
    model = inputs.model_with_checkpoint(inputs.edited_supcon_checkpoint(negative_variance))
    return (["--model", str(model), "--data-root", str(inputs.small_data_root()), "--bank-ratio", "1.0"],
            ["imagenet1k bank", "4 of 4", "feature"])


def inf_logits(inputs: Inputs) -> tuple[list[str], list[str]]:
    def infinite_weight(state: dict[str, torch.Tensor]) -> None:
        state["fc.weight"][0, 0] = float("inf")  # finite features, non-finite logits for class 0
    model = inputs.model_with_checkpoint(inputs.edited_supcon_checkpoint(infinite_weight))
    return (["--model", str(model), "--data-root", str(inputs.small_data_root()), "--bank-ratio", "1.0"],
            ["imagenet1k bank", "4 of 4", "logits"])


def config_that_is_a_folder(inputs: Inputs) -> tuple[list[str], list[str]]:
    return ["--config", str(inputs.work)], [str(inputs.work), "is a folder"]  # the path itself holds "folder"


def config_that_is_binary(inputs: Inputs) -> tuple[list[str], list[str]]:
    weights = inputs.work / "experiment.yaml"
    weights.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xb7\xac\xce\xe8")  # a zip, given by mistake
    return ["--config", str(weights)], [str(weights), "UTF-8"]


def misspelt_dataset_option(inputs: Inputs) -> tuple[list[str], list[str]]:
    dataset = inputs.work / "my-ood.yaml"
    dataset.write_text("format: flat_folder\nsplits: {test: inaturalist/iNaturalist/images}\n"
                       "options: {membrship: paper}\n")
    return ["--ood-data", str(dataset)], [str(dataset), "'my-ood'", "'flat_folder'", "'membrship'", "'membership'"]


def transform_crop_zero(inputs: Inputs) -> tuple[list[str], list[str]]:
    config = yaml.safe_load(inputs.model_yaml.read_text())
    model = inputs.work / "model.yaml"
    model.write_text(yaml.safe_dump({**config, "transform": {"resize": 36, "crop": 0}}))
    return ["--model", str(model)], [str(model), "'transform'", "transform: crop", "got 0"]


def link_loop_in_a_class_folder(inputs: Inputs) -> tuple[list[str], list[str]]:
    root = inputs.data_root_without_inaturalist()
    write_class_folders(root / "textures/dtd/images", ["banded", "woven"], per_class=2, seed=4)
    (root / "textures/dtd/images/banded/again").symlink_to(".")
    return (["--data-root", str(root), "--ood-data", "textures", "--model", str(inputs.small_model_yaml)],
            [str(root / "textures/dtd/images/banded/again")])


def skipped_non_images(inputs: Inputs) -> list[str]:
    return ["skipped 2 files", str(inputs.work / "datasets/inaturalist/iNaturalist/images")]


SUPCON_URL = yaml.safe_load((REPO / "configs/models/resnet50-supcon.yaml").read_text())["checkpoint_url"]

CASES = {
    # paths (a missing data root and an unwritable output folder: test_reliability.py)
    "dataset folder missing": Case(missing_dataset_folder),
    "dataset folder without images": Case(dataset_folder_without_images),
    "link loop in a class folder": Case(link_loop_in_a_class_folder),
    "unwritable cache directory": Case(unwritable_cache_directory),
    # names: the closest valid one and all of them
    "unknown model": Case(lambda inputs: (["--model", "resnet50-supcom"], [
        "'resnet50-supcom'", "'resnet50-supcon'", *valid_names("models")])),
    "unknown dataset": Case(lambda inputs: (["--ood-data", "inaturalist", "textrues"], [
        "'textrues'", "'textures'", *valid_names("datasets")])),
    "unknown detector": Case(lambda inputs: (["--detectors", "energy", "nnguid"], [
        "'nnguid'", "'nnguide'", *valid_names("detectors")])),
    # configs (YAML syntax error: test_reliability.py; unknown key: test_pipeline.py)
    "wrong type": Case(wrong_type_in_experiment_yaml),
    "repeated YAML key": Case(repeated_key_in_experiment_yaml),
    "YAML alias bomb": Case(alias_in_experiment_yaml),
    "OOD set given twice": Case(lambda inputs: (["--ood-data", "inaturalist", "textures", "inaturalist"],
                                                ["'ood_data'", "'inaturalist'", "items 1 and 3"])),
    "detector given twice": Case(lambda inputs: (["--detectors", "knn", "energy", "knn"],
                                                 ["'detectors'", "'knn'", "items 1 and 3"])),
    "k = 0": Case(lambda inputs: (["--detectors", "knn", "--set", "detectors.knn.k=0"],
                                  ["knn: k", "got 0"])),
    "k larger than the bank": Case(lambda inputs: (["--detectors", "knn", "--set", "detectors.knn.k=25",
                                                    "--bank-ratio", "0.5", "--ood-data", "textures",
                                                    "--model", str(inputs.small_model_yaml)],
                                                   ["detector 'knn'", "k=25", "24 images = 0.5 x 48"])),
    "principal_dim not below the feature width": Case(lambda inputs: (
        ["--detectors", "vim", "--set", "detectors.vim.principal_dim=2048", "--ood-data", "textures"],
        ["detector 'vim'", "principal_dim=2048", "dimension 2048", "'resnet50-supcon-tiny'", "2048-d features",
         "24 images"])),
    "ViM bank smaller than principal_dim": Case(lambda inputs: (
        ["--detectors", "nnguide-vim", "--ood-data", "textures"],
        ["detector 'nnguide-vim'", "24 samples", "principal_dim=500"])),
    "bank ratio 0": Case(lambda inputs: (["--bank-ratio", "0"],
                                         ["'bank_ratio'", "(0, 1]", "0.0"])),
    "batch size -1": Case(lambda inputs: (["--batch-size", "-1"],
                                          ["'batch_size'", "-1"])),
    "seed -1": Case(lambda inputs: (["--seed", "-1"], ["'seed'", "[0, 2**32)", "-1"])),
    "device meta": Case(lambda inputs: (["--device", "meta"], ["'device'", "'meta'"])),
    "bootstrap for hours": Case(lambda inputs: (["--set", "bootstrap=100000000000", "--model",
                                                 str(inputs.small_model_yaml)], ["'bootstrap'", "hours"]),
                                quiet=False),
    "seed 2**32": Case(lambda inputs: (["--seed", str(2**32)], ["'seed'", "[0, 2**32)", str(2**32)])),
    "unknown device": Case(lambda inputs: (["--device", "gpu"], ["'device'", "'gpu'", "auto", "cpu", "cuda",
                                                                 "cuda:<index>"])),
    "config is a folder": Case(config_that_is_a_folder),
    "config is binary": Case(config_that_is_binary),
    "misspelt dataset option": Case(misspelt_dataset_option),
    "transform crop 0": Case(transform_crop_zero),
    # weights (a missing checkpoint: test_reliability.py)
    "not a checkpoint": Case(not_a_checkpoint),
    "missing, unexpected and mis-shaped keys": Case(checkpoint_with_wrong_keys),
    # numbers, after extracting a few images (which also skips and counts the non-image files in iNaturalist)
    "NaN features": Case(nan_features, logged=skipped_non_images, quiet=False),
    "inf logits": Case(inf_logits, logged=skipped_non_images, quiet=False),
}


def arguments(inputs: Inputs, changes: list[str]) -> list[str]:
    """main.py's arguments: the shared data root and the tiny model, `changes` replacing or adding flags."""
    base = {"--model": [str(inputs.model_yaml)], "--train-data": ["imagenet1k"], "--id-data": ["imagenet1k"],
            "--ood-data": ["inaturalist"], "--detectors": ["energy"], "--data-root": [str(inputs.data_root)],
            "--output-dir": [str(inputs.work / "out")], "--cache-dir": [str(inputs.work / "cache")],
            "--bank-ratio": ["0.5"], "--batch-size": ["4"], "--num-workers": ["0"], "--device": ["cpu"]}
    extra: list[str] = []
    flag = None
    for item in changes:
        if item.startswith("--"):
            flag = item
            if flag in base:
                base[flag] = []
            else:
                extra.append(flag)
        elif flag in base:
            base[flag].append(item)
        else:
            extra.append(item)
    return [*[item for flag, values in base.items() for item in (flag, *values)], "--no-plots", *extra]


@pytest.fixture(scope="module")
def runs(request, data_root, tiny_model_yaml, small_model_yaml, tmp_path_factory
         ) -> dict[str, tuple[Inputs, list[str], Callable]]:
    """Starts main.py for every case this session selected, side by side; each test waits for its own."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")]
    started = {}
    for name in selected:
        work = tmp_path_factory.mktemp(name.replace(" ", "-").replace(",", "").replace("=", ""))
        inputs = Inputs(work, data_root, tiny_model_yaml, small_model_yaml)
        changes, fragments = CASES[name].build(inputs)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(work / "torch-home")}  # an empty hub cache
        started[name] = (inputs, fragments, start_main(arguments(inputs, changes), cwd=work, env=env))
    yield started
    for _, _, process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()])
def test_bad_input_is_one_error_line_and_exit_code_2(name, runs):
    inputs, fragments, process = runs[name]
    _, stderr = process.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and process.returncode == 2, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert len(lines) == 1 or not CASES[name].quiet, stderr
    assert [line for line in lines if line.startswith("error")] == lines[-1:], stderr
    for fragment in fragments:
        assert fragment in lines[-1]
    for fragment in CASES[name].logged(inputs):
        assert fragment in stderr
