"""Random-initialised checkpoints in the real file layouts, so tests never need downloaded weights."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from models.small_cnn import SmallCNN


def write_supcon_checkpoint(path: Path, seed: int = 0, num_classes: int = 1000,
                            data_parallel: bool = False) -> dict[str, Tensor]:
    """A resnet50 saved as the SupCon training scripts save it; returns the torchvision state dict it holds.

    `data_parallel` adds the 'module.' that nn.DataParallel puts inside the encoder's names.
    """
    torch.manual_seed(seed)
    state_dict = _randomised_state_dict(torchvision.models.resnet50(num_classes=num_classes))
    save_as_supcon(state_dict, path, data_parallel)
    return state_dict


def write_small_cnn_supcon_checkpoint(path: Path, seed: int = 0, num_classes: int = 1000) -> dict[str, Tensor]:
    """The demo's small CNN (models/small_cnn.py: 128-d features, classifier `fc`), random-initialised and saved
    in SupCon's layout like write_supcon_checkpoint's ResNet-50; returns the state dict it holds."""
    torch.manual_seed(seed)
    state_dict = _randomised_state_dict(SmallCNN(num_classes))
    save_as_supcon(state_dict, path, architecture="small_cnn")
    return state_dict


def write_torchvision_checkpoint(path: Path, architecture: str, seed: int = 0, num_classes: int = 1000,
                                 **model_kwargs: object) -> dict[str, Tensor]:
    """A torchvision model's plain state dict (as on download.pytorch.org); returns that state dict.

    `model_kwargs` go to the torchvision builder, e.g. image_size=32 for vit_b_16.
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(architecture, num_classes=num_classes, **model_kwargs)
    state_dict = _randomised_state_dict(model)
    torch.save(state_dict, path)
    return state_dict


def write_openood_resnet18_32x32_checkpoint(path: Path, num_classes: int = 10, seed: int = 0,
                                            data_parallel: bool = False) -> dict[str, Tensor]:
    """OpenOOD v1.5's CIFAR `best.ckpt`: the `net.state_dict()` of its ResNet18_32x32; returns that state dict.

    Written from OpenOOD's layout (conv1, bn1, layer<1-4>.<0-1>.{conv1,bn1,conv2,bn2}, shortcut.0 / shortcut.1
    where a block changes shape, fc), not from models/, so a test of our module checks its names. Every float
    tensor is random, BatchNorm statistics included; convolutions are He-scaled so activations stay in range.
    `data_parallel` saves the names with the 'module.' prefix of nn.DataParallel."""
    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, Tensor] = {}

    def uniform(low: float, high: float, size: int) -> Tensor:
        return low + (high - low) * torch.rand(size, generator=generator)

    def conv(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        fan_in = in_channels * kernel * kernel
        state_dict[f"{name}.weight"] = (torch.randn(out_channels, in_channels, kernel, kernel, generator=generator)
                                        * (2 / fan_in) ** 0.5)

    def batch_norm(name: str, channels: int) -> None:
        state_dict.update({f"{name}.weight": uniform(0.5, 1.5, channels),
                           f"{name}.bias": uniform(-0.2, 0.2, channels),
                           f"{name}.running_mean": uniform(-0.1, 0.1, channels),
                           f"{name}.running_var": uniform(0.5, 1.5, channels),
                           f"{name}.num_batches_tracked": torch.tensor(0)})

    conv("conv1", 64, 3, 3)
    batch_norm("bn1", 64)
    in_channels = 64
    for layer, (channels, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        for block, block_stride in enumerate([stride, 1]):
            name = f"layer{layer}.{block}"
            conv(f"{name}.conv1", channels, in_channels, 3)
            batch_norm(f"{name}.bn1", channels)
            conv(f"{name}.conv2", channels, channels, 3)
            batch_norm(f"{name}.bn2", channels)
            if block_stride != 1 or in_channels != channels:
                conv(f"{name}.shortcut.0", channels, in_channels, 1)
                batch_norm(f"{name}.shortcut.1", channels)
            in_channels = channels
    state_dict["fc.weight"] = torch.randn(num_classes, 512, generator=generator) / 512 ** 0.5
    state_dict["fc.bias"] = uniform(-0.1, 0.1, num_classes)
    prefix = "module." if data_parallel else ""
    torch.save({prefix + key: tensor for key, tensor in state_dict.items()}, path)
    return state_dict


def _randomised_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Random BatchNorm statistics too, so a test notices buffers that were not loaded."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@torch.no_grad()
def lifelike_state_dict(model: nn.Module, calibration_images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """The model's weights made to behave like trained ones, so feature comparisons cannot pass blind.

    Random initialisation leaves BatchNorm statistics at 0 / 1 (activations then blow up and drown every
    input difference) and many tensors constant (LayerNorm, biases, the ViT's zero head and class token).
    Every tensor that is constant gets noise, then each BatchNorm's running statistics are set to the batch
    statistics of `calibration_images` (N, 3, H, W), as after training on real images."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
            scale = max(1.0, float(tensor.flatten()[0].abs()))
            tensor.add_(0.1 * scale * torch.randn(tensor.shape, generator=generator))
    batch_norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for module in batch_norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
    if batch_norms:
        model.train()
        model(calibration_images)
    for module in batch_norms:
        module.momentum = 0.1
    return model.eval().state_dict()


def save_as_supcon(state_dict: dict[str, Tensor], path: Path, data_parallel: bool = False,
                   architecture: str = "resnet50") -> None:
    """Saves a torchvision resnet50 state dict (or another model's whose classifier is `fc`) as the SupCon
    training scripts do: the network under 'encoder.' ('encoder.module.' with `data_parallel`), the classifier
    as 'fc.', a projection 'head.' from the feature width."""
    encoder = "encoder.module." if data_parallel else "encoder."
    width = state_dict["fc.weight"].shape[1]
    projection_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 128))
    model_state_dict = {(key if key.startswith("fc.") else encoder + key): tensor
                        for key, tensor in state_dict.items()}
    model_state_dict |= {f"head.{key}": tensor for key, tensor in projection_head.state_dict().items()}
    opt = argparse.Namespace(model=architecture, dataset="imagenet", method="SupCon", learning_rate=0.5,
                             temp=0.1, batch_size=1024, epochs=700)
    torch.save({"opt": opt, "model_state_dict": model_state_dict, "epoch": 700}, path)
