"""Shared fixtures: one generated data root in the official layouts and one random SupCon checkpoint; the fork
server that runs main.py for the subprocess tests (tests/main_process.py) lives as long as the session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import write_small_cnn_supcon_checkpoint, write_supcon_checkpoint
from tests.datagen import write_cifar10, write_class_folders, write_flat_folder, write_svhn
from tests.main_process import start_fork_server, start_main, stop_fork_server

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """ImageNet (train/val class folders), iNaturalist (flat, with junk files), Textures, CIFAR-10, SVHN."""
    root = tmp_path_factory.mktemp("datasets")
    write_class_folders(root / "imagenet1k/imagenet/train", WNIDS, per_class=12, seed=1)
    write_class_folders(root / "imagenet1k/imagenet/val", WNIDS, per_class=5, seed=2)
    write_flat_folder(root / "inaturalist/iNaturalist/images", count=14, seed=3)
    write_class_folders(root / "textures/dtd/images", ["banded", "woven"], per_class=5, seed=4)
    write_cifar10(root / "cifar10", per_class=1, seed=5)
    write_svhn(root / "svhn", "test", count=9, seed=6)
    return root


@pytest.fixture(scope="session")
def supcon_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-initialised resnet50 saved as `resnet50-supcon.pt` in SupCon's layout, and the torchvision state
    dict it holds. Read-only: a test that edits it saves a copy."""
    path = tmp_path_factory.mktemp("pretrained") / "resnet50-supcon.pt"
    return path, write_supcon_checkpoint(path, seed=0)


@pytest.fixture(scope="session")
def tiny_model_yaml(supcon_checkpoint, tmp_path_factory) -> Path:
    """A resnet50-supcon config on 32x32 inputs with the random-initialised SupCon checkpoint, for speed."""
    folder = tmp_path_factory.mktemp("models")
    checkpoint, _ = supcon_checkpoint
    config = folder / "resnet50-supcon-tiny.yaml"
    config.write_text(f"architecture: resnet50\ncheckpoint: {checkpoint}\ncheckpoint_format: supcon\n"
                      f"transform: {{resize: 36, crop: 32}}\n")
    return config


@pytest.fixture(scope="session")
def small_model_yaml(tmp_path_factory) -> Path:
    """`small-cnn-supcon.yaml`: the demo's small CNN (128-d features, 1000 classes), random-initialised, saved in
    SupCon's layout, on 32x32 inputs like tiny_model_yaml. For tests that run main.py end to end many times:
    loading it takes milliseconds, and the 128 x 128 covariances ViM, Mahalanobis and SSD fit take no time,
    where the ResNet-50's 2048 x 2048 ones take seconds each."""
    folder = tmp_path_factory.mktemp("small-model")
    checkpoint = folder / "small-cnn-supcon.pt"
    write_small_cnn_supcon_checkpoint(checkpoint, seed=0)
    config = folder / "small-cnn-supcon.yaml"
    config.write_text(f"architecture: small_cnn\ncheckpoint: {checkpoint}\ncheckpoint_format: supcon\n"
                      f"transform: {{resize: 36, crop: 32}}\n")
    return config


def pytest_sessionstart(session: pytest.Session) -> None:
    """Starts the fork server of tests/main_process.py before collection: its imports overlap collection's."""
    if not session.config.option.collectonly:
        start_fork_server()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    used = any(getattr(getattr(item, "module", None), "start_main", None) is start_main
               for item in getattr(session, "items", []))
    stop_fork_server(unused=not used)
