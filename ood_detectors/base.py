"""The detector interface (fit / score_samples, as scikit-learn names them), input checks and the registry."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from sklearn.exceptions import NotFittedError

Outputs = Mapping[str, torch.Tensor]  # "feas" (N, D), "logits" (N, C), "labels" (N,)

_FLOAT_FIELDS = ("feas", "logits")
UNIT_NORM_TOLERANCE = 1e-3  # |row norm - 1| allowed in "feas" (float32/float64); see unit_norm_tolerance
_NORM_CHUNK_ROWS = 16384  # rows whose norms are taken at once: bounds the float32 copy of half-precision feas


@dataclasses.dataclass(eq=False)
class OODDetector:
    """Base class: dataclass fields are hyper-parameters; learned state ends with `_` and is set by `fit`.

    Subclasses name the output fields they read in `fit_fields` / `score_fields` and implement
    `_fit(outputs)` and `_score(outputs) -> Tensor (N,)`, with higher meaning more in-distribution.
    """

    fit_fields: ClassVar[tuple[str, ...]] = ("logits",)
    score_fields: ClassVar[tuple[str, ...]] = ("logits",)

    def fit(self, train_outputs: Outputs) -> "OODDetector":
        """Learn whatever the score needs from the bank (the training sample); returns self."""
        outputs = check_outputs(train_outputs, self.fit_fields, where=f"{self.name}.fit")
        if "feas" in outputs:
            self.check_feature_dim(outputs["feas"].shape[1])
        self.check_bank_size(next(iter(outputs.values())).shape[0])
        self._fit(outputs)
        self.dims_ = {field: outputs[field].shape[1] for field in _FLOAT_FIELDS if field in outputs}
        return self

    def score_samples(self, outputs: Outputs) -> torch.Tensor:
        """Scores of shape (N,) on the input's device; higher = more in-distribution."""
        if not hasattr(self, "dims_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(train_outputs) first")
        checked = check_outputs(outputs, self.score_fields, where=f"{self.name}.score_samples", dims=self.dims_)
        return self._score(checked)

    def check_feature_dim(self, dim: int) -> None:
        """Raise a ValueError if the hyper-parameters cannot work on `dim`-wide features; `fit` calls it, and a
        pipeline can call it as soon as the feature width is known, before extracting anything."""

    def check_bank_size(self, bank_size: int) -> None:
        """Raise a ValueError if the hyper-parameters cannot work on a bank of `bank_size` samples; called by `fit`
        and, like check_feature_dim, callable before extraction."""

    def hyper_parameters(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @property
    def name(self) -> str:
        return _NAMES.get(type(self), type(self).__name__)

    def _fit(self, outputs: Outputs) -> None:
        """Most confidence scores learn nothing."""

    def _score(self, outputs: Outputs) -> torch.Tensor:
        raise NotImplementedError


def check_outputs(outputs: Outputs, fields: tuple[str, ...], where: str,
                  dims: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The named fields as tensors, after checking presence, shapes, dtypes, finiteness, unit norm of `feas` and
    the dims seen at fit; ValueError naming the field otherwise."""
    if not isinstance(outputs, Mapping):
        raise ValueError(f"{where}: outputs must be a dict of tensors, got {type(outputs).__name__}")
    checked: dict[str, torch.Tensor] = {}
    for field in fields:
        if field not in outputs:
            raise ValueError(f"{where}: outputs lack '{field}' (has: {', '.join(map(str, outputs)) or 'nothing'})")
        value = outputs[field]
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: '{field}' must be a torch.Tensor, got {type(value).__name__}")
        if field == "labels":
            if tensor.ndim != 1 or tensor.is_floating_point():
                raise ValueError(f"{where}: 'labels' must be a 1-D integer tensor, "
                                 f"got {tensor.dtype} {tuple(tensor.shape)}")
        else:
            if tensor.ndim != 2 or not tensor.is_floating_point():
                raise ValueError(f"{where}: '{field}' must be a 2-D float tensor (N, dim), "
                                 f"got {tensor.dtype} {tuple(tensor.shape)}")
            if dims is not None and field in dims and tensor.shape[1] != dims[field]:
                raise ValueError(f"{where}: '{field}' has dimension {tensor.shape[1]} but the detector was "
                                 f"fitted on dimension {dims[field]} (shape {tuple(tensor.shape)})")
            bad_rows = (~torch.isfinite(tensor)).any(dim=1).sum().item()
            if bad_rows:
                raise ValueError(f"{where}: '{field}' has NaN or inf in {bad_rows} of {tensor.shape[0]} rows")
        if tensor.shape[0] == 0:
            raise ValueError(f"{where}: '{field}' is empty (shape {tuple(tensor.shape)})")
        if field == "feas":
            check_unit_rows(tensor, field, where)
        checked[field] = tensor
    lengths = {field: tensor.shape[0] for field, tensor in checked.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: fields disagree on the number of samples: {lengths}")
    return checked


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a row norm of L2-normalised `dtype` features may be: UNIT_NORM_TOLERANCE (1e-3), or twice
    the dtype's epsilon where coarser (float16 2.0e-3, bfloat16 1.6e-2), since half-precision normalisation rounds
    each norm by about one epsilon."""
    return max(UNIT_NORM_TOLERANCE, 2 * torch.finfo(dtype).eps)


def check_unit_rows(tensor: torch.Tensor, field: str, where: str) -> None:
    """ValueError naming the count and norm range of rows whose norm is not within `unit_norm_tolerance` of 1
    (all-zero rows counted apart): an unnormalised feature silently rescales every score that reads it."""
    norms = torch.cat([torch.linalg.vector_norm(chunk.float(), dim=1)
                       for chunk in tensor.split(_NORM_CHUNK_ROWS)])                  # (N,)
    tolerance = unit_norm_tolerance(tensor.dtype)
    bad_rows = int(((norms - 1).abs() > tolerance).sum())
    if not bad_rows:
        return
    zero_rows = int((norms == 0).sum())
    zero_note = (f"; {zero_rows} of them are all zero, which no normalisation fixes (drop them or check the "
                 f"feature extractor)" if zero_rows else "")
    raise ValueError(f"{where}: '{field}' must be L2-normalised (every row norm within {tolerance:.1e} of 1 for "
                     f"{tensor.dtype}), but {bad_rows} of {tensor.shape[0]} rows are not (row norms from "
                     f"{norms.min().item():.4g} to {norms.max().item():.4g}){zero_note}; L2-normalise the features, "
                     f"e.g. torch.nn.functional.normalize({field}, dim=1)")


# ---- registry: detector name -> class, filled by @register_detector at import -------------------------
_DETECTORS: dict[str, type[OODDetector]] = {}
_NAMES: dict[type, str] = {}
DetectorClass = TypeVar("DetectorClass", bound=type[OODDetector])


def register_detector(name: str) -> Callable[[DetectorClass], DetectorClass]:
    """Class decorator: make the detector available to `create_detector(name)`."""
    def add(cls: DetectorClass) -> DetectorClass:
        if name in _DETECTORS:
            raise KeyError(f"detector '{name}' is registered twice")
        _DETECTORS[name], _NAMES[cls] = cls, name
        return cls
    return add


def available_detectors() -> list[str]:
    return sorted(_DETECTORS)


def create_detector(name: str, **hyper_parameters: Any) -> OODDetector:
    """A new, unfitted detector; unknown names and hyper-parameters are ValueErrors listing the valid ones."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector '{name}'{did_you_mean(name, _DETECTORS)}; "
                         f"valid: {', '.join(available_detectors())}")
    cls = _DETECTORS[name]
    valid = [field.name for field in dataclasses.fields(cls)]
    for key in hyper_parameters:
        if key not in valid:
            raise ValueError(f"detector '{name}' has no hyper-parameter '{key}'{did_you_mean(key, valid)}; "
                             f"valid: {', '.join(valid) or 'none'}")
    return cls(**hyper_parameters)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close. Case is ignored first
    ('K' -> 'k'), then in the fuzzy match, where one letter's case would otherwise count as a typo."""
    choices = list(choices)
    same_but_case = [choice for choice in choices if choice.lower() == name.lower()]
    by_lowercase = {choice.lower(): choice for choice in choices}
    close = same_but_case or [by_lowercase[match] for match in
                              difflib.get_close_matches(name.lower(), by_lowercase, n=1, cutoff=0.5)]
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_positive_int(value: Any, what: str) -> None:
    """Hyper-parameter check shared by the detectors: a positive int, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
