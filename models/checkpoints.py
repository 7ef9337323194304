"""Weights files: read safely (tensors only, never pickled code) and turned into the model's state dict.

Read: a `torch.save` file (zip or legacy pickle) with `weights_only=True`, or a `.safetensors` file. Layouts
(`checkpoint_format`): `state_dict` takes a plain state dict or one wrapped as training scripts save it
({"state_dict": ...} as PyTorch Lightning writes, {"model": ...}), with nn.DataParallel's `module.` and a
wrapper's common first name part (Lightning's `model.`) removed when the keys need it; `supcon` takes SupCon's
training output. Every load is strict: a missing, extra or mis-shaped tensor is an error listing the first few.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from errors import UserError
from registry import Registry

# The keys under which training scripts nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")

# A checkpoint format: (loaded file, its path) -> state dict in the model's own parameter names (a common
# first name part that the model lacks is removed later, by `match_model_keys`).
StateDictReader = Callable[[object, Path], dict[str, Tensor]]
CHECKPOINT_FORMATS: Registry[StateDictReader] = Registry("checkpoint format")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks; the feature cache keys on the weights' checksum."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def read_state_dict(path: Path, checkpoint_format: str) -> dict[str, Tensor]:
    """The tensors of the weights file at `path`, in the layout `checkpoint_format` names."""
    return CHECKPOINT_FORMATS.get(checkpoint_format)(_read_file(path), path)


def _read_file(path: Path) -> object:
    """A safetensors file's tensors, or torch.load that unpickles only tensors, plain containers and
    argparse.Namespace (SupCon saves its `opt`)."""
    with path.open("rb") as file:
        start = file.read(9)
    if _is_safetensors(start):
        try:
            return safetensors.torch.load_file(path)
        except safetensors.SafetensorError as error:
            raise UserError(f"{path} is a truncated or corrupt safetensors file ({error}); re-download it") from None
    # torch.save writes a zip archive, or (legacy) a pickle that starts with the PROTO opcode
    if start[:2] != b"PK" and start[:1] != pickle.PROTO:
        raise UserError(f"{path} is not a PyTorch checkpoint (a zip archive or a pickle) nor a safetensors file; "
                        f"re-download it")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"refused to load {path}: {_unpickling_reason(error)} (a checkpoint may hold only "
                        f"tensors, plain containers and argparse.Namespace; save its state dict alone)") from None
    except (RuntimeError, EOFError) as error:
        reason = str(error).split(". ")[0] or "unexpected end of file"
        raise UserError(f"{path} is truncated or corrupt ({reason}); re-download it") from None


def _is_safetensors(start: bytes) -> bool:
    """A safetensors file begins with its JSON header's length (8 bytes, little-endian) and then '{'."""
    return len(start) == 9 and start[8:9] == b"{" and int.from_bytes(start[:8], "little") < 1 << 32


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The useful part of torch's long weights-only error: the refused global, else its last detail line."""
    message = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", message)
    if refused:
        return f"it holds {refused.group(1)}, which is not allowed"
    details = [line.strip() for line in message.split("Check the documentation")[0].splitlines() if line.strip()]
    return details[-1] if details else "unreadable pickle"


@CHECKPOINT_FORMATS.register("state_dict")
def _state_dict(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """A state dict (torchvision, timm, OpenOOD, safetensors), alone or under one of WRAPPER_KEYS."""
    if isinstance(checkpoint, Mapping) and not _tensor_dict_problem(checkpoint):
        return _strip_data_parallel(dict(checkpoint))
    if isinstance(checkpoint, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(checkpoint.get(key), Mapping) and not _tensor_dict_problem(checkpoint[key]):
                return _strip_data_parallel(dict(checkpoint[key]))
    found = (f"keys {_first_few([str(key) for key in checkpoint])}" if isinstance(checkpoint, Mapping)
             else f"a {type(checkpoint).__name__}")
    raise UserError(f"{path} holds no state dict ({found}): expected tensors by parameter name, alone or under "
                    f"{' / '.join(repr(key) for key in WRAPPER_KEYS)}; is checkpoint_format right?")


@CHECKPOINT_FORMATS.register("supcon")
def _supcon_state_dict(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """SupCon training output: model_state_dict = encoder.* (torchvision resnet without fc) + fc.* + head.*."""
    if not isinstance(checkpoint, Mapping) or "model_state_dict" not in checkpoint:
        keys = list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise UserError(f"{path} is not a SupCon checkpoint: no 'model_state_dict' (found {keys}); "
                        f"is checkpoint_format right?")
    model_state_dict = checkpoint["model_state_dict"]
    problem = _tensor_dict_problem(model_state_dict)
    if problem:
        raise UserError(f"{path} is not a SupCon checkpoint: its model_state_dict {problem}; "
                        f"is checkpoint_format right?")
    state_dict = {}
    for key, tensor in _strip_data_parallel(dict(model_state_dict)).items():
        part, _, name = key.partition(".")
        if part == "encoder":
            state_dict[name] = tensor
        elif part != "head":  # the contrastive projection head plays no part in classification
            state_dict[key] = tensor
    return state_dict


def _tensor_dict_problem(candidate: object) -> str:
    """Why `candidate` is not a mapping of tensors, or ''."""
    if not isinstance(candidate, Mapping):
        return f"is a {type(candidate).__name__}"
    if not candidate:
        return "is empty"
    others = [str(key) for key, value in candidate.items() if not isinstance(value, Tensor)]
    return f"has entries that are not tensors: {_first_few(others)}" if others else ""


def _strip_data_parallel(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drops the 'module' name parts that nn.DataParallel adds (at the start or after 'encoder.')."""
    return {".".join(part for part in key.split(".") if part != "module"): tensor
            for key, tensor in state_dict.items()}


def match_model_keys(state_dict: dict[str, Tensor], model_keys: Collection[str]) -> dict[str, Tensor]:
    """`state_dict` with the first name part all its keys share removed (a Lightning module's `model.`), when
    none of its keys is a model key but some become one; else unchanged (the strict check then reports)."""
    firsts = {key.partition(".")[0] for key in state_dict}
    if len(firsts) != 1 or any(key in model_keys for key in state_dict):
        return state_dict
    stripped = {key.partition(".")[2]: tensor for key, tensor in state_dict.items()}
    return stripped if any(key in model_keys for key in stripped) else state_dict


def check_state_dict(expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], problem: str) -> None:
    """UserError listing missing, unexpected and mis-shaped tensors, so a load never leaves layers random."""
    # BatchNorm fills in num_batches_tracked itself for checkpoints saved before the buffer existed
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}"
                 for key, tensor in state_dict.items() if key in expected and tensor.shape != expected[key].shape]
    details = [f"{len(keys)} {kind}: {_first_few(keys)}"
               for kind, keys in [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
               if keys]
    if details:
        raise UserError(f"{problem}; {'; '.join(details)}")


def _first_few(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")
