"""YAML files parsed into typed dataclasses: unknown and missing keys and wrong types are UserErrors naming the
file and key; named configs (configs/<kind>/<name>.yaml) are found by name or by path."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from dataloaders import DatasetConfig
from errors import UserError, did_you_mean
from models import ModelConfig

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


Config = TypeVar("Config")


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (where the later would silently win) and
    aliases (`*name`: no config needs them, and nested ones expand exponentially while the file is read)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor}: aliases are not allowed in configs",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (lines "
                                                        f"{first_lines[key]} and {line})", key_node.start_mark)
            first_lines[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """`text` parsed as YAML by the strict safe loader (no repeated keys, no aliases)."""
    return yaml.load(text, Loader=_StrictLoader)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping via the strict safe loader; syntax errors, repeated keys and aliases name the file and line."""
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
        data = parse_yaml(text)
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
    if origin is tuple and args[-1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
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
