"""OpenOOD v1.5's CIFAR backbone: its ResNet18_32x32 checkpoints load strictly and compute what OpenOOD computes.

The reference restates, with functional ops on the checkpoint's own tensors, OpenOOD's
`openood/networks/resnet18_32x32.py` (ResNet18_32x32.forward(return_feature=True)) and its default test
preprocessing for CIFAR (`openood/evaluation_api/preprocessor.py`: Resize(pre_size 32, bilinear),
CenterCrop(32), ToTensor, Normalize with its CIFAR-10 / CIFAR-100 mean and std). `scripts/eval_ood.py` loads
`s<seed>/best.ckpt` with `net.load_state_dict(torch.load(...))`, strictly, so a checkpoint is a plain state dict.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image
from torch import Tensor
from torchvision import transforms

from errors import UserError
from models import ModelConfig, TransformConfig, build_backbone
from pipeline.config.loading import load_model_config
from tests.checkpoints import write_openood_resnet18_32x32_checkpoint

# openood/evaluation_api/preprocessor.py, default_preprocessing_dict (the same numbers as
# openood/preprocessors/transform.py's normalization_dict)
OPENOOD_NORMALIZATION = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
}
BENCHMARKS = {"openood-resnet18-cifar10": ("cifar10", 10), "openood-resnet18-cifar100": ("cifar100", 100)}
CONFIG = ModelConfig(name="openood-resnet18", architecture="resnet18_32x32", checkpoint="best.ckpt",
                     checkpoint_format="state_dict", num_classes=10,
                     transform=TransformConfig(resize=32, crop=32))


@torch.no_grad()
def openood_reference(weights: dict[str, Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """ResNet18_32x32 in eval mode: a 3x3 stride-1 stem (no max-pool), four stages of two basic blocks whose
    first block strides 1, 2, 2, 2; a shortcut of 1x1 conv + BN where the shape changes; ReLU after the sum;
    features = the average pool of the last stage; logits = fc(features)."""
    def batch_norm(x: Tensor, name: str) -> Tensor:
        return F.batch_norm(x, weights[f"{name}.running_mean"], weights[f"{name}.running_var"],
                            weights[f"{name}.weight"], weights[f"{name}.bias"], training=False, eps=1e-5)

    x = F.relu(batch_norm(F.conv2d(images, weights["conv1.weight"], stride=1, padding=1), "bn1"))
    for layer, stride in enumerate([1, 2, 2, 2], start=1):
        for block, block_stride in enumerate([stride, 1]):
            name = f"layer{layer}.{block}"
            out = F.relu(batch_norm(F.conv2d(x, weights[f"{name}.conv1.weight"], stride=block_stride, padding=1),
                                    f"{name}.bn1"))
            out = batch_norm(F.conv2d(out, weights[f"{name}.conv2.weight"], padding=1), f"{name}.bn2")
            changes_shape = block_stride != 1 or x.shape[1] != out.shape[1]
            shortcut = (batch_norm(F.conv2d(x, weights[f"{name}.shortcut.0.weight"], stride=block_stride),
                                   f"{name}.shortcut.1") if changes_shape else x)
            x = F.relu(out + shortcut)
    features = x.mean(dim=(2, 3))  # (N, 512)
    return features, F.linear(features, weights["fc.weight"], weights["fc.bias"])


def openood_transform(benchmark: str) -> transforms.Compose:
    """OpenOOD's TestStandardPreProcessor for cifar10 / cifar100 (pre_size 32, img_size 32)."""
    mean, std = OPENOOD_NORMALIZATION[benchmark]
    return transforms.Compose([
        transforms.Lambda(lambda image: image.convert("RGB")),
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def photographs() -> list[Image.Image]:
    """RGB photographs at CIFAR's own size and at the sizes of OpenOOD's OOD sets (larger, non-square), and smaller."""
    china, flower = (Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg"))
    return [china.resize((32, 32)), flower.resize((32, 32)), china.resize((500, 333)),
            flower.crop((150, 0, 450, 427)), china.crop((0, 200, 640, 360)), flower.resize((24, 20))]


def smooth_images(count: int, seed: int = 0) -> Tensor:
    """(count, 3, 32, 32) images with image-level structure, so pooled features differ from image to image."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    return 2 * F.interpolate(coarse, size=32, mode="bilinear") + torch.randn(count, 3, 1, 1, generator=generator)


def assert_varies_across_images(values: Tensor) -> None:
    """No two images give nearly the same vector, so equal outputs cannot come from inputs being ignored."""
    distances = torch.cdist(values, values) / values.norm(dim=1).mean()
    assert distances[~torch.eye(len(values), dtype=torch.bool)].min() > 0.05


def assert_relatively_close(actual: Tensor, expected: Tensor, tolerance: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("num_classes", [10, 100])
@torch.no_grad()
def test_openood_checkpoint_gives_openood_features_and_logits(tmp_path, num_classes):
    weights = write_openood_resnet18_32x32_checkpoint(tmp_path / "best.ckpt", num_classes=num_classes, seed=1)
    images = smooth_images(6)
    expected_features, expected_logits = openood_reference(weights, images)

    backbone = build_backbone(dataclasses.replace(CONFIG, num_classes=num_classes), tmp_path)
    features, logits = backbone(images)

    assert not backbone.training and backbone.feature_dim == 512 and logits.shape == (6, num_classes)
    assert_varies_across_images(expected_features)
    assert_varies_across_images(expected_logits)
    assert_relatively_close(features, expected_features)
    assert_relatively_close(logits, expected_logits)
    torch.testing.assert_close(backbone.classifier(features), logits)


@pytest.mark.parametrize("model_name", list(BENCHMARKS))
@torch.no_grad()
def test_shipped_config_preprocesses_and_computes_as_openood(tmp_path, model_name):
    """The YAML's transform on photographs, then its backbone on a checkpoint in OpenOOD's folder layout."""
    benchmark, num_classes = BENCHMARKS[model_name]
    config = load_model_config(model_name)
    assert (config.architecture, config.num_classes) == ("resnet18_32x32", num_classes)
    assert config.checkpoint == f"{benchmark}_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt"
    checkpoint = tmp_path / "pretrained" / config.checkpoint
    checkpoint.parent.mkdir(parents=True)
    weights = write_openood_resnet18_32x32_checkpoint(checkpoint, num_classes=num_classes, seed=2)

    ours, reference = config.transform.build(), openood_transform(benchmark)
    inputs = torch.stack([ours(image) for image in photographs()])
    expected_inputs = torch.stack([reference(image) for image in photographs()])
    features, logits = build_backbone(config, tmp_path / "pretrained")(inputs)
    expected_features, expected_logits = openood_reference(weights, expected_inputs)

    torch.testing.assert_close(inputs, expected_inputs, rtol=0, atol=1e-6)
    assert_varies_across_images(expected_features)
    assert_relatively_close(features, expected_features)
    assert_relatively_close(logits, expected_logits)


def test_checkpoint_saved_from_data_parallel_loads_the_same_weights(tmp_path):
    weights = write_openood_resnet18_32x32_checkpoint(tmp_path / "best.ckpt", data_parallel=True)
    assert all(key.startswith("module.") for key in torch.load(tmp_path / "best.ckpt", weights_only=True))

    backbone = build_backbone(CONFIG, tmp_path)

    torch.testing.assert_close(backbone.model.state_dict(), weights, rtol=0, atol=0)


@pytest.fixture(scope="module")
def openood_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tensor]:
    """A CIFAR-10 ResNet18_32x32 state dict in OpenOOD's names (read-only: tests edit copies)."""
    return write_openood_resnet18_32x32_checkpoint(tmp_path_factory.mktemp("openood") / "best.ckpt")


def resave(weights: dict[str, Tensor], folder: Path, edit: Callable[[dict[str, Tensor]], object]) -> None:
    """A copy of `weights` with `edit` applied, saved as folder/best.ckpt."""
    edited = dict(weights)
    edit(edited)
    torch.save(edited, folder / "best.ckpt")


def test_checkpoint_missing_a_batch_norm_statistic_is_refused(tmp_path, openood_weights):
    resave(openood_weights, tmp_path, lambda weights: weights.pop("layer2.0.shortcut.1.running_var"))
    with pytest.raises(UserError, match=r"layer2\.0\.shortcut\.1\.running_var$") as error:  # the last thing listed
        build_backbone(CONFIG, tmp_path)
    assert "'resnet18_32x32'" in str(error.value) and "1 missing" in str(error.value)


def test_checkpoint_with_a_shortcut_where_openood_has_none_is_refused(tmp_path, openood_weights):
    resave(openood_weights, tmp_path,
           lambda weights: weights.update({"layer1.0.shortcut.0.weight": torch.zeros(64, 64, 1, 1)}))
    with pytest.raises(UserError, match=r"layer1\.0\.shortcut\.0\.weight$") as error:  # the last thing listed
        build_backbone(CONFIG, tmp_path)
    assert "1 unexpected" in str(error.value)


def test_torchvision_resnet18_is_not_openood_resnet18(tmp_path):
    """torchvision's ImageNet ResNet-18 (7x7 stride-2 stem, 'downsample' shortcuts) does not load as this one."""
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "best.ckpt")
    with pytest.raises(UserError) as error:
        build_backbone(CONFIG, tmp_path)
    message = str(error.value)
    for value in ("15 missing", "layer2.0.shortcut.0.weight", "18 unexpected", "layer2.0.downsample.0.weight",
                  "mis-shaped", "conv1.weight (64, 3, 7, 7)", "(64, 3, 3, 3)"):  # counts, first keys, shapes
        assert value in message
