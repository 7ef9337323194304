"""Typed, validated configuration: YAML files under configs/ parsed into dataclasses, plus CLI overrides.

Every mistake is a UserError naming the file, the key and the closest valid key. Nothing here is global:
`resolve_experiment` returns a fresh ExperimentConfig that the rest of the pipeline only reads.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
import yaml

from dataloaders import DatasetConfig
from errors import UserError, did_you_mean
from models import ModelConfig
from ood_detectors import OODDetector, create_detector

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
Config = TypeVar("Config")


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
    gpu_decode: bool = False                      # decode JPEGs on the GPU (nvJPEG): faster loading, last digits change
    verify_image_content: bool = False            # hash every image read; cached rows of changed images recomputed
    bootstrap: int = 1000                         # resamples of each metric's confidence interval; 0 = none
    ci_level: float = 0.95                        # the intervals' level
    # dataset (display) name -> images kept of each split read (seeded, stratified; a debug run, not the benchmark)
    subsets: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [(self.batch_size > 0, "batch_size", "a positive integer"),
                  (self.num_workers >= 0, "num_workers", "zero or more"),
                  (0 < self.bank_ratio <= 1, "bank_ratio", "in (0, 1]"),
                  (0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32), what numpy's RandomState takes"),
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


# the detectors a run compares when none are named: the paper's table rows (run.sh's default list too)
DEFAULT_DETECTORS = ("nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd")


def display_name(name: str) -> str:
    """A model's or dataset's short name for tables, plots and folders: its registry name, or a YAML path's stem."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def default_output_dir(model: str, id_data: str) -> str:
    """logs/<model>/<ID set>: run.sh's layout, so a run's folder is its own and pipeline.aggregate reads it."""
    return str(Path("logs") / display_name(model) / display_name(id_data))


# ---- YAML -> dataclass -----------------------------------------------------------------------------

def check_device_name(name: str) -> None:
    """A device string torch knows ("auto", "cpu", "cuda", "cuda:1", ...), checked before any work starts."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'device': unknown device {name!r}; use auto, cpu, cuda or cuda:<index>") from None


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping via safe_load; syntax errors name the file and line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a folder; give a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not a text file (not UTF-8); give a YAML file") from None
    except PermissionError:
        raise UserError(f"config file {path} cannot be read (permission denied)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def from_mapping(cls: type[Config], data: Mapping[str, Any], source: str) -> Config:
    """Build dataclass `cls` from `data`, checking unknown and missing keys and every value's type."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    for key in data:
        if key not in fields:
            raise UserError(f"{source}: unknown key '{key}'{did_you_mean(str(key), fields)}; "
                            f"valid keys: {', '.join(fields)}")
    missing = [name for name, field in fields.items() if name not in data
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{source}: missing key(s): {', '.join(missing)}")
    values = {key: _coerce(value, hints[key], f"{source}: key '{key}'") for key, value in data.items()}
    try:
        return cls(**values)
    except UserError as error:  # a value the class itself rejects (its __post_init__): say which file
        message = str(error)
        raise UserError(message if message.startswith(source) else f"{source}: {message}") from None


def _coerce(value: Any, expected: Any, where: str) -> Any:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return from_mapping(expected, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected in (str, bool) and isinstance(value, expected):
        return value
    raise UserError(f"{where} must be {getattr(expected, '__name__', expected)}, got {value!r}")


# ---- named configs under configs/ --------------------------------------------------------------------

def available(kind: str) -> list[str]:
    """Names of the YAML files in configs/<kind>/."""
    return sorted(path.stem for path in (CONFIG_ROOT / kind).glob("*.yaml"))


def _named_config_path(kind: str, name: str, what: str) -> Path:
    """configs/<kind>/<name>.yaml, or `name` itself when it is a path to a YAML file."""
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise UserError(f"{what} config file not found: {name}")
        return Path(name)
    path = CONFIG_ROOT / kind / f"{name}.yaml"
    if not path.is_file():
        choices = available(kind)
        raise UserError(f"unknown {what} '{name}'{did_you_mean(name, choices)}; valid: {', '.join(choices)} "
                        f"(add one as {CONFIG_ROOT / kind / (name + '.yaml')})")
    return path


def load_model_config(name: str) -> ModelConfig:
    path = _named_config_path("models", name, "model")
    return from_mapping(ModelConfig, {"name": path.stem, **load_yaml(path)}, str(path))


def load_dataset_config(name: str) -> DatasetConfig:
    path = _named_config_path("datasets", name, "dataset")
    return from_mapping(DatasetConfig, {"name": path.stem, **load_yaml(path)}, str(path))


def load_detector_config(name: str) -> dict[str, Any]:
    """{"detector": registered name, **hyper-parameters} from configs/detectors/<name>.yaml."""
    path = _named_config_path("detectors", name, "detector")
    data = load_yaml(path)
    if not isinstance(data.get("detector"), str):
        raise UserError(f"{path}: missing key 'detector' (the registered detector this config sets up)")
    return data


# ---- the experiment: defaults <- --config YAML <- CLI flags <- --set -------------------------------

def resolve_experiment(experiment_file: Path | None, flags: Mapping[str, Any], overrides: list[str],
                       default_subfolder: str = "") -> ExperimentConfig:
    """Merge an experiment YAML, the CLI flags that were given, and `--set key.path=value` overrides.

    Without an output_dir anywhere, results go to default_output_dir(model, ID set)/`default_subfolder`."""
    merged: dict[str, Any] = {}
    source = "command line"
    if experiment_file is not None:
        merged.update(load_yaml(experiment_file))
        source = f"{experiment_file} + command line"
    merged.update({key: value for key, value in flags.items() if value is not None})
    merged.setdefault("detectors", list(DEFAULT_DETECTORS))
    if isinstance(merged.get("detectors"), list):
        merged["detectors"] = dict(_detector_entry(item) for item in merged["detectors"])
    for override in overrides:
        _apply_override(merged, override)
    if default_subfolder and not merged.get("output_dir") and all(
            isinstance(merged.get(key), str) for key in ("model", "id_data")):
        merged["output_dir"] = str(Path(default_output_dir(merged["model"], merged["id_data"])) / default_subfolder)
    config = from_mapping(ExperimentConfig, merged, source)
    # fail now, not after hours of extraction: every name must exist and every hyper-parameter be valid
    for table_name, detector_config in config.detectors.items():
        build_detector(table_name, detector_config)
    load_model_config(config.model)
    for name in dict.fromkeys([config.train_data, config.id_data, *config.ood_data]):
        load_dataset_config(name)
    return config


def _detector_entry(item: Any) -> tuple[str, dict[str, Any]]:
    """A detectors list item: a config name, or {name: {hyper-parameter: value}} overriding that config."""
    if isinstance(item, str):
        return item, load_detector_config(item)
    if isinstance(item, dict) and len(item) == 1:
        ((name, changes),) = item.items()
        if isinstance(changes, dict):
            return name, {**load_detector_config(name), **changes}
    raise UserError(f"detectors: expected a name or {{name: {{hyper-parameter: value}}}}, got {item!r}")


def build_detector(table_name: str, detector_config: dict[str, Any]) -> OODDetector:
    """An unfitted detector from its config entry {"detector": registered name, **hyper-parameters}."""
    if not isinstance(detector_config, dict) or not isinstance(detector_config.get("detector"), str):
        raise UserError(f"detector '{table_name}': expected a mapping with a 'detector' key, got {detector_config!r}")
    hyper_parameters = {key: value for key, value in detector_config.items() if key != "detector"}
    try:
        return create_detector(detector_config["detector"], **hyper_parameters)
    except ValueError as error:
        where = "" if table_name == detector_config["detector"] else f"detector '{table_name}': "
        raise UserError(f"{where}{error}") from None


def _apply_override(merged: dict[str, Any], override: str) -> None:
    """`a.b.c=value`: set merged[a][b][c], the value parsed as YAML (so 10 is an int, 0.5 a float)."""
    path, sep, raw_value = override.partition("=")
    if not sep or not path:
        raise UserError(f"--set '{override}': expected key.path=value, e.g. detectors.nnguide.k=100")
    keys = path.split(".")
    try:
        value = yaml.safe_load(raw_value)
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
