"""One experiment, top to bottom: datasets -> backbone -> cached features -> detectors -> metrics."""
from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloaders import ImageDataset, bank_indices, build_dataset, subset_indices
from errors import UserError
from models import Backbone, ModelConfig, apply_react, build_backbone, file_sha256, react_threshold, resolve_checkpoint
from ood_detectors.bootstrap import bootstrap_averages
from ood_detectors.metrics import ood_metrics
from pipeline.averages import run_averages
from pipeline.config import (ExperimentConfig, build_detector, display_name, load_dataset_config,
                             load_model_config)
from pipeline.distributed import Topology, barrier, init_from_environment
from pipeline.extract import ExtractionSettings, FeatureExtractor, SameImages
from pipeline.plots import score_plot_writers
from pipeline.provenance import environment
from pipeline.report import OOD_METRICS, average_row, interval_columns, write_results
from pipeline.scores import SCORES_FILE, scores_writer
from pipeline.train import trained_checkpoint

log = logging.getLogger(__name__)


BOOTSTRAP_SEED = 0  # the intervals' resampling: fixed, so a rerun gives the same files


@dataclass(frozen=True)
class RawFeatures:
    """Cached penultimate features (before any clipping) and labels of one image set."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray    # (N,) int64, -1 = unlabelled
    image_ids: list[str]  # (N,) the dataset's ids of these rows


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


def model_outputs(raw: RawFeatures, classifier: torch.nn.Module, clip: float | None,
                  device: torch.device, name: str) -> dict[str, torch.Tensor]:
    """What detectors see: L2-normalised features and logits of the (ReAct-clipped) raw features."""
    features = torch.from_numpy(raw.features).to(device)
    bad_rows = int((~torch.isfinite(features)).any(dim=1).sum())
    if bad_rows:
        raise UserError(f"{name}: {bad_rows} of {len(features)} feature rows are NaN or inf "
                        f"(check the images and weights, then re-extract with a fresh --cache-dir)")
    if clip is not None:
        features = apply_react(features, clip)
    with torch.inference_mode():
        logits = classifier(features)
    bad_rows = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad_rows:
        raise UserError(f"{name}: {bad_rows} of {len(logits)} rows of logits are NaN or inf although the features "
                        f"are finite (check the classifier's weights in the checkpoint)")
    return {"feas": torch.nn.functional.normalize(features, dim=1), "logits": logits,
            "labels": torch.from_numpy(raw.labels).to(device)}


def model_cache_key(config: ModelConfig, checkpoint_sha256: str) -> dict:
    """What a model's cached features depend on besides the images: its name, its architecture (which fixes
    the feature definition, e.g. the ViT's class token before or after the final LayerNorm), the weights and
    the transform."""
    return {"model": config.name, "architecture": config.architecture, "checkpoint_sha256": checkpoint_sha256,
            "transform": dataclasses.asdict(config.transform)}


class Experiment:
    """Extracts what the config names (each image set once, from the cache when possible) and scores it."""

    def __init__(self, config: ExperimentConfig, topology: Topology = Topology()) -> None:
        self.config = config
        self.topology = topology
        self.device = resolve_device(config.device)
        self.data_root = Path(config.data_root).expanduser()
        self.model_config: ModelConfig = load_model_config(config.model)
        if config.checkpoint:
            self.model_config = dataclasses.replace(self.model_config, checkpoint=config.checkpoint, train=None)
        self.checkpoint_name = self.model_config.checkpoint  # as configured: results.csv's checkpoint column
        if self.model_config.train is not None:
            if not topology.is_main:
                barrier(topology)  # rank 0 trains; the others then find its cached weights
            weights = trained_checkpoint(self.model_config, self.data_root, Path(config.cache_dir), self.device)
            if topology.is_main:
                barrier(topology)
            self.model_config = dataclasses.replace(self.model_config, checkpoint=str(weights),
                                                    checkpoint_format="torchvision")
            self.checkpoint_name = f"trained at start-up ({weights.name})"  # not the cache's absolute path
        checkpoint = resolve_checkpoint(self.model_config, Path(config.pretrained_dir))
        self.backbone: Backbone = build_backbone(self.model_config, Path(config.pretrained_dir))
        self.transform = self.model_config.transform.build()
        model_key = model_cache_key(self.model_config, file_sha256(checkpoint))
        settings = ExtractionSettings(self.device, config.batch_size, config.num_workers, config.amp,
                                      config.channels_last, config.chunk_size, config.recompute,
                                      config.skip_broken_images,
                                      self.model_config.transform if config.gpu_decode else None,
                                      verify_image_content=config.verify_image_content)
        self.extractor = FeatureExtractor(self.backbone, model_key, Path(config.cache_dir), settings, topology)
        self.skipped_files: dict[str, list[str]] = {}
        self.broken_images: dict[str, list[str]] = {}  # cache label -> ids of images skipped as undecodable
        self.subset_sizes: dict[tuple[str, str], tuple[int, int]] = {}  # (dataset, split) -> (kept, of) images
        # filled by run(), for the plots: scores per detector (and OOD set), metrics as fractions
        self.id_scores: dict[str, np.ndarray] = {}
        self.ood_scores: dict[str, dict[str, np.ndarray]] = {}
        self.metrics: dict[str, dict[str, dict[str, float]]] = {}
        self.average_rows: list[dict] = []  # averages.csv: each detector's averages over OOD sets, with intervals
        self.id_name = ""  # the ID test set's name in the tables (with its subset size, if cut)
        self.image_ids: dict[str, list[str]] = {}  # test set name -> ids of the images scored, in score order

    def _dataset(self, name: str, split: str) -> ImageDataset:
        dataset_config = load_dataset_config(name)
        if self.config.skip_broken_images and dataset_config.format == "image_list":
            # an image list can name files that are gone: with the flag they are skipped and counted too
            dataset_config = dataclasses.replace(dataset_config,
                                                 options={**dataset_config.options, "skip_missing": True})
        try:
            dataset = build_dataset(dataset_config, split, self.data_root, self.transform, self.config.download)
        except UserError as error:
            if self.data_root.is_dir():
                raise
            raise UserError(f"the data root {self.data_root} does not exist (set --data-root): {error}") from None
        if dataset.skipped:
            self.skipped_files[f"{display_name(name)}/{split}"] = dataset.skipped
        count = self.config.subsets.get(display_name(name))
        if count is not None and count < len(dataset):
            self.subset_sizes[(display_name(name), split)] = (count, len(dataset))
            dataset = dataset.subset(subset_indices(dataset.labels, count))
        return dataset

    def label(self, name: str, split: str) -> str:
        """A dataset's name in tables, plots and the cache: display_name, plus "[kept]" when cut to a subset
        (cifar10[2000]), so a debug run's rows never pass for the full set's."""
        sizes = self.subset_sizes.get((display_name(name), split))
        return display_name(name) + (f"[{sizes[0]}]" if sizes else "")

    def subset_notes(self) -> list[str]:
        """One line per subset read, e.g. 'cifar10 test: 2000 of 10000 images'."""
        return [f"{name} {split}: {kept} of {total} images"
                for (name, split), (kept, total) in self.subset_sizes.items()]

    def bank(self, train: ImageDataset, size: int) -> RawFeatures:
        """The first `size` = int(N * bank_ratio) images of the train split in the bank's order: a
        RandomState(seed) permutation (the paper's code), or with bank_order "list" the split's own order (OpenOOD's
        NNGuide, which takes the first batches of its unshuffled train list).

        The cache entry holds the whole order's features as far as extracted, so a larger bank extends a smaller one;
        images that the cached banks of other seeds (or the list order) hold are copied from them, not forwarded."""
        name = self.label(self.config.train_data, "train")
        key, label, order = self._train_order(train, name, self.config.bank_order, self.config.seed)
        same_images = [SameImages(other_key, other_label, train, other_order)
                       for other_key, other_label, other_order in self._cached_train_orders(train, name)
                       if other_label != label]
        ordered = train if self.config.bank_order == "list" else train.subset(order)
        return self._raw_features(ordered, key, label, size, order, same_images)

    def _train_order(self, train: ImageDataset, name: str, bank_order: str, seed: int
                     ) -> tuple[dict, str, np.ndarray]:
        """The train split in a bank order: its cache key, its entry's label and the order (indices into `train`)."""
        common = {"dataset": name, "split": "train", "images": train.fingerprint()}
        if bank_order == "list":
            return {**common, "order": "dataset"}, f"{name}-train-in-order", np.arange(len(train))
        return ({**common, "order": f"RandomState({seed}).permutation"}, f"{name}-train-seed{seed}",
                bank_indices(len(train), 1.0, seed))

    def _cached_train_orders(self, train: ImageDataset, name: str) -> list[tuple[dict, str, np.ndarray]]:
        """`_train_order` of every bank order of this train split with an entry in the cache (other seeds' banks)."""
        orders = []
        for label in self.extractor.cached_labels():
            if label == f"{name}-train-in-order":
                orders.append(self._train_order(train, name, "list", 0))
            elif (match := re.fullmatch(re.escape(f"{name}-train-seed") + r"(\d+)", label)):
                orders.append(self._train_order(train, name, "random", int(match.group(1))))
        return orders

    def test_set(self, name: str, dataset: ImageDataset) -> RawFeatures:
        """`name` is the set's display name: the cache entry's folder is named after it, under the cache dir."""
        key = {"dataset": name, "split": "test", "images": dataset.fingerprint(), "order": "dataset"}
        return self._raw_features(dataset, key, f"{name}-test", len(dataset))

    def _raw_features(self, dataset: ImageDataset, key: dict, label: str, num_rows: int,
                      order: np.ndarray | None = None, same_images: Sequence[SameImages] = ()) -> RawFeatures:
        """Features and labels of dataset[:num_rows], without the images skipped as undecodable (`order` and
        `same_images`: see FeatureExtractor.extract)."""
        extracted = self.extractor.extract(dataset, key, label, num_rows, order, same_images)
        labels = dataset.labels[:num_rows]
        if not extracted.broken_rows:
            return RawFeatures(extracted.features, labels, dataset.image_ids[:num_rows])
        self.broken_images[label] = [dataset.image_ids[row] for row in extracted.broken_rows]
        kept = np.setdiff1d(np.arange(num_rows), extracted.broken_rows)
        return RawFeatures(extracted.features[kept], labels[kept], [dataset.image_ids[row] for row in kept])

    def run(self) -> list[dict]:
        """One result row per (OOD set, detector), metrics and ID accuracy in percent."""
        config = self.config
        # every folder is listed before anything is extracted, so a missing OOD set fails in seconds
        train = self._dataset(config.train_data, "train")
        given_names = list(dict.fromkeys([config.id_data, *config.ood_data]))
        if len(set(map(display_name, given_names))) < len(given_names):
            clashing = sorted(given for given in given_names
                              if [display_name(other) for other in given_names].count(display_name(given)) > 1)
            raise UserError(f"datasets {', '.join(clashing)} would share one name in the table and the cache; "
                            f"rename one of the YAML files")
        datasets = {given: self._dataset(given, "test") for given in given_names}
        names = {given: self.label(given, "test") for given in given_names}
        test_sets = {names[given]: dataset for given, dataset in datasets.items()}
        id_name, ood_names = names[config.id_data], [names[given] for given in config.ood_data]
        warn_about_ood_sets_equal_to_the_id_set(test_sets, id_name, ood_names)
        bank_size = len(bank_indices(len(train), config.bank_ratio, config.seed))
        detectors = {}
        for table_name, detector_config in config.detectors.items():
            k = detector_config.get("k")
            if isinstance(k, int) and k > bank_size:
                raise UserError(f"detector '{table_name}': k={k} is larger than the bank ({bank_size} images = "
                                f"{config.bank_ratio} x {len(train)}); lower k or raise bank_ratio")
            detectors[table_name] = detector = build_detector(table_name, detector_config)
            try:  # what fit would refuse after extraction, refused before it
                detector.check_feature_dim(self.backbone.feature_dim)
                detector.check_bank_size(bank_size)
            except ValueError as error:
                raise UserError(f"detector '{table_name}': {error} (model '{self.model_config.name}': "
                                f"{self.backbone.feature_dim}-d features; bank: {bank_size} images)") from None
        bank_raw = self.bank(train, bank_size)
        test_raws = {name: self.test_set(name, dataset) for name, dataset in test_sets.items()}
        if not self.topology.is_main:  # the other torchrun ranks only help extract
            return []
        id_raw = test_raws[id_name]
        ood_raws = {name: test_raws[name] for name in ood_names}
        self.id_name = id_name
        self.image_ids = {name: raw.image_ids for name, raw in test_raws.items()}

        clip = None
        if self.model_config.react_percentile is not None:
            clip = react_threshold(bank_raw.features, self.model_config.react_percentile)
            log.info("ReAct: clipping features at %.4f, the %.2f quantile of the bank", clip,
                     self.model_config.react_percentile)
        classifier = self.backbone.classifier.to(self.device)
        train_name = self.label(config.train_data, "train")
        bank = model_outputs(bank_raw, classifier, clip, self.device, f"{train_name} bank")
        id_outputs = model_outputs(id_raw, classifier, clip, self.device, id_name)
        ood_outputs = {name: model_outputs(raw, classifier, clip, self.device, name) for name, raw in ood_raws.items()}
        id_accuracy = 100 * (id_outputs["logits"].argmax(dim=1) == id_outputs["labels"]).float().mean().item()

        rows = []
        averages = run_averages(ood_names)
        for table_name, detector in detectors.items():
            detector.fit(bank)
            id_scores = detector.score_samples(id_outputs)
            self.id_scores[table_name] = id_scores.cpu().numpy()
            detector_rows = {}
            for ood_name, outputs in ood_outputs.items():
                ood_scores = detector.score_samples(outputs)
                metrics = ood_metrics(id_scores, ood_scores)
                self.ood_scores.setdefault(ood_name, {})[table_name] = ood_scores.cpu().numpy()
                self.metrics.setdefault(ood_name, {})[table_name] = metrics
                detector_rows[ood_name] = {"model": self.model_config.name, "train_data": train_name,
                                           "id_data": id_name, "ood_data": ood_name, "detector": table_name,
                                           **{name: 100 * metrics[name] for name in OOD_METRICS},
                                           "id_acc": id_accuracy, "checkpoint": self.checkpoint_name}
            # one set of resamples for all OOD sets, each drawing the ID images once: every set's interval and
            # every average's
            intervals = (bootstrap_averages(id_scores, {name: self.ood_scores[name][table_name] for name in ood_names},
                                            [sets for _, sets in averages], config.bootstrap, BOOTSTRAP_SEED,
                                            config.ci_level) if config.bootstrap else {})
            rows += [{**row, **interval_columns(intervals.get((name,), {}))} for name, row in detector_rows.items()]
            self.average_rows += [average_row([detector_rows[name] for name in sets], label, intervals.get(sets, {}))
                                  for label, sets in averages]
        return rows


def warn_about_ood_sets_equal_to_the_id_set(test_sets: dict[str, ImageDataset], id_name: str,
                                             ood_names: list[str]) -> None:
    """An OOD set holding the same images as the ID set scores 50% AUROC by construction: say so."""
    for name in ood_names:
        if name == id_name or test_sets[name].fingerprint() == test_sets[id_name].fingerprint():
            log.warning("OOD set '%s' holds the same images as the ID set '%s': every detector will score about "
                        "50%% AUROC on it; was another set meant?", name, id_name)


def require_writable(folder: Path, what: str) -> None:
    """Create `folder` and a probe file in it, so an unwritable folder fails before any extraction."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{what} {folder} is not writable ({error.strerror}); choose another folder") from None


def run_experiment(config: ExperimentConfig) -> tuple[list[dict], str]:
    """Run the experiment and write its results; returns the rows and the terminal table.

    Under torchrun every rank extracts a shard; only rank 0 scores, writes and returns a table."""
    require_writable(Path(config.output_dir), "output directory (--output-dir)")
    require_writable(Path(config.cache_dir), "cache directory (--cache-dir)")
    topology, device = init_from_environment(config.device)
    if not topology.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports
    experiment = Experiment(dataclasses.replace(config, device=device), topology)
    rows = experiment.run()
    if not topology.is_main:
        return rows, ""
    provenance = {**environment(experiment.device),
                  # non-image files in flat folders, and image-list entries missing with --skip-broken-images
                  "skipped_files": {name: len(files) for name, files in experiment.skipped_files.items()},
                  "broken_images": experiment.broken_images,
                  "subsets": experiment.subset_notes()}
    plots = (score_plot_writers(experiment.id_name, experiment.id_scores, experiment.ood_scores,
                                metrics=experiment.metrics) if config.plots else {})
    scores = {SCORES_FILE: scores_writer(experiment.id_name, experiment.id_scores, experiment.ood_scores,
                                         experiment.image_ids)}
    notes = ([f"Subsets, not the full sets (a debug run; seeded, stratified by class): "
              f"{'; '.join(experiment.subset_notes())}."] if experiment.subset_sizes else [])
    table = write_results(Path(config.output_dir), rows, config.to_dict(), provenance,
                          extra_files={**scores, **plots}, notes=notes, averages=experiment.average_rows)
    return rows, table
