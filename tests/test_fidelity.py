"""Every shipped backbone computes what the paper's code (or OpenOOD's) computes, side by side.

Each test restates the reference model wrapper, image decoding and transform in its own words, loads the same
lifelike random weights into both sides, and feeds both the same image files (photographs of several sizes and
aspect ratios, greyscale, a small PNG). Our side is the pipeline's own path: the model's YAML in
configs/models/, the checkpoint file in its real format, the dataset registry, the feature extractor with its
cache, and the features and logits the detectors receive.

References: roomo7time/nnguide `model_engines/*.py` (model wrappers; transforms), `dataloaders/factory.py`
(`Image.open`, then RGB conversion when the mode is not RGB); OpenOOD v1.5 `scripts/eval_ood_imagenet.py`
(torchvision weights' own transforms), `openood/networks/{resnet50,vit_b_16}.py` (feature definitions).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image
from torch import Tensor
from torchvision import transforms

from dataloaders import DatasetConfig, build_dataset
from models import ModelConfig, build_backbone, react_threshold
from pipeline.config.loading import load_model_config
from pipeline.features.cache import FeatureEntry
from pipeline.run.scoring import RawFeatures, model_outputs
from pipeline.features.extract import ExtractionSettings, FeatureExtractor
from tests.checkpoints import lifelike_state_dict, save_as_supcon

IMAGENET_NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photographs (scikit-learn's two samples) cut to several sizes and aspect ratios, JPEG and PNG."""
    folder = tmp_path_factory.mktemp("photos")
    china, flower = (Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg"))
    china.resize((500, 333)).save(folder / "a_landscape.jpg", quality=90)
    flower.crop((150, 0, 450, 427)).save(folder / "b_portrait.jpg", quality=85)
    china.crop((100, 50, 356, 306)).convert("L").save(folder / "c_greyscale.jpg")
    flower.resize((48, 32)).save(folder / "d_small.png")
    china.crop((0, 200, 640, 360)).save(folder / "e_panorama.jpg", quality=95)
    return folder


def reference_decode(path: Path) -> Image.Image:
    """The paper's dataset: PIL opens the file; images whose mode is not RGB are converted to RGB."""
    image = Image.open(path)
    return image if image.mode == "RGB" else image.convert("RGB")


def reference_inputs(folder: Path, transform: Callable) -> Tensor:
    """The files in name order (the paper's `natsorted(os.listdir(...))`; our names sort alike), transformed."""
    return torch.stack([transform(reference_decode(folder / name)) for name in sorted(os.listdir(folder))])


def paper_resnet_transform() -> transforms.Compose:
    """The DATA_TRANSFORM of the paper's resnet50_supcon.py and resnet50_react.py."""
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               IMAGENET_NORMALIZE])


@torch.no_grad()
def supcon_reference(weights: dict[str, Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """KNN-OOD's SupCon ResNet-50 (`backbones/resnet50_supcon.py`), restated with functional ops on the
    checkpoint's own 'encoder.'/'fc.' tensors: features = flattened average pool of layer4; logits = fc."""
    def batch_norm(x: Tensor, name: str) -> Tensor:
        return F.batch_norm(x, weights[f"{name}.running_mean"], weights[f"{name}.running_var"],
                            weights[f"{name}.weight"], weights[f"{name}.bias"], training=False, eps=1e-5)

    x = F.conv2d(images, weights["encoder.conv1.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(batch_norm(x, "encoder.bn1")), kernel_size=3, stride=2, padding=1)
    for layer, (blocks, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 2)], start=1):
        for block in range(blocks):
            name, block_stride = f"encoder.layer{layer}.{block}", stride if block == 0 else 1
            out = F.relu(batch_norm(F.conv2d(x, weights[f"{name}.conv1.weight"]), f"{name}.bn1"))
            out = F.conv2d(out, weights[f"{name}.conv2.weight"], stride=block_stride, padding=1)
            out = batch_norm(F.conv2d(F.relu(batch_norm(out, f"{name}.bn2")), weights[f"{name}.conv3.weight"]),
                             f"{name}.bn3")
            shortcut = x
            if f"{name}.downsample.0.weight" in weights:
                shortcut = batch_norm(F.conv2d(x, weights[f"{name}.downsample.0.weight"], stride=block_stride),
                                      f"{name}.downsample.1")
            x = F.relu(out + shortcut)
    features = x.mean(dim=(2, 3))
    return features, F.linear(features, weights["fc.weight"], weights["fc.bias"])


@torch.no_grad()
def torchvision_head_input_reference(model: torch.nn.Module, head: str, images: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's wrappers for ResNet-50, RegNet and MobileNet: the torchvision model with its head
    (`fc`, or MobileNet's Dropout + Linear `classifier`) replaced by an identity; logits = head(features)."""
    head_module = model.get_submodule(head)
    model.set_submodule(head, torch.nn.Identity())
    features = model.eval()(images)
    return features, head_module.eval()(features)


@torch.no_grad()
def paper_vit_reference(model: torchvision.models.VisionTransformer, images: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's ViT wrapper: `encoder.ln` and `heads` replaced by identities, so the features are the class
    token before the final LayerNorm; logits = head(ln(features))."""
    final_norm, head = model.encoder.ln, model.heads.head
    model.encoder.ln, model.heads = torch.nn.Identity(), torch.nn.Identity()
    features = model.eval()(images)
    return features, head(final_norm(features))


@torch.no_grad()
def openood_vit_reference(model: torchvision.models.VisionTransformer, images: Tensor) -> tuple[Tensor, Tensor]:
    """OpenOOD's ViT_B_16.forward(return_feature=True): patch embedding, class token, the whole encoder (its
    final LayerNorm included), the class token as the feature; logits = heads(feature)."""
    model.eval()
    tokens = model._process_input(images)
    tokens = torch.cat([model.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    features = model.encoder(tokens)[:, 0]
    return features, model.heads(features)


@torch.no_grad()
def openood_resnet_reference(model: torchvision.models.ResNet, images: Tensor) -> tuple[Tensor, Tensor]:
    """OpenOOD's ResNet50.forward(return_feature=True): the stem and four stages, average pool, flattened;
    logits = fc(feature)."""
    model.eval()
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(x)))))
    features = x.view(x.shape[0], -1)
    return features, model.fc(features)


@torch.no_grad()
def paper_react_reference(model: torchvision.models.ResNet, bank_images: Tensor, images: Tensor
                          ) -> tuple[Tensor, float, Tensor, Tensor]:
    """The paper's resnet50_react.py: torchvision ResNet-50 with fc replaced by an identity; `apply_react` runs it
    over the bank and takes np.quantile of all its feature units at react_percentile (0.95 in its
    configs/model/resnet50-react.yaml); the encoder then ends in a clip at that value, so both the features
    and the logits (fc of them) are clipped. Returns (raw features, threshold, clipped features, logits)."""
    fc = model.fc
    model.fc = torch.nn.Identity()
    model.eval()
    threshold = float(np.quantile(model(bank_images).numpy(), 0.95))
    raw = model(images)
    clipped = raw.clip(max=threshold)
    return raw, threshold, clipped, fc(clipped)


@dataclasses.dataclass(frozen=True)
class Reference:
    """How the reference code builds the network, preprocesses an image, and computes (features, logits)
    from a checkpoint file; `forward` is None for ReAct, whose bank pass is restated in the test."""
    network: Callable[[], torch.nn.Module]  # the torchvision model whose weights the checkpoint holds
    transform: Callable[[], Callable]       # builds the reference transform: PIL image -> input tensor
    forward: Callable[[Path, Tensor], tuple[Tensor, Tensor]] | None


def loaded(network: Callable[[], torch.nn.Module], checkpoint: Path) -> torch.nn.Module:
    """A torchvision model with a torchvision state-dict file loaded strictly, as torchvision's `weights=` does;
    built on the meta device where it can be, as every tensor it holds is then the file's (a random
    initialisation would only be overwritten, at seconds per model)."""
    try:
        with torch.device("meta"):
            model = network()
    except NotImplementedError:  # RegNet computes its stage widths with tensors while it is built
        model = network()
    model.load_state_dict(torch.load(checkpoint, weights_only=True), assign=True)
    return model


def torchvision_reference(network: Callable[[], torch.nn.Module],
                          forward: Callable[[torch.nn.Module, Tensor], tuple[Tensor, Tensor]]
                          ) -> Callable[[Path, Tensor], tuple[Tensor, Tensor]]:
    return lambda checkpoint, images: forward(loaded(network, checkpoint), images)


def supcon_file_reference(checkpoint: Path, images: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's ResNetSupCon loads the file's 'model_state_dict' as it is ('encoder.*', 'fc.*', 'head.*')."""
    return supcon_reference(torch.load(checkpoint, weights_only=False)["model_state_dict"], images)


def head_input(head: str) -> Callable[[torch.nn.Module, Tensor], tuple[Tensor, Tensor]]:
    return lambda model, images: torchvision_head_input_reference(model, head, images)


def vit_b_16_384() -> torchvision.models.VisionTransformer:
    return torchvision.models.vit_b_16(image_size=384)


MODELS = torchvision.models
REFERENCES = {
    "resnet50-supcon": Reference(MODELS.resnet50, paper_resnet_transform, supcon_file_reference),
    "resnet50-react": Reference(MODELS.resnet50, paper_resnet_transform, None),
    "regnet-y-16gf-swag-e2e-v1": Reference(MODELS.regnet_y_16gf,
                                           MODELS.RegNet_Y_16GF_Weights.IMAGENET1K_SWAG_E2E_V1.transforms,
                                           torchvision_reference(MODELS.regnet_y_16gf, head_input("fc"))),
    "vit-b16-swag-e2e-v1": Reference(vit_b_16_384, MODELS.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1.transforms,
                                     torchvision_reference(vit_b_16_384, paper_vit_reference)),
    "mobilenet-v2": Reference(MODELS.mobilenet_v2, MODELS.MobileNet_V2_Weights.IMAGENET1K_V2.transforms,
                              torchvision_reference(MODELS.mobilenet_v2, head_input("classifier"))),
    "openood-resnet50": Reference(MODELS.resnet50, MODELS.ResNet50_Weights.IMAGENET1K_V1.transforms,
                                  torchvision_reference(MODELS.resnet50, openood_resnet_reference)),
    "openood-vit-b16": Reference(MODELS.vit_b_16, MODELS.ViT_B_16_Weights.IMAGENET1K_V1.transforms,
                                 torchvision_reference(MODELS.vit_b_16, openood_vit_reference)),
}


def write_checkpoint(config: ModelConfig, weights: dict[str, Tensor], folder: Path) -> None:
    """The weights in the file layout the model's YAML names (a SupCon training output or a plain state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config.checkpoint_format == "supcon":
        save_as_supcon(weights, folder / config.checkpoint)
    else:
        torch.save(weights, folder / config.checkpoint)


def pipeline_side(config: ModelConfig, pretrained: Path, folder: Path, cache: Path
                  ) -> tuple[Tensor, np.ndarray, float | None, dict[str, Tensor]]:
    """Our inputs, cached raw features, ReAct threshold (the images are the bank too) and detector outputs."""
    backbone = build_backbone(config, pretrained)
    dataset = build_dataset(DatasetConfig("photos", "flat_folder", {"test": folder.name}), "test", folder.parent,
                            config.transform.build())
    inputs = torch.stack([dataset[index][0] for index in range(len(dataset))])
    settings = ExtractionSettings(torch.device("cpu"), batch_size=2, num_workers=0, amp="off", channels_last=False,
                                  chunk_size=1000)
    raw = FeatureExtractor(backbone, {"model": config.name}, cache, settings).features(
        dataset, {"dataset": "photos"}, "photos")
    threshold = None if config.react_percentile is None else react_threshold(raw, config.react_percentile)
    outputs = model_outputs(RawFeatures(raw, dataset.labels, dataset.image_ids), backbone, threshold,
                            torch.device("cpu"), "photos")
    return inputs, raw, threshold, outputs


def assert_varies_across_images(values: Tensor) -> None:
    """No two images give nearly the same vector, so equal outputs cannot come from inputs being ignored."""
    distances = torch.cdist(values, values) / values.norm(dim=1).mean()
    assert distances[~torch.eye(len(values), dtype=torch.bool)].min() > 0.05


def assert_relatively_close(actual: Tensor, expected: Tensor, tolerance: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


# full-size ResNet-50, RegNet-Y-16GF and ViT-B/16 at 224 or 384 pixels: seconds per test on a CPU (MobileNet-V2
# stays in the quick subset, a check of the whole path at a real input size)
SLOW_BACKBONES = {name for name in REFERENCES if name != "mobilenet-v2"}


@pytest.mark.parametrize("model_name", [pytest.param(name, marks=pytest.mark.slow if name in SLOW_BACKBONES else ())
                                        for name in REFERENCES])
def test_backbone_computes_what_the_reference_code_computes(model_name, image_folder, tmp_path):
    config = load_model_config(model_name)
    reference = REFERENCES[model_name]
    expected_inputs = reference_inputs(image_folder, reference.transform())
    torch.manual_seed(0)
    calibration = F.interpolate(expected_inputs, size=96, mode="bilinear", antialias=True)
    write_checkpoint(config, lifelike_state_dict(reference.network(), calibration), tmp_path / "pretrained")
    checkpoint = tmp_path / "pretrained" / config.checkpoint

    inputs, raw, threshold, outputs = pipeline_side(config, tmp_path / "pretrained", image_folder, tmp_path / "cache")
    if reference.forward is None:  # ReAct: the bank is the same images
        expected_raw, expected_threshold, expected_features, expected_logits = paper_react_reference(
            loaded(MODELS.resnet50, checkpoint), expected_inputs, expected_inputs)
        assert config.react_percentile == 0.95
        assert threshold == pytest.approx(expected_threshold, rel=1e-6)
        assert (expected_raw > expected_threshold).float().mean() > 0.01  # the clip changes the features
    else:
        expected_raw, expected_logits = reference.forward(checkpoint, expected_inputs)
        expected_features = expected_raw
        assert config.react_percentile is None and threshold is None

    assert_varies_across_images(expected_raw)
    assert_varies_across_images(expected_logits)
    torch.testing.assert_close(inputs, expected_inputs, rtol=0, atol=1e-6)
    assert_relatively_close(torch.from_numpy(raw), expected_raw)
    assert_relatively_close(outputs["feas"], F.normalize(expected_features, dim=1))
    assert_relatively_close(outputs["logits"], expected_logits)


def test_paper_vit_features_are_cached_apart_from_the_post_layernorm_ones(tmp_path):
    """Entries extracted before the ViT's feature became the pre-LayerNorm token must not be reused."""
    config = load_model_config("vit-b16-swag-e2e-v1")
    key = config.cache_key(checkpoint_sha256="0" * 64)
    post_layernorm_key = {**key, "architecture": "vit_b_16"}  # the key those entries were written under
    assert config.architecture == "vit_b_16_pre_ln"
    entries = {FeatureEntry(tmp_path, {**model_key, "dataset": "photos"}, "photos").directory
               for model_key in (key, post_layernorm_key)}
    assert len(entries) == 2
