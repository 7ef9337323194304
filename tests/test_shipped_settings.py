"""Every shipped setting that decides a published number, restated from its source and compared with what the
repository's own loaders read: the detector and experiment configs, OpenOOD's benchmark groupings, the bank rule
and the seeds. Independent of the end-to-end tests, which override some of these values for their miniature data.

Sources, as read for these tests:
- the paper's code: roomo7time/nnguide at c123cac (its HEAD), and its early commit 484b5d9 for NNGuide-ViM;
- OpenOOD v1.5: Jingkang50/OpenOOD at 3c35632 (main, 2025-12-01).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from dataloaders.bank import bank_indices, subset_indices
from ood_detectors import OODDetector, create_detector
from pipeline.config.experiment import ExperimentConfig, ResolvedExperiment, detector_spec, resolve_experiment
from pipeline.config.loading import available, load_dataset_config, load_detector_config, load_model_config
from pipeline.run.averages import OPENOOD_BENCHMARKS, paper_averages

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs/experiments"

# --- the paper's code, roomo7time/nnguide at c123cac -------------------------------------------------------------
PAPER_K = 10                    # configs/detector/nnguide.yaml `knn_k: 10`; ood_detectors/nnguide.py lines 17-20 and
                                # knn.py lines 12-15 fall back to 10 (its configs/detector/knn.yaml is empty)
PAPER_VIM_PRINCIPAL_DIM = 500   # ood_detectors/vim.py line 28: the residual space is eigenvectors [500:]
PAPER_BANK_RATIO = 0.01         # dataloaders/factory.py line 185: get_train_dataloader(..., bankset_ratio=0.01)
PAPER_SEED = 0                  # main.py lines 31-33: --seed, default 0, seeds np.random (set_seed, lines 100-103)
PAPER_REACT_PERCENTILE = 0.95   # configs/model/resnet50-react.yaml `react_percentile: 0.95`
# run.sh lines 4, 8 and 12: the commented full lists of models and ID sets, and the OOD sets
PAPER_MODELS = ["resnet50-supcon", "resnet50-react", "regnet-y-16gf-swag-e2e-v1", "vit-b16-swag-e2e-v1",
                "mobilenet-v2"]
PAPER_ID_SETS = ["imagenet1k", "imagenet1k-v2-a", "imagenet1k-v2-b", "imagenet1k-v2-c"]
PAPER_OOD_SETS = ["inaturalist", "sun", "places", "textures", "openimage-o"]
# ood_detectors/factory.py lines 5-31: every detector it builds (run.sh line 16 lists all of them but kl)
PAPER_DETECTORS = {"energy", "nnguide", "vim", "mahalanobis", "ssd", "knn", "msp", "kl", "maxlogit"}
# the paper's ViT-B/16 row: ImageNet-O as one more OOD set, NNGuide with ViM as the base score; the base score's
# bank side, ViM minus its minimum over the bank, is 484b5d9's ood_detectors/vim.py lines 37-42 (commented out)
PAPER_VIT_EXTRA_OOD_SET = "imagenet-o"
# the paper's "Average" (Table 1, "ImageNet-1k vs curated OODs (avg.)"): the four MOS/ReAct sets, OpenImage-O
# reported apart (docs/reproducing.md, "Why Avg-4")
PAPER_AVERAGE_4 = ("inaturalist", "sun", "places", "textures")

# --- OpenOOD v1.5, Jingkang50/OpenOOD at 3c35632 -----------------------------------------------------------------
OPENOOD_K = 100         # configs/postprocessors/nnguide.yml line 6, postprocessor_args.K
OPENOOD_ALPHA = 0.01    # configs/postprocessors/nnguide.yml line 5, postprocessor_args.alpha: the bank's share
OPENOOD_BATCH = 200     # scripts/eval_ood.py line 47, --batch-size default; line 162 builds the loaders shuffle=False
CIFAR_TRAIN_IMAGES = 50_000  # train_cifar{10,100}.txt: the CIFAR train split, one line per image
# openood/evaluation_api/datasets.py, DATA_INFO[<id>]: 'id' train / test imglist_path and the 'ood' 'near' / 'far'
# 'datasets' with each one's imglist_path, in that order (the ImageNet bank comes from our imagenet1k folder, not
# from OpenOOD's train list: no train entry)
OPENOOD_LISTS = {
    "CIFAR-10": {  # DATA_INFO['cifar10']: train line 23, test line 31, near lines 51-59, far lines 63-80
        "train": "benchmark_imglist/cifar10/train_cifar10.txt",
        "test": "benchmark_imglist/cifar10/test_cifar10.txt",
        "near": ["benchmark_imglist/cifar10/test_cifar100.txt", "benchmark_imglist/cifar10/test_tin.txt"],
        "far": ["benchmark_imglist/cifar10/test_mnist.txt", "benchmark_imglist/cifar10/test_svhn.txt",
                "benchmark_imglist/cifar10/test_texture.txt", "benchmark_imglist/cifar10/test_places365.txt"]},
    "CIFAR-100": {  # DATA_INFO['cifar100']: train line 90, test line 98, near lines 110-118, far lines 122-139
        "train": "benchmark_imglist/cifar100/train_cifar100.txt",
        "test": "benchmark_imglist/cifar100/test_cifar100.txt",
        "near": ["benchmark_imglist/cifar100/test_cifar10.txt", "benchmark_imglist/cifar100/test_tin.txt"],
        "far": ["benchmark_imglist/cifar100/test_mnist.txt", "benchmark_imglist/cifar100/test_svhn.txt",
                "benchmark_imglist/cifar100/test_texture.txt", "benchmark_imglist/cifar100/test_places365.txt"]},
    "ImageNet-1K": {  # DATA_INFO['imagenet']: test line 242, near lines 276-284, far lines 288-304
        "test": "benchmark_imglist/imagenet/test_imagenet.txt",
        "near": ["benchmark_imglist/imagenet/test_ssb_hard.txt", "benchmark_imglist/imagenet/test_ninco.txt"],
        "far": ["benchmark_imglist/imagenet/test_inaturalist.txt", "benchmark_imglist/imagenet/test_textures.txt",
                "benchmark_imglist/imagenet/test_openimage_o.txt"]},
}
OPENOOD_EXPERIMENTS = {"openood-v1.5-imagenet": "ImageNet-1K",
                       "openood-v1.5-cifar10": "CIFAR-10", "openood-v1.5-cifar10-nnguide": "CIFAR-10",
                       "openood-v1.5-cifar100": "CIFAR-100", "openood-v1.5-cifar100-nnguide": "CIFAR-100"}

# --- this repository's own choice, for debug runs (docs/cifar.md, "Debug runs on subsets") -----------------------
SUBSET_SEED_DEFAULT = 0  # the subsets are RandomState(0) draws unless subset_seed says otherwise


def experiment(name: str) -> ResolvedExperiment:
    """configs/experiments/<name>.yaml as a run resolves it."""
    return resolve_experiment(EXPERIMENTS / f"{name}.yaml")


def built(resolved: ResolvedExperiment, table_name: str) -> OODDetector:
    """The detector a run builds for that table row: the YAML's hyper-parameters over the class defaults."""
    return resolved.detectors[table_name].build()


def shipped_detector(name: str) -> OODDetector:
    """configs/detectors/<name>.yaml built as a run builds it."""
    return detector_spec(name, load_detector_config(name)).build()


def list_file(resolved: ResolvedExperiment, dataset: str, split: str = "test") -> str:
    """The OpenOOD list a dataset of the run reads, relative to OpenOOD's data folder (--data-root's openood/)."""
    return resolved.datasets[dataset].splits[split].removeprefix("openood/")


def openood_nnguide_bank_size(num_train: int, batch_size: int, alpha: float) -> int:
    """NNGuidePostprocessor.setup (openood/postprocessors/nnguide_postprocessor.py lines 46-60): whole batches of
    the train loader, kept until batches x batch_size exceeds int(num_train x alpha) (or the loader ends)."""
    for batches in itertools.count(1):
        if batches * batch_size > int(num_train * alpha) or batches * batch_size >= num_train:
            return min(batches * batch_size, num_train)


def official_bank(num_train: int, ratio: float, seed: int) -> np.ndarray:
    """The paper's bank: main.py's set_seed (np.random.seed, line 102), then dataloaders/factory.py's subsample
    (lines 204-216): shuffle np.arange(N) with the global generator, keep the first int(N x ratio)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        indices = np.arange(num_train)
        np.random.shuffle(indices)
        return indices[:int(num_train * ratio)]
    finally:
        np.random.set_state(state)


def test_every_detector_config_holds_only_hyper_parameters_pinned_here():
    """A new detector YAML, or a new key in one, is a shipped setting: it gets a test below before it ships."""
    pinned = {"energy": set(), "kl": set(), "mahalanobis": set(), "maxlogit": set(), "msp": set(), "ssd": set(),
              "knn": {"k"}, "vim": {"principal_dim"}, "nnguide": {"k", "base"}, "nnguide-openood": {"k", "base"},
              "nnguide-vim": {"k", "base", "confidence", "base_options"}}
    assert {name: set(load_detector_config(name)) - {"detector"} for name in available("detectors")} == pinned


def test_detector_configs_use_the_paper_s_hyper_parameters():
    knn, nnguide, vim = (shipped_detector(name) for name in ("knn", "nnguide", "vim"))
    assert knn.k == PAPER_K
    assert (nnguide.k, nnguide.base, nnguide.confidence) == (PAPER_K, "energy", "raw")  # guidance x energy
    assert vim.principal_dim == PAPER_VIM_PRINCIPAL_DIM


def test_nnguide_vim_follows_the_official_repository_s_early_trace():
    nnguide_vim = shipped_detector("nnguide-vim")
    assert (nnguide_vim.k, nnguide_vim.base, nnguide_vim.confidence) == (PAPER_K, "vim", "bank_min_shift")
    vim_default = create_detector("vim").principal_dim
    assert dict(nnguide_vim.base_options).get("principal_dim", vim_default) == PAPER_VIM_PRINCIPAL_DIM


def test_openood_nnguide_config_is_openood_s_postprocessor():
    """K 100, and the bank scaled by the energy (nnguide_postprocessor.py lines 63-65: features x logsumexp)."""
    openood = shipped_detector("nnguide-openood")
    assert (openood.k, openood.base, openood.confidence, openood.bank_confidence) == \
        (OPENOOD_K, "energy", "raw", "base")


def test_react_percentile_is_the_paper_s():
    assert load_model_config("resnet50-react").react_percentile == PAPER_REACT_PERCENTILE


@pytest.mark.parametrize("name", ["paper-resnet50-supcon", "paper-vit-b16", "openood-v1.5-imagenet",
                                  "openood-v1.5-cifar10", "openood-v1.5-cifar100"])
def test_experiments_in_the_paper_s_settings_draw_its_bank_and_run_its_detectors(name):
    resolved = experiment(name)
    config = resolved.config
    assert (config.bank_ratio, config.seed, config.bank_order) == (PAPER_BANK_RATIO, PAPER_SEED, "random")
    assert set(resolved.detectors) - {"nnguide-vim"} == PAPER_DETECTORS  # nnguide-vim: the ViT-B/16 row's
    assert built(resolved, "nnguide").k == PAPER_K and built(resolved, "knn").k == PAPER_K
    if not name.startswith("openood-v1.5-cifar"):  # ResNet-18's 512-d features: 256, this repository's choice
        assert built(resolved, "vim").principal_dim == PAPER_VIM_PRINCIPAL_DIM


def test_paper_experiments_score_the_paper_s_sets():
    resnet, vit = experiment("paper-resnet50-supcon"), experiment("paper-vit-b16")
    for resolved in (resnet, vit):
        assert (resolved.config.train_data, resolved.config.id_data) == ("imagenet1k", "imagenet1k")
    assert resnet.config.ood_data == PAPER_OOD_SETS
    assert (vit.config.model, vit.config.ood_data) == ("vit-b16-swag-e2e-v1", [*PAPER_OOD_SETS,
                                                                               PAPER_VIT_EXTRA_OOD_SET])
    assert set(vit.detectors) == PAPER_DETECTORS | {"nnguide-vim"}
    assert built(vit, "nnguide-vim").confidence == "bank_min_shift"


def test_run_sh_defaults_are_the_paper_s_lists():
    run_sh = (REPO / "run.sh").read_text()

    def default(variable: str) -> list[str]:
        (value,) = re.findall(rf'^{variable}="\$\{{{variable}:-([^}}]*)\}}"$', run_sh, flags=re.MULTILINE)
        return value.split()

    (ood_sets,) = re.findall(r"^OOD_SETS=\(([^)]*)\)$", run_sh, flags=re.MULTILINE)
    assert default("MODELS") == PAPER_MODELS and default("ID_SETS") == PAPER_ID_SETS
    assert ood_sets.split() == PAPER_OOD_SETS and set(default("DETECTORS")) == PAPER_DETECTORS


def test_paper_average_is_over_its_four_sets():
    assert paper_averages(PAPER_OOD_SETS)["Avg-4"] == PAPER_AVERAGE_4
    assert "Avg-4" not in paper_averages(["inaturalist", "sun", "places", "openimage-o"])  # not without Textures


def test_openood_benchmarks_group_the_sets_as_openood_s_evaluator():
    """Near- and far-OOD of each benchmark, compared by the list file each dataset config reads."""
    def lists(names: tuple[str, ...]) -> list[str]:
        return [load_dataset_config(name).splits["test"].removeprefix("openood/") for name in names]

    assert sorted(benchmark.name for benchmark in OPENOOD_BENCHMARKS) == sorted(OPENOOD_LISTS)
    for benchmark in OPENOOD_BENCHMARKS:
        assert lists(benchmark.near) == OPENOOD_LISTS[benchmark.name]["near"], benchmark.name
        assert lists(benchmark.far) == OPENOOD_LISTS[benchmark.name]["far"], benchmark.name


@pytest.mark.parametrize("name", OPENOOD_EXPERIMENTS)
def test_openood_experiments_read_openood_s_lists_in_its_order(name):
    resolved, lists = experiment(name), OPENOOD_LISTS[OPENOOD_EXPERIMENTS[name]]
    config = resolved.config
    assert list_file(resolved, config.id_data) == lists["test"]
    assert [list_file(resolved, ood) for ood in config.ood_data] == [*lists["near"], *lists["far"]]
    if "train" in lists:
        assert list_file(resolved, config.train_data, "train") == lists["train"]
    else:  # ImageNet: the paper's bank, from the imagenet1k train folder
        assert config.train_data == "imagenet1k"


@pytest.mark.parametrize("name", ["openood-v1.5-cifar10-nnguide", "openood-v1.5-cifar100-nnguide"])
def test_openood_nnguide_experiments_run_k_100_on_the_first_600_train_images(name):
    resolved = experiment(name)
    config = resolved.config
    assert list(resolved.detectors) == ["nnguide-openood"] and built(resolved, "nnguide-openood").k == OPENOOD_K
    # unshuffled batches of 200 until more than int(0.01 x 50,000) = 500 images: 3 batches
    openood_size = openood_nnguide_bank_size(CIFAR_TRAIN_IMAGES, OPENOOD_BATCH, OPENOOD_ALPHA)
    assert openood_size == 600
    # the run's bank: the first len(bank_indices(N, bank_ratio, seed)) images of the train list, in list order
    assert config.bank_order == "list"
    assert len(bank_indices(CIFAR_TRAIN_IMAGES, config.bank_ratio, config.seed)) == openood_size


@pytest.mark.parametrize("num_train, ratio, seed", [(1_281_167, 0.01, 0), (50_000, 0.01, 0), (50_000, 0.01, 3),
                                                    (1000, 0.5, 1)])
def test_bank_is_the_official_seeded_shuffle_prefix(num_train, ratio, seed):
    assert np.array_equal(bank_indices(num_train, ratio, seed), official_bank(num_train, ratio, seed))


def test_subset_seed_default_draws_the_documented_subsets():
    (field,) = [field for field in dataclasses.fields(ExperimentConfig) if field.name == "subset_seed"]
    assert field.default == SUBSET_SEED_DEFAULT
    assert experiment("cifar10-debug").config.subset_seed == SUBSET_SEED_DEFAULT
    # one class (unlabelled rows): the subset is the first `count` of one RandomState(seed) permutation, sorted
    expected = np.sort(np.random.RandomState(SUBSET_SEED_DEFAULT).permutation(50)[:5])
    assert np.array_equal(subset_indices(np.full(50, -1), 5), expected)
