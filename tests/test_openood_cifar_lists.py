"""OpenOOD v1.5's CIFAR-10 and CIFAR-100 benchmarks: the dataset configs read OpenOOD's image lists as laid out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataloaders import build_dataset
from errors import UserError
from pipeline.config.loading import load_dataset_config
from tests.datagen import write_openood_classic_layout

REPO = Path(__file__).resolve().parents[1]
OOD_SETS = {"cifar10": ["cifar100", "tin", "mnist", "svhn", "texture", "places365"],
            "cifar100": ["cifar10", "tin", "mnist", "svhn", "texture", "places365"]}
# config name -> split -> the list it must read, relative to the data root (OpenOOD's DATA_INFO)
EXPECTED_LISTS = {
    **{f"openood-{id_set}": {split: f"openood/benchmark_imglist/{id_set}/{split}_{id_set}.txt"
                             for split in ("train", "test")} for id_set in OOD_SETS},
    **{f"openood-{id_set}-{ood_set}": {"test": f"openood/benchmark_imglist/{id_set}/test_{ood_set}.txt"}
       for id_set, ood_sets in OOD_SETS.items() for ood_set in ood_sets},
}
CONFIG_SPLITS = [(name, split) for name, splits in EXPECTED_LISTS.items() for split in splits]


@pytest.fixture(scope="module")
def openood_root(tmp_path_factory) -> tuple[Path, dict[str, tuple[list[str], list[int], np.ndarray]]]:
    """A data root with a miniature of OpenOOD's data folder under openood/, and what each list names."""
    root = tmp_path_factory.mktemp("datasets")
    return root, write_openood_classic_layout(root)


@pytest.mark.parametrize("name, split", CONFIG_SPLITS, ids=[f"{name}-{split}" for name, split in CONFIG_SPLITS])
def test_each_cifar_config_reads_its_openood_list(openood_root, name, split):
    root, written = openood_root
    config = load_dataset_config(name)
    assert (config.format, set(config.splits)) == ("image_list", set(EXPECTED_LISTS[name]))
    assert config.splits[split] == EXPECTED_LISTS[name][split]
    dataset = build_dataset(config, split, root, transform=None)
    image_paths, labels, pixels = written[EXPECTED_LISTS[name][split]]
    assert dataset.root == (root / "openood/images_classic").resolve()
    assert dataset.image_ids == image_paths
    assert dataset.labels.tolist() == labels  # class indices for the ID set, -1 for the OOD sets
    image, label = dataset[0]
    np.testing.assert_array_equal(np.asarray(image), pixels[0])
    assert label == labels[0]


def test_each_benchmark_reads_only_its_own_list_folder():
    """Every openood-cifar10* / openood-cifar100* config there is reads benchmark_imglist/<its ID set>/ only:
    CIFAR-100's TinyImageNet list, for one, is not CIFAR-10's."""
    found = sorted(path.stem for path in (REPO / "configs/datasets").glob("openood-cifar*.yaml"))
    assert found == sorted(EXPECTED_LISTS)
    for name in found:
        id_set = "cifar100" if name.startswith("openood-cifar100") else "cifar10"
        for list_file in load_dataset_config(name).splits.values():
            assert Path(list_file).parent == Path("openood/benchmark_imglist") / id_set, (name, list_file)


def test_the_two_tin_lists_name_different_images(openood_root):
    root, _ = openood_root
    cifar10_tin, cifar100_tin = (build_dataset(load_dataset_config(f"openood-{id_set}-tin"), "test", root, None)
                                 for id_set in ("cifar10", "cifar100"))
    assert not set(cifar10_tin.image_ids) & set(cifar100_tin.image_ids)


def test_a_missing_image_is_an_error_naming_it_and_its_list(tmp_path):
    written = write_openood_classic_layout(tmp_path)
    list_file = "openood/benchmark_imglist/cifar100/test_tin.txt"
    missing = tmp_path / "openood/images_classic" / written[list_file][0][0]
    missing.unlink()
    with pytest.raises(UserError) as error:
        build_dataset(load_dataset_config("openood-cifar100-tin"), "test", tmp_path, transform=None)
    message = str(error.value)
    assert "1 of the 2" in message and str(tmp_path / list_file) in message and str(missing.resolve()) in message


def test_a_missing_list_is_an_error_naming_it(tmp_path):
    write_openood_classic_layout(tmp_path)
    list_file = tmp_path / "openood/benchmark_imglist/cifar10/train_cifar10.txt"
    list_file.unlink()
    with pytest.raises(UserError) as error:
        build_dataset(load_dataset_config("openood-cifar10"), "train", tmp_path, transform=None)
    assert str(list_file) in str(error.value)


def test_list_lines_are_one_image_each_inside_the_root(tmp_path):
    """A UTF-8 byte-order mark is ignored; a path leaving the image root ('..') is refused like an absolute one; an
    image listed twice (it would be scored twice) is refused naming both lines."""
    from dataloaders.imagelist import read_image_list
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "bom.txt").write_text("\ufeffcat/a.png 0\ncat/b.png 1\n", encoding="utf-8")
    assert read_image_list(lists / "bom.txt") == (["cat/a.png", "cat/b.png"], [0, 1])
    (lists / "escape.txt").write_text("cat/a.png 0\ncat/../../secret.png 1\n")
    with pytest.raises(UserError) as escaping:
        read_image_list(lists / "escape.txt")
    assert "line 2" in str(escaping.value) and "cat/../../secret.png" in str(escaping.value)
    (lists / "twice.txt").write_text("cat/a.png 0\ncat/b.png 1\n# comment\ncat/a.png 0\n")
    with pytest.raises(UserError) as repeated:
        read_image_list(lists / "twice.txt")
    assert "'cat/a.png'" in str(repeated.value) and "lines 1 and 4" in str(repeated.value)
