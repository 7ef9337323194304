"""Backbones: a classifier cut at its penultimate feature, the input of the head that computes its logits.

The pipeline caches each image's feature once; logits are later derived from the cache with the head
(`Backbone.outputs`), so an architecture is only a model and the names of its head's parts: registered by hand
below (the paper's), or any torchvision or timm classifier by name (`models.libraries`), whose head is the
nn.Linear that computes the model's output.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from errors import UserError, did_you_mean
from models.checkpoints import CHECKPOINT_FORMATS, check_state_dict, match_model_keys, read_state_dict
from models.libraries import (TIMM, ArchitectureBuilder, is_library_architecture, library_builder, timm_transform,
                              timm_version, torchvision_weights, weights_transform)
from models.openood_resnet18 import ResNet18_32x32
from models.react import apply_react
from models.transforms import TransformConfig
from registry import Registry


@dataclass(frozen=True)
class TrainingRecipe:
    """How to train the model at start-up when it ships no checkpoint (the offline demo's small CNN)."""
    dataset: str                       # configs/datasets/<dataset>.yaml; its "train" split is used
    epochs: int = 20                   # passes over the train split
    batch_size: int = 64               # images per step
    learning_rate: float = 1e-3        # Adam's step size
    seed: int = 0                      # initialisation and shuffling


@dataclass(frozen=True)
class ModelConfig:
    """One configs/models/<name>.yaml: which architecture, which weights, how to preprocess."""
    name: str                          # CLI name, the YAML file's stem
    architecture: str                  # registered in ARCHITECTURES, or torchvision/<builder>, or timm/<model>[.<tag>]
    checkpoint: str = ""               # file name looked up in the pretrained dir and the torch hub cache, or a path
    checkpoint_format: str = "state_dict"  # layout of the file: state_dict (plain or wrapped) | supcon
    checkpoint_url: str = ""           # where users download the checkpoint; shown when it is missing
    weights: str = ""                  # torchvision weights name: its transform, file and URL fill what is not set
    head: tuple[str, ...] = ()         # submodules from the feature to the logits, in order; () = found
    num_classes: int = 1000            # outputs of the classifier
    react_percentile: float | None = None  # ReAct clip quantile of the bank features in (0, 1); None = no clipping
    transform: TransformConfig | None = None  # evaluation preprocessing; None = the weights' or timm's, else default
    train: TrainingRecipe | None = None  # no checkpoint: train at start-up with this recipe, cache the weights

    def __post_init__(self) -> None:
        architecture_builder(self.architecture)
        CHECKPOINT_FORMATS.get(self.checkpoint_format)
        object.__setattr__(self, "head", (self.head,) if isinstance(self.head, str) else tuple(self.head))
        if self.weights:
            weights = torchvision_weights(self.architecture, self.weights)
            for key, value in [("transform", weights_transform(weights)), ("checkpoint", Path(weights.url).name),
                               ("checkpoint_url", weights.url)]:
                if not getattr(self, key):
                    object.__setattr__(self, key, value)
        if self.transform is None:
            object.__setattr__(self, "transform", timm_transform(self.architecture)
                               if self.architecture.startswith(TIMM) else TransformConfig())
        if self.num_classes < 1:
            raise UserError(f"model '{self.name}': num_classes must be positive, got {self.num_classes}")
        if not self.checkpoint and self.train is None:
            raise UserError(f"model '{self.name}': set 'checkpoint' (a weights file), 'weights' (torchvision's) "
                            f"or 'train' (a recipe)")
        if self.react_percentile is not None and not 0 < self.react_percentile < 1:
            raise UserError(f"model '{self.name}': react_percentile must be in (0, 1) or null, "
                            f"got {self.react_percentile}")

    def cache_key(self, checkpoint_sha256: str) -> dict:
        """What the features depend on besides the images: the model's name, its architecture (which fixes the
        feature definition, e.g. the ViT's class token before or after the final LayerNorm), the weights file's
        checksum, the transform, and where set, the head's parts and timm's version."""
        key = {"model": self.name, "architecture": self.architecture, "checkpoint_sha256": checkpoint_sha256,
               "transform": dataclasses.asdict(self.transform)}
        if self.head:
            key["head"] = list(self.head)
        if self.architecture.startswith(TIMM):
            key["timm"] = timm_version()
        return key


# The hand-registered architectures: (num_classes, image_size) -> (torchvision model, its classifier head). The
# head names the submodules that map the penultimate features to logits, in the order they run: one name
# ("fc"), or several when the paper's feature is taken earlier than the torchvision head's input (the ViT's
# final LayerNorm). A new feature definition needs a new architecture name: the feature cache keys on it.
ARCHITECTURES: Registry[ArchitectureBuilder] = Registry("architecture")


def architecture_builder(name: str) -> ArchitectureBuilder:
    """The builder of a registered, `torchvision/` or `timm/` architecture; a UserError for an unknown one."""
    return library_builder(name) if is_library_architecture(name) else ARCHITECTURES.get(name)


@ARCHITECTURES.register("resnet50")
def _resnet50(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str]]:
    return torchvision.models.resnet50(num_classes=num_classes), ("fc",)


@ARCHITECTURES.register("regnet_y_16gf")
def _regnet_y_16gf(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str]]:
    return torchvision.models.regnet_y_16gf(num_classes=num_classes), ("fc",)


@ARCHITECTURES.register("vit_b_16")
def _vit_b_16(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str]]:
    """Feature: the class token after the encoder's final LayerNorm (torchvision's head input; OpenOOD's)."""
    return torchvision.models.vit_b_16(num_classes=num_classes, image_size=image_size), ("heads",)


@ARCHITECTURES.register("vit_b_16_pre_ln")
def _vit_b_16_pre_ln(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str, str]]:
    """Feature: the class token before the final LayerNorm; logits = head(LayerNorm(feature)) (the paper's code).

    Moving the LayerNorm after the class-token selection changes nothing: it normalises each token alone."""
    return (torchvision.models.vit_b_16(num_classes=num_classes, image_size=image_size),
            ("encoder.ln", "heads"))


@ARCHITECTURES.register("mobilenet_v2")
def _mobilenet_v2(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str]]:
    # the head is Dropout -> Linear; the dropout is a no-op in eval mode
    return torchvision.models.mobilenet_v2(num_classes=num_classes), ("classifier",)


@ARCHITECTURES.register("resnet18_32x32")
def _resnet18_32x32(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str]]:
    """OpenOOD v1.5's CIFAR ResNet-18 in its own parameter names; feature: the pooled 512-d input of fc."""
    return ResNet18_32x32(num_classes), ("fc",)


def _input_as_output(module: nn.Module, inputs: tuple, output: object) -> Tensor:
    """A forward hook that makes `module` pass its input through, as nn.Identity would."""
    return inputs[0]


class Backbone(nn.Module):
    """A classifier cut at its head: `features` gives the raw penultimate features (the rows the cache stores),
    `outputs` the features and logits of cached rows. The model is used as given, never edited: while
    `features` runs, hooks make the head's parts pass their input through."""

    def __init__(self, model: nn.Module, head: tuple[str, ...], feature_dim: int) -> None:
        super().__init__()
        self.model = model
        self.head = head
        parts = [model.get_submodule(name) for name in head]
        self.classifier: nn.Module = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
        self.feature_dim = feature_dim  # D: what detectors see
        self.row_dim = feature_dim      # the width of a cached row

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, row_dim) cache rows: here, raw features before any ReAct clip."""
        hooks = [self.model.get_submodule(name).register_forward_hook(_input_as_output) for name in self.head]
        try:
            return self.model(images)
        finally:
            for hook in hooks:
                hook.remove()

    def outputs(self, rows: Tensor, clip: float | None = None) -> tuple[Tensor, Tensor]:
        """Cached rows -> features (N, D), clipped at `clip` (ReAct) when given, and their logits (N, C)."""
        features = rows if clip is None else apply_react(rows, clip)
        return features, self.classifier(features)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) -> features (N, D) and logits (N, num_classes)."""
        return self.outputs(self.features(images))


def find_head(model: nn.Module, image_size: int | tuple[int, int], head: tuple[str, ...] = ()
              ) -> tuple[tuple[str, ...], int]:
    """The head's submodule names (`head`, or when empty the nn.Linear whose output is the model's) and the
    feature width, checked by forwarding one blank image on the model's device (on "meta": no arithmetic).

    UserError, before any extraction, for a head that holds no or several nn.Linear, is not the last step of
    the forward, or takes another width than the feature has."""
    device = next(model.parameters()).device
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.zeros(1, 3, height, width, device=device)
    named = dict(model.named_modules())
    for name in head:
        if name not in named or not name:
            raise UserError(f"head '{name}' is not a submodule of {type(model).__name__}"
                            f"{did_you_mean(name, [key for key in named if key])}")
    outputs: dict[str, object] = {}
    watched = head[-1:] or [name for name, module in named.items() if isinstance(module, nn.Linear)]
    hooks = [named[name].register_forward_hook(partial(_record_output, outputs, name)) for name in watched]
    try:
        with torch.inference_mode():
            logits = _forward(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UserError(f"{type(model).__name__}'s forward returns {shape}, not (N, num_classes) logits")
    last = [name for name, output in outputs.items() if output is logits]
    if not last:
        problem = (f"the head's last part '{head[-1]}' does not compute the model's output" if head else
                   "no nn.Linear computes the model's output, so there is no penultimate feature before it")
        raise UserError(f"{type(model).__name__}: {problem}; name the head's submodules with 'head'")
    head = head or tuple(last[-1:])
    linears = [module for name in head for module in named[name].modules() if isinstance(module, nn.Linear)]
    if len(linears) != 1:
        raise UserError(f"head {list(head)} of {type(model).__name__} must hold exactly one nn.Linear, found "
                        f"{len(linears)}; name the submodules from the feature to the logits")
    linear_inputs: list[Tensor] = []
    hook = linears[0].register_forward_pre_hook(lambda module, inputs: linear_inputs.append(inputs[0]))
    try:
        with torch.inference_mode():
            features = Backbone(model, head, 0).features(images)
    except RuntimeError:  # the Linear, which still runs under the pass-through hooks, refused the input's width
        features = linear_inputs[-1] if linear_inputs else torch.empty(0)
    finally:
        hook.remove()
    if features.ndim != 2 or features.shape[1] != linears[0].in_features:
        raise UserError(f"head {list(head)} of {type(model).__name__}: its nn.Linear takes "
                        f"{linears[0].in_features}-wide inputs, but the feature before it has shape "
                        f"{tuple(features.shape)}; name the submodules from the feature to the logits")
    return head, linears[0].in_features


def _record_output(outputs: dict[str, object], name: str, module: nn.Module, inputs: tuple, output: object) -> None:
    outputs[name] = output


def _forward(model: nn.Module, images: Tensor) -> object:
    """model(images), a UserError when the architecture cannot take images of this size."""
    try:
        return model(images)
    except (RuntimeError, ValueError, AssertionError) as error:  # a size check, a shape mismatch
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        height, width = images.shape[2:]
        raise UserError(f"{type(model).__name__} cannot forward {height}x{width} images (the transform's "
                        f"output): {reason}") from None


def resolve_checkpoint(config: ModelConfig, pretrained_dir: Path) -> Path:
    """The checkpoint file: the path as given, else in `pretrained_dir`, else in the torch hub cache (where
    torchvision's own downloads go)."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [Path(config.checkpoint).expanduser(), Path(pretrained_dir) / config.checkpoint,
                  hub_dir / config.checkpoint]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    source = (f"download it from {config.checkpoint_url} and put it in {pretrained_dir} as {config.checkpoint}"
              if config.checkpoint_url else f"{Path(pretrained_dir) / 'README.md'} and the model's YAML say where to "
                                            f"get it")
    raise UserError(f"checkpoint '{config.checkpoint}' of model '{config.name}' not found in {pretrained_dir} "
                    f"nor in the torch hub cache {hub_dir}; {source}")


def build_backbone(config: ModelConfig, pretrained_dir: Path) -> Backbone:
    """The configured architecture with its checkpoint loaded strictly, in eval mode; its head is checked before
    the checkpoint is looked for."""
    build = partial(architecture_builder(config.architecture), config.num_classes, config.transform.crop)
    model, head = _build_uninitialised(build)
    head, feature_dim = find_head(model.eval(), config.transform.crop, config.head or head)
    checkpoint = resolve_checkpoint(config, pretrained_dir)
    expected = model.state_dict()
    state_dict = match_model_keys(read_state_dict(checkpoint, config.checkpoint_format), expected)
    check_state_dict(expected, state_dict, f"checkpoint {checkpoint} does not fit architecture "
                                           f"'{config.architecture}'")
    # assign=True keeps the checkpoint's tensors, so cast them as a copying load would (a float16 file -> float32)
    model.load_state_dict({key: tensor.to(expected[key].dtype) if key in expected else tensor
                           for key, tensor in state_dict.items()}, strict=True, assign=True)
    if any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()]):
        # buffers no checkpoint holds (timm's non-persistent ones) are computed when the model is built
        model = build()[0]
        model.load_state_dict(state_dict, strict=True)
    return Backbone(model, head, feature_dim).eval()


def _build_uninitialised(build: Callable[[], tuple[nn.Module, tuple[str, ...]]]
                         ) -> tuple[nn.Module, tuple[str, ...]]:
    """The architecture on the meta device, with no random initialisation to overwrite (builders that compute
    with tensors while building, as torchvision's RegNet widths, are built on the CPU and moved there)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        model, head = build()
        return model.to("meta"), head
