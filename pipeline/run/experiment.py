"""One experiment, top to bottom: datasets -> backbone -> cached features -> detectors -> metrics -> a typed result.

    result = run_experiment(resolve_experiment("configs/experiments/demo.yaml"))

Nothing here writes result files: `pipeline.report.outputs.write_result(result)` does.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloaders import DatasetConfig, ImageDataset, bank_indices, build_dataset, subset_indices
from dataloaders.torch_datasets import TorchImageDataset
from errors import UserError
from models import Backbone, PythonModel, build_backbone, file_sha256, resolve_checkpoint
from ood_detectors import OODDetector
from ood_evaluation.bootstrap import check_cost
from pipeline.config.experiment import ExperimentConfig, ResolvedExperiment, display_name
from pipeline.features.distributed import Topology, barrier, init_from_environment
from pipeline.features.extract import ExtractionSettings, FeatureExtractor
from pipeline.features.training import trained_checkpoint
from pipeline.files import require_writable
from pipeline.result import AverageRow, ExperimentResult, ResultRow, RunScores
from pipeline.run.provenance import environment
from pipeline.run.scoring import RawFeatures, detector_inputs, score_detector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSetKey:
    """What a cache entry's images are, as data: the dataset (its table name), the split, the image list's
    fingerprint and their order ("dataset", or the bank's seeded permutation)."""

    dataset: str
    split: str
    images: str
    seed: int | None = None  # None: the dataset's own order

    @property
    def label(self) -> str:
        """The entry folder's readable prefix (never parsed back)."""
        if self.split == "test":
            return f"{self.dataset}-test"
        return f"{self.dataset}-train-in-order" if self.seed is None else f"{self.dataset}-train-seed{self.seed}"

    def as_key(self) -> dict:
        order = "dataset" if self.seed is None else f"RandomState({self.seed}).permutation"
        return {"dataset": self.dataset, "split": self.split, "images": self.images, "order": order}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass(frozen=True)
class Model:
    """The run's backbone, how images reach it, the name of its weights for results.csv, and its cache key."""

    name: str
    backbone: Backbone
    transform: Callable             # PIL image -> (3, H, W) tensor
    react_percentile: float | None  # ReAct's clip quantile of the bank's features; None = no clipping
    checkpoint_name: str
    cache_key: dict


def load_model(experiment: ResolvedExperiment, device: torch.device, topology: Topology) -> Model:
    """The experiment's backbone; a model that ships no weights is trained first (by rank 0 under torchrun, the
    others then read its cached weights)."""
    config, model_config = experiment.config, experiment.model
    if isinstance(model_config, PythonModel):
        key = model_config.cache_key()
        return Model(model_config.name, model_config.backbone(), model_config.image_transform(),
                     model_config.react_percentile,
                     f"{type(model_config.module).__name__} weights {key['weights_sha256'][:12]}", key)
    checkpoint_name = model_config.checkpoint  # as configured: results.csv's checkpoint column
    if model_config.train is not None:
        if not topology.is_main:
            barrier(topology)
        weights = trained_checkpoint(model_config, Path(config.data_root).expanduser(), Path(config.cache_dir),
                                     device)
        if topology.is_main:
            barrier(topology)
        model_config = dataclasses.replace(model_config, checkpoint=str(weights), checkpoint_format="state_dict")
        checkpoint_name = f"trained at start-up ({weights.name})"  # not the cache's absolute path
    checkpoint = resolve_checkpoint(model_config, Path(config.pretrained_dir))
    backbone = build_backbone(model_config, Path(config.pretrained_dir))
    return Model(model_config.name, backbone, model_config.transform.build(), model_config.react_percentile,
                 checkpoint_name, model_config.cache_key(file_sha256(checkpoint)))


class ImageSets:
    """The run's datasets, listed (not decoded) with the model's transform: subsets applied, and what was skipped
    or cut recorded for the provenance."""

    def __init__(self, experiment: ResolvedExperiment, transform: Callable) -> None:
        self.config = config = experiment.config
        self.sources = experiment.datasets
        self.data_root = Path(config.data_root).expanduser()
        self.transform = transform
        self._python_datasets: dict[str, TorchImageDataset] = {}  # read once to fingerprint them: kept
        self.skipped_files: dict[str, int] = {}  # "<set>/<split>" -> files skipped while listing
        self.subset_sizes: dict[tuple[str, str], tuple[int, int]] = {}  # (dataset, split) -> (kept, of) images

    def dataset(self, name: str, split: str) -> ImageDataset:
        dataset = self._read(name, split)
        if dataset.skipped:
            self.skipped_files[f"{display_name(name)}/{split}"] = len(dataset.skipped)
        count = self.config.subsets.get(display_name(name))
        if count is not None and count >= len(dataset):
            log.warning("subsets.%s=%d is not below the %d images of %s's %s split: the whole split is used",
                        display_name(name), count, len(dataset), display_name(name), split)
        elif count is not None:
            self.subset_sizes[(display_name(name), split)] = (count, len(dataset))
            dataset = dataset.subset(subset_indices(dataset.labels, count, self.config.subset_seed))
        return dataset

    def _read(self, name: str, split: str) -> ImageDataset:
        """One split of a configured dataset; a dataset given as a Python object is all its splits."""
        source = self.sources[name]
        if not isinstance(source, DatasetConfig):
            if name not in self._python_datasets:
                self._python_datasets[name] = TorchImageDataset(name, source, self.transform)
            return self._python_datasets[name]
        if self.config.skip_broken_images and source.format == "image_list":
            # an image list can name files that are gone: with the flag they are skipped and counted too
            source = dataclasses.replace(source, options={**source.options, "skip_missing": True})
        try:
            return build_dataset(source, split, self.data_root, self.transform, self.config.download)
        except UserError as error:
            if self.data_root.is_dir():
                raise
            raise UserError(f"the data root {self.data_root} does not exist (set --data-root): {error}") from None

    def label(self, name: str, split: str) -> str:
        """A dataset's name in tables, plots and the cache: display_name, plus "[kept]" when cut to a subset
        (cifar10[2000]), so a debug run's rows never pass for the full set's."""
        sizes = self.subset_sizes.get((display_name(name), split))
        return display_name(name) + (f"[{sizes[0]}]" if sizes else "")

    def subset_notes(self) -> list[str]:
        """One line per subset read, e.g. 'cifar10 test: 2000 of 10000 images'."""
        return [f"{name} {split}: {kept} of {total} images"
                for (name, split), (kept, total) in self.subset_sizes.items()]

    def reader_notes(self) -> tuple[str, ...]:
        """What a reader of the tables must know: that the sets are subsets, when they are."""
        if not self.subset_sizes:
            return ()
        return (f"Subsets, not the full sets (a debug run; seeded, stratified by class): "
                f"{'; '.join(self.subset_notes())}.",)

    def test_sets(self) -> tuple[dict[str, ImageDataset], str, list[str]]:
        """{table name: test split} of the ID set and the OOD sets, the ID set's name and the OOD sets' names."""
        config = self.config
        given_names = list(dict.fromkeys([config.id_data, *config.ood_data]))
        shown = [display_name(given) for given in given_names]
        clashing = sorted(given for given, name in zip(given_names, shown) if shown.count(name) > 1)
        if clashing:
            raise UserError(f"datasets {', '.join(clashing)} would share one name in the table and the cache; "
                            f"rename one of the YAML files")
        datasets = {given: self.dataset(given, "test") for given in given_names}
        names = {given: self.label(given, "test") for given in given_names}
        test_sets = {names[given]: dataset for given, dataset in datasets.items()}
        id_name, ood_names = names[config.id_data], [names[given] for given in config.ood_data]
        for name in ood_names:
            if name == id_name or test_sets[name].fingerprint() == test_sets[id_name].fingerprint():
                log.warning("OOD set '%s' holds the same images as the ID set '%s': every detector will score "
                            "about 50%% AUROC on it; was another set meant?", name, id_name)
        return test_sets, id_name, ood_names


def build_detectors(experiment: ResolvedExperiment, model: Model, bank_size: int, train_size: int
                    ) -> dict[str, OODDetector]:
    """The run's unfitted detectors, each checked against the model's feature width and the bank's size, so that
    what fit would refuse after extraction is refused before it."""
    config = experiment.config
    detectors = {}
    for table_name, spec in experiment.detectors.items():
        detectors[table_name] = detector = spec.build()
        try:
            detector.check_feature_dim(model.backbone.feature_dim)
            detector.check_bank_size(bank_size)
        except ValueError as error:
            raise UserError(f"detector '{table_name}': {error} (model '{model.name}': "
                            f"{model.backbone.feature_dim}-d features; bank: {bank_size} images = "
                            f"{config.bank_ratio} x {train_size})") from None
    return detectors


def check_bootstrap_duration(config: ExperimentConfig, id_size: int, ood_sizes: list[int], detectors: int) -> None:
    """The intervals' resamples would not take hours: refused before any extraction, with the estimate."""
    try:
        check_cost(config.bootstrap, id_size, ood_sizes, repeats=detectors)
    except ValueError as error:
        raise UserError(f"config key 'bootstrap': {error} (or 0: no intervals)") from None


class Extraction:
    """Raw features of the run's image sets, through the cache."""

    def __init__(self, config: ExperimentConfig, model: Model, device: torch.device, topology: Topology) -> None:
        settings = ExtractionSettings(device, config.batch_size, config.num_workers, config.amp, config.channels_last,
                                      config.chunk_size, config.recompute, config.skip_broken_images,
                                      config.verify_image_content)
        self.extractor = FeatureExtractor(model.backbone, model.cache_key, Path(config.cache_dir), settings, topology)

    def bank(self, train: ImageDataset, name: str, config: ExperimentConfig, size: int) -> RawFeatures:
        """The first `size` images of the train split in the bank's order: a RandomState(seed) permutation (the
        paper's code), or with bank_order "list" the split's own order (OpenOOD's NNGuide). The cache entry holds
        the whole order's features as far as extracted, so a larger bank extends a smaller one."""
        if config.bank_order == "list":
            return self.features(train, ImageSetKey(name, "train", train.fingerprint()), size)
        key = ImageSetKey(name, "train", train.fingerprint(), config.seed)
        return self.features(train.subset(bank_indices(len(train), 1.0, config.seed)), key, size)

    def test_set(self, name: str, dataset: ImageDataset) -> RawFeatures:
        return self.features(dataset, ImageSetKey(name, "test", dataset.fingerprint()), len(dataset))

    def features(self, dataset: ImageDataset, key: ImageSetKey, num_rows: int) -> RawFeatures:
        """Features and labels of dataset[:num_rows], without the images skipped as undecodable."""
        extracted = self.extractor.extract(dataset, key.as_key(), key.label, num_rows)
        labels = dataset.labels[:num_rows]
        if not extracted.broken_rows:
            return RawFeatures(extracted.features, labels, dataset.image_ids[:num_rows], key.label)
        kept = np.setdiff1d(np.arange(num_rows), extracted.broken_rows)
        return RawFeatures(extracted.features[kept], labels[kept], [dataset.image_ids[row] for row in kept], key.label,
                           tuple(dataset.image_ids[row] for row in extracted.broken_rows))


def run_experiment(experiment: ResolvedExperiment) -> ExperimentResult | None:
    """Extract what the config names (each image set once, from the cache when possible), fit and score every
    detector, and return the result; no result file is written.

    Under torchrun every rank extracts a shard and only rank 0 scores: the other ranks return None."""
    config = experiment.config
    require_writable(Path(config.cache_dir), "cache directory (--cache-dir)")
    topology, device_name = init_from_environment(config.device)
    if not topology.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports
    device = resolve_device(device_name)
    model = load_model(experiment, device, topology)
    image_sets = ImageSets(experiment, model.transform)
    # every folder is listed before anything is extracted, so a missing OOD set fails in seconds
    train = image_sets.dataset(config.train_data, "train")
    test_sets, id_name, ood_names = image_sets.test_sets()
    bank_size = len(bank_indices(len(train), config.bank_ratio, config.seed))
    detectors = build_detectors(experiment, model, bank_size, len(train))
    check_bootstrap_duration(config, len(test_sets[id_name]), [len(test_sets[name]) for name in ood_names],
                             len(detectors))

    extraction = Extraction(config, model, device, topology)
    train_name = image_sets.label(config.train_data, "train")
    bank_raw = extraction.bank(train, train_name, config, bank_size)
    test_raws = {name: extraction.test_set(name, dataset) for name, dataset in test_sets.items()}
    if not topology.is_main:
        return None

    bank, outputs = detector_inputs(model.backbone, model.react_percentile, bank_raw, test_raws, device,
                                    f"{train_name} bank")
    id_accuracy = 100 * (outputs[id_name]["logits"].argmax(dim=1) == outputs[id_name]["labels"]).float().mean().item()
    identity = {"model": model.name, "train_data": train_name, "id_data": id_name,
                "checkpoint": model.checkpoint_name}
    scores = {name: {} for name in outputs}
    rows: list[ResultRow] = []
    averages: list[AverageRow] = []
    for table_name, detector in detectors.items():
        detector.fit(bank)
        for name, set_outputs in outputs.items():
            scores[name][table_name] = detector.score_samples(set_outputs).cpu().numpy()
        detector_rows, detector_averages = score_detector(table_name, scores, id_name, ood_names, identity,
                                                          id_accuracy, config)
        rows += detector_rows
        averages += detector_averages

    broken_images = {raw.entry: list(raw.broken) for raw in (bank_raw, *test_raws.values()) if raw.broken}
    provenance = {**environment(device), "skipped_files": image_sets.skipped_files, "broken_images": broken_images,
                  "subsets": image_sets.subset_notes()}
    run_scores = RunScores(id_name, list(detectors), {name: np.array(raw.image_ids, dtype=str)
                                                      for name, raw in test_raws.items()},
                           {id_name: scores[id_name], **{name: scores[name] for name in ood_names}})
    return ExperimentResult(config, tuple(rows), tuple(averages), run_scores, id_accuracy, provenance,
                            image_sets.reader_notes())


