"""Backbones load real checkpoint layouts strictly and reproduce the torchvision models they wrap."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from errors import UserError
from models import (ARCHITECTURES, Backbone, ModelConfig, TransformConfig, apply_react, build_backbone, file_sha256,
                    find_head, react_threshold, resolve_checkpoint)
from tests.checkpoints import write_torchvision_checkpoint

SUPCON = ModelConfig(name="resnet50-supcon", architecture="resnet50", checkpoint="resnet50-supcon.pt",
                     checkpoint_format="supcon", checkpoint_url="https://example.org/resnet50-supcon.pt")


@pytest.fixture
def supcon_file(supcon_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The session's random SupCon checkpoint (conftest.py), alone in its folder under SUPCON's file name."""
    path, state_dict = supcon_checkpoint
    assert path.name == SUPCON.checkpoint and [file.name for file in path.parent.iterdir()] == [path.name]
    return path, state_dict


def resave_supcon(source: Path, target: Path, edit: Callable[[dict], object]) -> None:
    """Copies a SupCon checkpoint with `edit` applied to its model_state_dict."""
    checkpoint = torch.load(source, weights_only=False)
    edit(checkpoint["model_state_dict"])
    torch.save(checkpoint, target)


@torch.no_grad()
def test_supcon_checkpoint_reproduces_torchvision_resnet50(supcon_file):
    path, state_dict = supcon_file
    with torch.device("meta"):  # no random initialisation: every tensor is the state dict's
        reference = torchvision.models.resnet50()
    reference.load_state_dict(state_dict, assign=True)
    reference.eval()
    fc_inputs = []
    reference.fc.register_forward_hook(lambda module, inputs, output: fc_inputs.append(inputs[0]))
    images = torch.randn(2, 3, 64, 64)

    backbone = build_backbone(SUPCON, path.parent)
    features, logits = backbone(images)

    assert not backbone.training and backbone.feature_dim == 2048
    torch.testing.assert_close(logits, reference(images))
    torch.testing.assert_close(features, fc_inputs[0])
    torch.testing.assert_close(backbone.features(images), features)
    torch.testing.assert_close(backbone.classifier(features), logits)


def test_supcon_checkpoint_saved_from_data_parallel_loads_the_same_weights(tmp_path, supcon_file):
    def wrap_encoder(state):
        for key in [key for key in state if key.startswith("encoder.")]:
            state[key.replace("encoder.", "encoder.module.")] = state.pop(key)
    resave_supcon(supcon_file[0], tmp_path / SUPCON.checkpoint, wrap_encoder)

    backbone = build_backbone(SUPCON, tmp_path)

    torch.testing.assert_close(backbone.model.state_dict(), supcon_file[1])


FULL_SIZE = ("regnet_y_16gf", "vit_b_16", "vit_b_16_pre_ln")  # 84M / 86M parameters to initialise: about 1 s each


@pytest.mark.parametrize("architecture", [pytest.param(name, marks=pytest.mark.slow) if name in FULL_SIZE else name
                                          for name in ARCHITECTURES.names()])
@torch.no_grad()
def test_trunk_and_classifier_reproduce_the_torchvision_forward(architecture):
    model, head = ARCHITECTURES.get(architecture)(10, 32)
    model.eval()
    head_inputs = []
    first_part = head[0]  # e.g. the ViT's final LayerNorm, then its head
    model.get_submodule(first_part).register_forward_hook(lambda module, inputs, output: head_inputs.append(inputs[0]))
    images = torch.randn(2, 3, 32, 32)
    expected_logits = model(images)

    features, logits = Backbone(model.eval(), *find_head(model, 32, head))(images)

    torch.testing.assert_close(logits, expected_logits)
    expected_features = head_inputs[0] if head_inputs[0].ndim == 2 else head_inputs[0][:, 0]  # a ViT's class token
    torch.testing.assert_close(features, expected_features)


@torch.no_grad()
def test_torchvision_checkpoint_loads_strictly(tmp_path):
    state_dict = write_torchvision_checkpoint(tmp_path / "mobilenet_v2-7ebf99e0.pth", "mobilenet_v2")
    config = ModelConfig(name="mobilenet_v2", architecture="mobilenet_v2", checkpoint="mobilenet_v2-7ebf99e0.pth",
                         checkpoint_format="state_dict", transform=TransformConfig(resize=64, crop=64))
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(state_dict)
    images = torch.randn(2, 3, 64, 64)

    features, logits = build_backbone(config, tmp_path)(images)

    assert features.shape == (2, 1280)
    torch.testing.assert_close(logits, reference.eval()(images))


def test_float16_checkpoint_loads_as_float32_as_a_copying_load_would(tmp_path):
    """The backbone is built on the meta device and takes the file's tensors (assign=True): they must still be
    cast to the model's float32, exactly as torch's copying load_state_dict casts them."""
    state_dict = write_torchvision_checkpoint(tmp_path / "full.pth", "mobilenet_v2")
    half = {key: tensor.half() if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    torch.save(half, tmp_path / "half.pth")
    config = ModelConfig(name="mobilenet_v2", architecture="mobilenet_v2", checkpoint="half.pth",
                         checkpoint_format="state_dict", transform=TransformConfig(resize=64, crop=64))
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(half)
    images = torch.randn(2, 3, 64, 64)

    backbone = build_backbone(config, tmp_path)

    assert {tensor.dtype for tensor in backbone.state_dict().values() if tensor.is_floating_point()} == {torch.float32}
    assert not torch.equal(reference.features[0][0].weight, state_dict["features.0.0.weight"])  # rounded: fp16
    torch.testing.assert_close(backbone(images)[1], reference.eval()(images), rtol=0, atol=0)


def test_a_buffer_no_checkpoint_holds_keeps_the_value_the_architecture_builds(tmp_path, monkeypatch):
    """A buffer outside the state dict (persistent=False, as timm's position indices) has no value on the meta
    device: the model is then built for real and the checkpoint copied into it."""
    def with_unsaved_buffer(num_classes: int, image_size: int) -> tuple[torch.nn.Module, tuple[str]]:
        model = torchvision.models.mobilenet_v2(num_classes=num_classes)
        model.register_buffer("scale", torch.arange(3.0) + 2, persistent=False)
        return model, ("classifier",)

    monkeypatch.setitem(ARCHITECTURES._builders, "mobilenet_v2_unsaved_buffer", with_unsaved_buffer)
    state_dict = write_torchvision_checkpoint(tmp_path / "weights.pth", "mobilenet_v2")
    config = ModelConfig(name="m", architecture="mobilenet_v2_unsaved_buffer", checkpoint="weights.pth",
                         checkpoint_format="state_dict", transform=TransformConfig(resize=64, crop=64))

    backbone = build_backbone(config, tmp_path)

    torch.testing.assert_close(backbone.model.scale, torch.tensor([2.0, 3.0, 4.0]))
    torch.testing.assert_close(backbone.model.state_dict(), state_dict, rtol=0, atol=0)


def test_missing_checkpoint_names_where_it_looked_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        resolve_checkpoint(SUPCON, tmp_path / "pretrained")
    message = str(error.value)
    assert "resnet50-supcon.pt" in message and "\n" not in message
    assert str(tmp_path / "pretrained") in message and str(tmp_path / "hub" / "checkpoints") in message
    assert SUPCON.checkpoint_url in message


def test_resolve_checkpoint_prefers_a_given_path_then_the_pretrained_dir_then_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    in_hub = tmp_path / "hub" / "checkpoints" / SUPCON.checkpoint
    in_hub.parent.mkdir(parents=True)
    in_hub.write_bytes(b"")
    assert resolve_checkpoint(SUPCON, tmp_path / "pretrained") == in_hub

    in_pretrained = tmp_path / "pretrained" / SUPCON.checkpoint
    in_pretrained.parent.mkdir()
    in_pretrained.write_bytes(b"")
    assert resolve_checkpoint(SUPCON, tmp_path / "pretrained") == in_pretrained

    given = dataclasses.replace(SUPCON, checkpoint=str(in_hub))
    assert resolve_checkpoint(given, tmp_path / "pretrained") == in_hub


def test_checkpoint_missing_an_encoder_tensor_is_refused(tmp_path, supcon_file):
    resave_supcon(supcon_file[0], tmp_path / SUPCON.checkpoint,
                  lambda state: state.pop("encoder.layer1.0.conv1.weight"))
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight$") as error:  # the last thing listed
        build_backbone(SUPCON, tmp_path)
    assert str(tmp_path / SUPCON.checkpoint) in str(error.value) and "1 missing" in str(error.value)


def test_checkpoint_with_extra_tensors_is_refused(tmp_path, supcon_file):
    def add_extras(state):
        state.update({f"encoder.extra{index}.weight": torch.zeros(1) for index in range(5)})
    resave_supcon(supcon_file[0], tmp_path / SUPCON.checkpoint, add_extras)
    with pytest.raises(UserError) as error:
        build_backbone(SUPCON, tmp_path)
    message = str(error.value)
    assert "5 unexpected" in message and all(f"extra{index}.weight" in message for index in range(3))
    assert "extra3.weight" not in message and message.endswith("...")  # the first three, then nothing else


def test_checkpoint_for_another_number_of_classes_is_refused(tmp_path, supcon_file):
    def keep_ten_classes(state):
        state["fc.weight"], state["fc.bias"] = state["fc.weight"][:10], state["fc.bias"][:10]
    resave_supcon(supcon_file[0], tmp_path / SUPCON.checkpoint, keep_ten_classes)
    with pytest.raises(UserError) as error:
        build_backbone(SUPCON, tmp_path)
    for value in ("2 mis-shaped", "fc.weight (10, 2048)", "(1000, 2048)", "fc.bias"):
        assert value in str(error.value)


def test_torchvision_state_dict_given_as_supcon_is_refused(tmp_path):
    write_torchvision_checkpoint(tmp_path / SUPCON.checkpoint, "mobilenet_v2")
    with pytest.raises(UserError) as error:
        build_backbone(SUPCON, tmp_path)
    for value in (str(tmp_path / SUPCON.checkpoint), "'model_state_dict'", "checkpoint_format"):
        assert value in str(error.value)


@pytest.mark.parametrize("content", [b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", b""])
def test_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    (tmp_path / SUPCON.checkpoint).write_bytes(content)
    with pytest.raises(UserError, match=re.escape(str(tmp_path / SUPCON.checkpoint))):
        build_backbone(SUPCON, tmp_path)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_truncated_checkpoint_is_refused(tmp_path, legacy_format):
    path = tmp_path / SUPCON.checkpoint
    torch.save({"model_state_dict": {"encoder.conv1.weight": torch.zeros(1000)}}, path,
               _use_new_zipfile_serialization=not legacy_format)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=re.escape(str(path))) as refused:
        build_backbone(SUPCON, tmp_path)
    assert "truncated" in str(refused.value)


@pytest.mark.parametrize("forbidden, name", [
    (os.system, "system"),                                 # a function: unpickling could run code
    (pathlib.PurePosixPath("/data"), "pathlib.PurePosixPath"),  # a class outside the allowlist
])
def test_checkpoint_holding_a_forbidden_global_is_refused(tmp_path, forbidden, name):
    torch.save({"opt": argparse.Namespace(data_folder=forbidden), "model_state_dict": {}},
               tmp_path / SUPCON.checkpoint)
    with pytest.raises(UserError) as error:
        build_backbone(SUPCON, tmp_path)
    assert str(tmp_path / SUPCON.checkpoint) in str(error.value) and name in str(error.value)


def test_model_config_rejects_unknown_names_and_bad_react_percentile():
    with pytest.raises(UserError) as error:
        dataclasses.replace(SUPCON, architecture="resnet5")
    assert "'resnet5'" in str(error.value) and "'resnet50'" in str(error.value)  # the name and the suggestion
    with pytest.raises(UserError) as error:
        dataclasses.replace(SUPCON, checkpoint_format="timm")
    assert all(value in str(error.value) for value in ("'timm'", "supcon", "state_dict"))
    with pytest.raises(UserError) as error:
        dataclasses.replace(SUPCON, react_percentile=95)
    assert "react_percentile" in str(error.value) and "95" in str(error.value)


def test_react_threshold_is_the_quantile_of_all_bank_activations_and_clips_above_it():
    bank_features = np.random.default_rng(0).exponential(size=(100, 16)).astype(np.float32)
    threshold = react_threshold(bank_features, 0.9)
    assert threshold == pytest.approx(np.quantile(bank_features.ravel(), 0.9))

    features = torch.tensor([[0.5 * threshold, 2.0 * threshold]])
    clipped = apply_react(features, threshold)
    torch.testing.assert_close(clipped, torch.tensor([[0.5 * threshold, threshold]]))
    assert features[0, 1] == 2.0 * threshold


def test_transform_crops_and_normalises():
    mean_colour = tuple(round(255 * channel) for channel in TransformConfig().mean)
    image = Image.new("RGB", (400, 300), mean_colour)
    tensor = TransformConfig(resize=128, crop=112, interpolation="bicubic").build()(image)
    assert tensor.shape == (3, 112, 112)
    assert tensor.abs().max() < 0.02
    assert TransformConfig(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)


def test_transform_rejects_an_unknown_interpolation():
    with pytest.raises(UserError) as error:
        TransformConfig(interpolation="nearest")
    assert all(value in str(error.value) for value in ("'nearest'", "bilinear", "bicubic"))


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    content = os.urandom(3 * 2**20 + 5)
    (tmp_path / "weights.pt").write_bytes(content)
    assert file_sha256(tmp_path / "weights.pt") == hashlib.sha256(content).hexdigest()
