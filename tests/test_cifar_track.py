"""The CIFAR track end to end: CIFAR-10 / CIFAR-100 / SVHN files in torchvision's formats -> OpenOOD's ResNet-18
-> cache -> every default detector -> results.csv, through configs/experiments/cifar10-debug.yaml.

On generated files by default. With NNGUIDE_CIFAR_ROOT pointing at a folder that holds the real datasets as
torchvision downloads them (cifar10/cifar-10-batches-py, cifar100/cifar-100-python, svhn/test_32x32.mat; e.g.
after one `python main.py --config configs/experiments/cifar10-debug.yaml --download --data-root DIR`), the same
tests run on them too (with the debug config's 500-image subsets and random weights); otherwise those are
skipped, saying so.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import main
from dataloaders import subset_indices
from models import Backbone, build_backbone
from pipeline.config.experiment import DEFAULT_DETECTORS
from pipeline.config.loading import load_model_config
from tests.checkpoints import write_openood_resnet18_32x32_checkpoint
from tests.datagen import write_cifar10, write_cifar100, write_svhn

REPO = Path(__file__).resolve().parents[1]
REAL_ROOT = os.environ.get("NNGUIDE_CIFAR_ROOT")
CIFAR_MEANS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}  # evaluation_api/preprocessor.py
TEST_IMAGES = {}  # (data source, dataset) -> (uint8 (N, 32, 32, 3) images, labels) of its test split, in file order


@pytest.fixture(scope="module")
def generated_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar10(root / "cifar10", per_class=4, seed=11)
    TEST_IMAGES["generated", "cifar10"] = written["test_batch"]
    TEST_IMAGES["generated", "cifar100"] = write_cifar100(root / "cifar100", per_class=1, seed=12)["test"]
    TEST_IMAGES["generated", "svhn"] = write_svhn(root / "svhn", "test", count=30, seed=13)
    return root


def real_test_images(root: Path, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The test split as torchvision's own dataset classes read it (they check the official files' md5)."""
    if dataset == "svhn":
        reader = torchvision.datasets.SVHN(str(root / "svhn"), split="test")
        return reader.data.transpose(0, 2, 3, 1), reader.labels
    reader = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[dataset]
    split = reader(str(root / dataset), train=False)
    return split.data, np.asarray(split.targets)


@pytest.fixture(params=["generated", pytest.param("real", marks=pytest.mark.skipif(
    not REAL_ROOT, reason="set NNGUIDE_CIFAR_ROOT to a folder holding CIFAR-10, CIFAR-100 and SVHN to run on them"))])
def data(request) -> tuple[str, Path]:
    if request.param == "generated":
        return "generated", request.getfixturevalue("generated_root")
    return "real", Path(REAL_ROOT)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """OpenOOD's checkpoint layout, with random weights: <dir>/cifar{10,100}_resnet18_32x32_.../s0/best.ckpt."""
    folder = tmp_path_factory.mktemp("pretrained")
    for name, classes in (("openood-resnet18-cifar10", 10), ("openood-resnet18-cifar100", 100)):
        path = folder / load_model_config(name).checkpoint
        path.parent.mkdir(parents=True)
        write_openood_resnet18_32x32_checkpoint(path, num_classes=classes, seed=classes)
    return folder


def reference_features(backbone: Backbone, images: np.ndarray, trained_on: str) -> np.ndarray:
    """Features of uint8 images through OpenOOD's test transform (torchvision's, written out) and the backbone."""
    mean, std = CIFAR_MEANS[trained_on]
    transform = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(mean, std)])
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        return backbone.features(batch).numpy()


def cached_rows(entry: Path) -> np.ndarray:
    return np.concatenate([np.load(path) for path in sorted(entry.glob("rows_*.npy"))])


CASES = {  # ID set -> (model, OOD sets, subsets of generated data)
    "cifar10": ("openood-resnet18-cifar10", ["svhn", "cifar100"], ["subsets.cifar10=20", "subsets.svhn=25"]),
    "cifar100": ("openood-resnet18-cifar100", ["svhn", "cifar10"], ["subsets.svhn=25"]),
}
GENERATED_VIM = "detectors.vim.principal_dim=8"  # banks of 20 and 100 images span 19 and 99 directions, not 256


@pytest.mark.slow  # two pipeline runs with ResNet-18 forwards: about 15 s each on 2 cores
@pytest.mark.parametrize("id_set", CASES)
def test_cifar_debug_run_goes_from_torchvision_files_to_results_csv(id_set, data, pretrained, tmp_path):
    source, root = data
    model, ood_sets, generated_subsets = CASES[id_set]
    subsets = generated_subsets if source == "generated" else [f"subsets.{name}=500" for name in (id_set, "svhn")]
    overrides = ["subsets={}", *subsets, *([GENERATED_VIM] if source == "generated" else [])]
    argv = ["--config", str(REPO / "configs/experiments/cifar10-debug.yaml"), "--model", model,
            "--train-data", id_set, "--id-data", id_set, "--ood-data", *ood_sets, "--data-root", str(root),
            "--pretrained-dir", str(pretrained), "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--num-workers", "0", "--no-plots",
            *[arg for override in overrides for arg in ("--set", override)]]
    assert main.main(argv) == 0

    counts = dict(subset.removeprefix("subsets.").split("=") for subset in subsets)
    label = {name: f"{name}[{counts[name]}]" if name in counts else name for name in (id_set, *ood_sets)}
    with (tmp_path / "out/results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["id_data"], row["ood_data"], row["detector"]) for row in rows] == \
        [(label[id_set], label[ood], detector) for detector in DEFAULT_DETECTORS for ood in ood_sets]
    assert all(0 <= float(row["auroc"]) <= 100 for row in rows)

    cache = tmp_path / "cache" / model
    backbone = build_backbone(load_model_config(model), pretrained)
    for name in (id_set, "svhn"):  # what the cache holds = the backbone on the files read independently
        images, labels = TEST_IMAGES[source, name] if source == "generated" else real_test_images(root, name)
        chosen = subset_indices(labels, int(counts[name])) if name in counts else np.arange(len(labels))
        (entry,) = cache.glob(f"{label[name].replace('[', '[[]')}-test-*")
        expected = reference_features(backbone, images[chosen], id_set)
        np.testing.assert_allclose(cached_rows(entry), expected, rtol=1e-4, atol=1e-4)


def test_download_without_network_is_one_error_line_saying_where_the_files_go(small_model_yaml, tmp_path, monkeypatch,
                                                                               capsys):
    """--download where the network cannot be reached: one line (exit 2) naming the folder and the first file the
    run needs, not urllib's traceback."""
    import urllib.error
    import urllib.request

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    argv = ["--model", str(small_model_yaml), "--train-data", "cifar10", "--id-data", "cifar10", "--ood-data", "svhn",
            "--detectors", "energy", "--data-root", str(tmp_path / "data"), "--download", "--device", "cpu",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    assert main.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert "could not download" in error and str(tmp_path / "data" / "cifar10") in error
    assert "cifar-10-batches-py" in error and "name resolution" in error


def test_a_missing_openood_checkpoint_names_where_openood_publishes_it_and_leaves_no_folder(tmp_path, capsys):
    """The OpenOOD checkpoint error names OpenOOD's download and the path the run expects; a run that fails
    before writing anything leaves no empty output or cache folder behind."""
    argv = ["--config", str(REPO / "configs/experiments/cifar10-debug.yaml"), "--pretrained-dir",
            str(tmp_path / "empty"), "--data-root", str(tmp_path / "data"), "--device", "cpu",
            "--output-dir", str(tmp_path / "runs/out"), "--cache-dir", str(tmp_path / "cache")]
    assert main.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "https://drive.google.com/file/d/1byGeYxM_PlLjT72wZsMQvP6popJeWBgt" in error
    assert "cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt" in error
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
