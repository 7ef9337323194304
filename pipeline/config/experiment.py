"""The experiment config: defaults <- an experiment YAML <- command-line flags <- `--set key.path=value`, checked
once. `resolve_experiment` returns a fresh, frozen ExperimentConfig that the rest of the pipeline only reads."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from dataloaders import DatasetConfig
from dataloaders.bank import SUBSET_SEED
from errors import UserError, did_you_mean
from models import ModelConfig, PythonModel
from ood_detectors import OODDetector, create_detector
from pipeline.config.loading import (from_mapping, load_dataset_config, load_detector_config, load_model_config,
                                     load_yaml, parse_yaml)

@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One run: a model, where its bank / ID / OOD images come from, and the detectors to compare."""

    model: str                                    # configs/models/<model>.yaml (or a path to a model YAML)
    train_data: str                               # dataset whose "train" split the bank is drawn from
    id_data: str                                  # dataset whose "test" split is the in-distribution test set
    ood_data: list[str]                           # datasets whose "test" split is an OOD test set, in table order
    detectors: dict[str, dict[str, Any]]          # table name -> {"detector": registered name, hyper-parameters}
    data_root: str = "~/datasets"                 # folder holding every dataset in its official layout
    output_dir: str = ""                          # results.csv, results.md, config.yaml, plots; "": default_output_dir
    cache_dir: str = "saved_model_outputs"        # extracted features, reused across runs
    pretrained_dir: str = "pretrained_models"     # checkpoints looked up here, then in the torch hub cache
    checkpoint: str = ""                          # another checkpoint of the model (e.g. OpenOOD's s1); "": its YAML's
    device: str = "auto"                          # "auto" = CUDA when available, else CPU; or "cuda:1", "cpu"
    batch_size: int = 64                          # images per forward pass
    num_workers: int = 8                          # DataLoader worker processes
    seed: int = 0                                 # draws the bank: RandomState(seed).permutation of the train split
    bank_ratio: float = 0.01                      # fraction of the train split in the bank; 1.0 = all of it
    bank_order: str = "random"                    # "random": a seeded permutation (the paper); "list": split order
    amp: str = "off"                              # "bf16" autocast for extraction (changes the last digits)
    channels_last: bool = False                   # channels_last memory format for extraction
    download: bool = False                        # let torchvision download CIFAR / SVHN when missing
    chunk_size: int = 10000                       # images per cache file; a restart resumes at this grain
    plots: bool = True                            # score histograms and ROC curves per OOD set, as PNG
    recompute: bool = False                       # delete and re-extract the cache entries this run uses
    skip_broken_images: bool = False              # skip undecodable images (listed in provenance), not stop
    verify_image_content: bool = False            # hash every image read; cached rows of changed images recomputed
    bootstrap: int = 1000                         # resamples of each metric's confidence interval; 0 = none
    ci_level: float = 0.95                        # the intervals' level
    # dataset (display) name -> images kept of each split read (seeded, stratified; a debug run, not the benchmark)
    subsets: dict[str, int] = dataclasses.field(default_factory=dict)
    subset_seed: int = SUBSET_SEED                # draws the subsets (RandomState(subset_seed)); not the bank's seed

    def __post_init__(self) -> None:
        checks = [(self.batch_size > 0, "batch_size", "a positive integer"),
                  (self.num_workers >= 0, "num_workers", "zero or more"),
                  (0 < self.bank_ratio <= 1, "bank_ratio", "in (0, 1]"),
                  (0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32), what numpy's RandomState takes"),
                  (0 <= self.subset_seed < 2**32, "subset_seed",
                   "an integer in [0, 2**32), what numpy's RandomState takes"),
                  (self.amp in ("off", "bf16"), "amp", "'off' or 'bf16'"),
                  (self.bank_order in ("random", "list"), "bank_order", "'random' or 'list'"),
                  (self.bootstrap >= 0, "bootstrap", "zero (no intervals) or a number of resamples"),
                  (0 < self.ci_level < 1, "ci_level", "in (0, 1)"),
                  (self.chunk_size > 0, "chunk_size", "a positive integer"),
                  (len(self.ood_data) > 0, "ood_data", "at least one dataset"),
                  (len(self.detectors) > 0, "detectors", "at least one detector")]
        for ok, key, expected in checks:
            if not ok:
                raise UserError(f"config key '{key}' must be {expected}, got {getattr(self, key)!r}")
        refuse_repeats("ood_data", self.ood_data)
        run_datasets = list(dict.fromkeys(map(display_name, [self.train_data, self.id_data, *self.ood_data])))
        for name, count in self.subsets.items():
            if name not in run_datasets:
                raise UserError(f"config key 'subsets': '{name}' is not a dataset of this run"
                                f"{did_you_mean(name, run_datasets)}; its datasets: {', '.join(run_datasets)}")
            if count <= 0:
                raise UserError(f"config key 'subsets.{name}' must be a positive integer, got {count!r}")
        check_device_name(self.device)
        if not self.output_dir:  # frozen: set once, here, so every way of building a config gets the same folder
            object.__setattr__(self, "output_dir", default_output_dir(self.model, self.id_data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def refuse_repeats(key: str, names: Sequence[str]) -> None:
    """A UserError naming the first name `names` gives twice, and both places: one name, one thing (a repeated
    OOD set would count twice in the averages; a repeated detector's later entry would replace the first)."""
    for position, name in enumerate(names):
        if name in names[:position]:
            raise UserError(f"config key '{key}': '{name}' is given twice (items {names.index(name) + 1} and "
                            f"{position + 1}); give it once")


# the detectors a run compares when none are named: the paper's table rows (run.sh's default list too)
DEFAULT_DETECTORS = ("nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd")


def display_name(name: str) -> str:
    """A model's or dataset's short name for tables, plots and folders: its registry name, or a YAML path's stem."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def default_output_dir(model: str, id_data: str) -> str:
    """logs/<model>/<ID set>: run.sh's layout, so a run's folder is its own and pipeline.tools.aggregate reads it."""
    return str(Path("logs") / display_name(model) / display_name(id_data))


def check_device_name(name: str) -> None:
    """A device string torch knows ("auto", "cpu", "cuda", "cuda:1", ...), checked before any work starts."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # e.g. "meta" holds no data to extract with
        raise UserError(f"config key 'device': device {name!r} cannot run the pipeline; use auto, cpu, cuda or "
                        f"cuda:<index>")


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """One detector of a run: its name in the tables, the registered detector, and its hyper-parameters, which
    `resolve` has checked by building it."""

    name: str
    detector: str
    hyper_parameters: Mapping[str, Any]

    def build(self) -> OODDetector:
        """A new, unfitted detector."""
        return create_detector(self.detector, **self.hyper_parameters)


@dataclasses.dataclass(frozen=True)
class ResolvedExperiment:
    """An ExperimentConfig with every name resolved to its typed config and every hyper-parameter checked, before
    any image is read; the run uses these as they are. `config` is what the user set (config.yaml records it)."""

    config: ExperimentConfig
    model: ModelConfig | PythonModel         # the model's YAML, with the config's `checkpoint` applied, or yours
    datasets: Mapping[str, DatasetConfig | Dataset]  # the train, ID and OOD datasets, by the name the config gives
    detectors: Mapping[str, DetectorSpec]    # by table name, in table order

    def replace(self, **changes: Any) -> ResolvedExperiment:
        """The experiment of the config with `changes` applied, resolved again (with the same Python objects)."""
        model = self.model if isinstance(self.model, PythonModel) else None
        return resolve(dataclasses.replace(self.config, **changes), model,
                       {name: source for name, source in self.datasets.items()
                        if not isinstance(source, DatasetConfig)})


def resolve(config: ExperimentConfig, model: PythonModel | None = None,
            datasets: Mapping[str, Dataset] | None = None) -> ResolvedExperiment:
    """Every name of `config` resolved (a UserError names one that does not exist) and every detector built once
    to check its hyper-parameters: what can fail before extraction fails now, not after hours of it. `model` and
    `datasets` stand for the names they carry."""
    if model is None:
        model_config = load_model_config(config.model)
        if config.checkpoint:
            model_config = dataclasses.replace(model_config, checkpoint=config.checkpoint, train=None)
    elif config.checkpoint:
        raise UserError(f"config key 'checkpoint' names a weights file of a model YAML; the Python model "
                        f"'{model.name}' brings its own weights")
    given = dict(datasets or {})
    sources = {name: given[name] if name in given else load_dataset_config(name)
               for name in dict.fromkeys([config.train_data, config.id_data, *config.ood_data])}
    return ResolvedExperiment(config, model or model_config, sources, {name: detector_spec(name, entry)
                                                                       for name, entry in config.detectors.items()})


def resolve_experiment(experiment_file: Path | str | None, flags: Mapping[str, Any] | None = None,
                       overrides: Sequence[str] = (), default_subfolder: str = "", *,
                       model: PythonModel | None = None, datasets: Mapping[str, Dataset] | None = None
                       ) -> ResolvedExperiment:
    """Merge an experiment YAML, the CLI flags that were given, and `--set key.path=value` overrides, and resolve
    the result. A Python `model` is the run's model (the config's `model` is its name); `datasets` are torch
    Datasets that the config's train_data / id_data / ood_data name (see docs/your-model.md).

    Without an output_dir anywhere, results go to default_output_dir(model, ID set)/`default_subfolder`."""
    merged: dict[str, Any] = {"model": model.name} if model is not None else {}
    source = "command line"
    if experiment_file is not None:
        merged.update(load_yaml(Path(experiment_file)))
        source = f"{experiment_file} + command line"
    merged.update({key: value for key, value in (flags or {}).items() if value is not None})
    merged.setdefault("detectors", list(DEFAULT_DETECTORS))
    if isinstance(merged.get("detectors"), list):
        entries = [_detector_entry(item) for item in merged["detectors"]]
        refuse_repeats("detectors", [name for name, _ in entries])
        merged["detectors"] = dict(entries)
    for override in overrides:
        _apply_override(merged, override)
    if default_subfolder and not merged.get("output_dir") and all(
            isinstance(merged.get(key), str) for key in ("model", "id_data")):
        merged["output_dir"] = str(Path(default_output_dir(merged["model"], merged["id_data"])) / default_subfolder)
    config = from_mapping(ExperimentConfig, merged, source)
    if model is not None and config.model != model.name:
        raise UserError(f"config key 'model' is '{config.model}', but the Python model given is '{model.name}'")
    run_datasets = [config.train_data, config.id_data, *config.ood_data]
    for name, dataset in (datasets or {}).items():
        if name not in run_datasets:
            raise UserError(f"datasets: '{name}' is not a dataset of this run{did_you_mean(name, run_datasets)}; "
                            f"name it in train_data, id_data or ood_data")
        if not isinstance(dataset, Dataset):
            raise UserError(f"datasets: '{name}' must be a torch Dataset, got {type(dataset).__name__}")
    return resolve(config, model, datasets)


def _detector_entry(item: Any) -> tuple[str, dict[str, Any]]:
    """A detectors list item: a config name, or {name: {hyper-parameter: value}} overriding that config."""
    if isinstance(item, str):
        return item, load_detector_config(item)
    if isinstance(item, dict) and len(item) == 1:
        ((name, changes),) = item.items()
        if isinstance(changes, dict):
            return name, {**load_detector_config(name), **changes}
    raise UserError(f"detectors: expected a name or {{name: {{hyper-parameter: value}}}}, got {item!r}")


def detector_spec(table_name: str, detector_config: Mapping[str, Any]) -> DetectorSpec:
    """The spec of a config entry {"detector": registered name, **hyper-parameters}, checked by building it."""
    if not isinstance(detector_config, Mapping) or not isinstance(detector_config.get("detector"), str):
        raise UserError(f"detector '{table_name}': expected a mapping with a 'detector' key, got {detector_config!r}")
    spec = DetectorSpec(table_name, detector_config["detector"],
                        {key: value for key, value in detector_config.items() if key != "detector"})
    try:
        spec.build()
    except ValueError as error:
        where = "" if table_name == spec.detector else f"detector '{table_name}': "
        raise UserError(f"{where}{error}") from None
    return spec


def _apply_override(merged: dict[str, Any], override: str) -> None:
    """`a.b.c=value`: set merged[a][b][c], the value parsed as YAML (so 10 is an int, 0.5 a float)."""
    path, sep, raw_value = override.partition("=")
    if not sep or not path:
        raise UserError(f"--set '{override}': expected key.path=value, e.g. detectors.nnguide.k=100")
    keys = path.split(".")
    try:
        value = parse_yaml(raw_value)
    except yaml.YAMLError:
        raise UserError(f"--set '{override}': the value is not valid YAML") from None
    valid_top = [field.name for field in dataclasses.fields(ExperimentConfig)]
    if keys[0] not in valid_top:
        raise UserError(f"--set '{override}': unknown key '{keys[0]}'{did_you_mean(keys[0], valid_top)}; "
                        f"valid keys: {', '.join(valid_top)}")
    node = merged
    mapping_fields = [name for name, hint in typing.get_type_hints(ExperimentConfig).items()
                      if typing.get_origin(hint) is dict]
    for depth, key in enumerate(keys[:-1]):
        if depth == 0 and key in mapping_fields and key not in node:
            node[key] = {}  # e.g. --set subsets.svhn=500 on a config without subsets
        child = node.get(key)
        if not isinstance(child, dict):
            choices = [str(k) for k in node] if depth else valid_top
            hint = "" if key in choices else did_you_mean(key, choices)
            raise UserError(f"--set '{override}': '{'.'.join(keys[:depth + 1])}' is not set or not a mapping{hint}")
        node = child
    node[keys[-1]] = value
