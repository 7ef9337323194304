"""Shared fixtures: one generated data root in the official layouts and one random SupCon checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import write_supcon_checkpoint
from tests.datagen import write_cifar10, write_class_folders, write_flat_folder, write_svhn

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
def tiny_model_yaml(tmp_path_factory) -> Path:
    """A resnet50-supcon config on 32x32 inputs with a random-initialised SupCon checkpoint, for speed."""
    folder = tmp_path_factory.mktemp("models")
    checkpoint = folder / "resnet50-supcon-random.pt"
    write_supcon_checkpoint(checkpoint, seed=0)
    config = folder / "resnet50-supcon-tiny.yaml"
    config.write_text(f"architecture: resnet50\ncheckpoint: {checkpoint}\ncheckpoint_format: supcon\n"
                      f"transform: {{resize: 36, crop: 32}}\n")
    return config
