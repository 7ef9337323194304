"""Your own model: torchvision and timm classifiers by name, checkpoint layouts, and Python modules and datasets
through the library call; each compared with a direct forward of the same model cut at the same place."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

from dataloaders import DatasetConfig, build_dataset
from errors import UserError
from models import ModelConfig, PythonModel, TransformConfig, build_backbone, find_head
from models.base import _build_uninitialised, architecture_builder
from ood_detectors import create_detector
from ood_evaluation.metrics import ood_metrics
from pipeline.api import resolve_experiment, run_experiment, write_result
from pipeline.features.extract import ExtractionSettings, FeatureExtractor
from pipeline.run.scoring import RawFeatures, model_outputs
from tests.checkpoints import lifelike_state_dict
from tests.datagen import write_flat_folder
from tests.main_process import start_main

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def randomised(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A state dict of `model` with every float tensor redrawn (BatchNorm statistics too), so that a layer left
    at its initial values would show."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor = torch.randn(tensor.shape, generator=generator) * 0.05
            tensor = tensor.abs() + 0.5 if key.endswith("running_var") else tensor
        state[key] = tensor.clone()
    return state


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six photo-like JPEG/PNG files of uneven sizes in one folder."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    write_flat_folder(folder, count=6, size=(61, 47), with_junk=False, seed=11)
    return folder


def pipeline_outputs(config: ModelConfig, pretrained: Path, photos: Path, cache: Path) -> tuple[Tensor, Tensor]:
    """Raw features and logits of the photos as the pipeline computes them: build, extract through the cache
    (in one batch, as the reference forward), derive the logits from the cached rows."""
    backbone = build_backbone(config, pretrained)
    dataset = build_dataset(DatasetConfig("photos", "flat_folder", {"test": photos.name}), "test", photos.parent,
                            config.transform.build())
    settings = ExtractionSettings(CPU, batch_size=8, num_workers=0, amp="off", channels_last=False, chunk_size=100)
    rows = FeatureExtractor(backbone, config.cache_key("0" * 64), cache, settings).features(
        dataset, {"dataset": "photos"}, "photos")
    outputs = model_outputs(RawFeatures(rows, dataset.labels, dataset.image_ids), backbone, None, CPU, "photos")
    features = torch.from_numpy(rows)
    torch.testing.assert_close(outputs["feas"], nn.functional.normalize(features, dim=1))
    return features, outputs["logits"]


def photo_tensors(photos: Path, transform) -> Tensor:
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in sorted(photos.iterdir())])


# builder -> (the nn.Linear computing the logits, named here, not found; the YAML's transform or None for the
# weights' own)
TORCHVISION_CASES = {
    "resnet18": ("fc", TransformConfig(resize=40, crop=32)),
    "convnext_tiny": ("classifier.2", None),
    "efficientnet_b0": ("classifier.1", TransformConfig(resize=36, crop=32, interpolation="bicubic")),
    "swin_t": ("head", TransformConfig(resize=64, crop=64)),
    "vit_b_16": ("heads.head", TransformConfig(resize=36, crop=32)),
    "mobilenet_v3_small": ("classifier.3", None),
}


QUICK = ("resnet18", "resnet10t", "convnext_atto.d2_in1k")  # the rest: about 10 s each, in the full suite only


def cases(names) -> list:
    return [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.mark.parametrize("builder", cases(TORCHVISION_CASES))
@torch.no_grad()
def test_torchvision_model_by_name_equals_a_direct_forward_cut_at_its_last_linear(builder, photos, tmp_path):
    linear, transform = TORCHVISION_CASES[builder]
    weights = torchvision.models.get_model_weights(builder).IMAGENET1K_V1
    size = transform.crop if transform else 224
    kwargs = {"image_size": size} if builder.startswith("vit_") else {}
    reference = torchvision.models.get_model(builder, num_classes=1000, **kwargs)
    reference_transform = transform.build() if transform else weights.transforms()  # torchvision's own preset
    images = photo_tensors(photos, reference_transform)
    state = lifelike_state_dict(reference, images, seed=1)
    (tmp_path / "pretrained").mkdir()
    torch.save(state, tmp_path / "pretrained" / Path(weights.url).name)  # the file torchvision downloads
    config = ModelConfig(name=builder, architecture=f"torchvision/{builder}", weights="IMAGENET1K_V1",
                         transform=transform)

    features, logits = pipeline_outputs(config, tmp_path / "pretrained", photos, tmp_path / "cache")

    linear_inputs = []
    reference.get_submodule(linear).register_forward_pre_hook(lambda module, args: linear_inputs.append(args[0]))
    expected_logits = reference(images)
    torch.testing.assert_close(features, linear_inputs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert (logits[1:] - logits[0]).abs().max() > 1e-2  # the images differ in what reaches the head


# model -> (timm's classifier, the file layout its weights come in)
TIMM_CASES = {
    "resnet10t": "safetensors",
    "convnext_atto.d2_in1k": "safetensors",
    "efficientnet_b0": "state_dict",
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": "safetensors",
    "mobilenetv3_small_050.lamb_in1k": "lightning",
    "regnety_002": "state_dict",
}


@pytest.mark.parametrize("name", cases(TIMM_CASES))
@torch.no_grad()
def test_timm_model_by_name_equals_forward_head_pre_logits_and_timms_transform(name, photos, tmp_path):
    reference = timm.create_model(name, pretrained=False, num_classes=7)
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    images = photo_tensors(photos, timm_transform)
    state = lifelike_state_dict(reference, images, seed=2)
    (tmp_path / "pretrained").mkdir()
    checkpoint = tmp_path / "pretrained" / f"{name}.weights"
    if TIMM_CASES[name] == "safetensors":  # as timm's Hugging Face repositories hold them
        safetensors.torch.save_file(state, checkpoint)
    elif TIMM_CASES[name] == "lightning":  # a LightningModule whose `model` attribute is the network
        torch.save({"epoch": 3, "state_dict": {f"model.{key}": tensor for key, tensor in state.items()},
                    "hyper_parameters": {"lr": 0.1}}, checkpoint)
    else:
        torch.save(state, checkpoint)
    config = ModelConfig(name="mine", architecture=f"timm/{name}", checkpoint=checkpoint.name, num_classes=7)

    features, logits = pipeline_outputs(config, tmp_path / "pretrained", photos, tmp_path / "cache")

    torch.testing.assert_close(photo_tensors(photos, config.transform.build()), images, rtol=0, atol=0)
    expected_features = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, reference(images), rtol=1e-4, atol=1e-5)
    assert (logits[1:] - logits[0]).abs().max() > 1e-2  # the images differ in what reaches the head
    crop = reference.pretrained_cfg["input_size"][-1]
    assert config.transform.crop == crop
    assert config.transform.resize == math.floor(crop / reference.pretrained_cfg["crop_pct"])


def test_checkpoint_layouts_users_have_load_the_same_weights(tmp_path):
    model = torchvision.models.resnet18(num_classes=5)
    state = randomised(model, seed=3)
    layouts = {
        "plain.pth": state,
        "data-parallel.pth": {f"module.{key}": tensor for key, tensor in state.items()},
        "lightning.ckpt": {"state_dict": {f"net.{key}": tensor for key, tensor in state.items()},
                           "optimizer_states": [], "global_step": 10},
        "wrapped.pth": {"model": state, "epoch": 90},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    for name in [*layouts, "weights.safetensors"]:
        config = ModelConfig(name="r18", architecture="torchvision/resnet18", checkpoint=name, num_classes=5,
                             transform=TransformConfig(resize=32, crop=32))
        loaded = build_backbone(config, tmp_path).model.state_dict()
        torch.testing.assert_close(loaded, state, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("architecture, head, fragments", [
    ("torchvision/squeezenet1_1", (), ["SqueezeNet", "no nn.Linear computes the model's output", "'head'"]),
    ("torchvision/mobilenet_v3_small", ("classifier",), ["['classifier']", "exactly one nn.Linear, found 2"]),
    ("torchvision/resnet18", ("avgpool", "fc"), ["512-wide inputs", "(1, 2048)"]),
    ("torchvision/resnet18", ("layer4",), ["'layer4' does not compute the model's output"]),
    ("torchvision/resnet18", ("fcc",), ["'fcc'", "'fc'"]),
    ("timm/deit_tiny_distilled_patch16_224", (), ["no nn.Linear computes"]),
])
def test_a_head_that_cannot_give_the_feature_is_one_clear_error_before_any_weight_is_read(architecture, head,
                                                                                        fragments, tmp_path):
    config = ModelConfig(name="m", architecture=architecture, checkpoint="absent.pth", head=head,
                         transform=TransformConfig(resize=64, crop=64 if "squeeze" in architecture else 224
                                                   if "deit" in architecture else 64))
    with pytest.raises(UserError) as error:
        build_backbone(config, tmp_path)  # the checkpoint is absent: the head is checked first
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_unknown_library_names_suggest_the_nearest():
    with pytest.raises(UserError) as error:
        ModelConfig(name="m", architecture="timm/convnext_tinyy", checkpoint="w.pth")
    assert "'convnext_tinyy'" in str(error.value) and "'convnext_tiny'" in str(error.value)
    with pytest.raises(UserError) as error:
        ModelConfig(name="m", architecture="timm/convnext_tiny.fb_in1kk", checkpoint="w.pth")
    assert "'convnext_tiny.fb_in1k'" in str(error.value)
    with pytest.raises(UserError) as error:
        ModelConfig(name="m", architecture="torchvision/resnet5O", checkpoint="w.pth")
    assert "'resnet50'" in str(error.value)
    with pytest.raises(UserError) as error:
        ModelConfig(name="m", architecture="torchvision/resnet50", weights="IMAGENET1K_V9")
    assert "ResNet50_Weights.IMAGENET1K_V2" in str(error.value)


def test_a_checkpoint_of_another_architecture_lists_the_first_missing_and_unexpected_keys(tmp_path):
    torch.save(randomised(torchvision.models.resnet18(num_classes=5), seed=4), tmp_path / "r18.pth")
    config = ModelConfig(name="m", architecture="timm/resnet10t", checkpoint="r18.pth", num_classes=5,
                         transform=TransformConfig(resize=32, crop=32))
    with pytest.raises(UserError) as error:
        build_backbone(config, tmp_path)
    message = str(error.value)
    assert re.search(r"\d+ missing: conv1\.0\.weight", message) and "unexpected: conv1.weight" in message


@pytest.mark.slow  # 80 builders, forwarded on the meta device: about 20 s
@pytest.mark.filterwarnings("ignore:The default weight initialization of:FutureWarning")  # googlenet, inception_v3
def test_every_torchvision_classification_builder_gives_a_feature_or_one_line_why_not():
    outcomes = {}
    for builder in torchvision.models.list_models(module=torchvision.models):
        config = ModelConfig(name=builder, architecture=f"torchvision/{builder}", checkpoint="absent.pth",
                             transform=TransformConfig(resize=299, crop=299 if "inception" in builder else 224))
        model, head = _build_uninitialised(lambda: architecture_builder(config.architecture)(10, config.transform.crop))
        try:
            outcomes[builder] = find_head(model.eval(), config.transform.crop, head)
        except UserError as error:
            assert "\n" not in str(error)
            outcomes[builder] = str(error)
    refused = {builder for builder, outcome in outcomes.items() if isinstance(outcome, str)}
    assert refused == {"squeezenet1_0", "squeezenet1_1"}
    assert outcomes["convnext_tiny"] == (("classifier.2",), 768)
    assert outcomes["vit_b_16"] == (("heads.head",), 768)
    assert outcomes["regnet_y_16gf"] == (("fc",), 3024)
    assert len(outcomes) == 80


class TwoStageNet(nn.Module):
    """A network of this test's own, in no registry: conv features, a hidden layer, then the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.hidden = nn.Linear(32, 16)
        self.out = nn.Linear(16, 10)
        self.forwards = 0  # images forwarded: a run served from the cache forwards none

    def penultimate(self, images: Tensor) -> Tensor:
        return torch.relu(self.hidden(self.body(images)))

    def forward(self, images: Tensor) -> Tensor:
        self.forwards += int(images.flatten(1).any(dim=1).sum())  # not the blank image that finds the head
        return self.out(self.penultimate(images))


class Gradients(torch.utils.data.Dataset):
    """Colour gradients as PIL images, two labels: a torch Dataset given as an OOD set."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        ramp = np.linspace(0, 255, 40, dtype=np.float32)
        pixels = np.stack([np.add.outer(ramp, ramp * index / 7) % 256] * 3, axis=-1).astype(np.uint8)
        return Image.fromarray(pixels), index % 2


CIFAR_TRANSFORM = TransformConfig(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def python_run(data_root: Path, tmp_path: Path, model: PythonModel):
    settings = {"data_root": str(data_root), "cache_dir": str(tmp_path / "cache"), "device": "cpu",
                "num_workers": 0, "bank_ratio": 1.0, "bootstrap": 20, "plots": False}
    experiment = resolve_experiment(None, {**settings, "train_data": "cifar10", "id_data": "cifar10",
                                           "ood_data": ["svhn", "gradients"],
                                           "detectors": ["nnguide", "knn", "energy"]},
                                    model=model, datasets={"gradients": Gradients()})
    return experiment, run_experiment(experiment)


def by_hand(net: TwoStageNet, data_root: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Every (OOD set, detector)'s metrics from the network's own outputs, with the library's detectors."""
    transform = CIFAR_TRANSFORM.build()

    def outputs(images: list[Image.Image], labels: list[int]) -> dict[str, Tensor]:
        batch = torch.stack([transform(image) for image in images])
        with torch.no_grad():
            features = net.penultimate(batch)
            return {"feas": nn.functional.normalize(features, dim=1), "logits": net.out(features),
                    "labels": torch.tensor(labels)}

    def split(name: str, split: str) -> dict[str, Tensor]:
        dataset = build_dataset(DatasetConfig(name, name, {split: name}), split, data_root, None)
        return outputs([dataset[i][0] for i in range(len(dataset))], dataset.labels.tolist())

    bank = split("cifar10", "train")
    gradients = Gradients()
    sets = {"cifar10": split("cifar10", "test"), "svhn": split("svhn", "test"),
            "gradients": outputs(*zip(*[gradients[i] for i in range(len(gradients))]))}
    expected = {}
    for detector_name, kwargs in {"nnguide": {"k": 10}, "knn": {"k": 10}, "energy": {}}.items():
        detector = create_detector(detector_name, **kwargs).fit(bank)
        scores = {name: detector.score_samples(outputs).numpy() for name, outputs in sets.items()}
        for name in ("svhn", "gradients"):
            expected[(name, detector_name)] = {metric: 100 * value for metric, value in
                                               ood_metrics(scores["cifar10"], scores[name]).items()}
    return expected


def test_python_module_gives_the_hand_computed_table_and_is_cached_by_its_weights(data_root, tmp_path):
    torch.manual_seed(5)
    net = TwoStageNet()
    model = PythonModel("two-stage", net, CIFAR_TRANSFORM, head="out")

    experiment, result = python_run(data_root, tmp_path, model)

    expected = by_hand(net, data_root)
    assert {(row.ood_data, row.detector) for row in result.rows} == set(expected)
    for row in result.rows:
        for metric, value in expected[(row.ood_data, row.detector)].items():
            assert row.metrics[metric] == pytest.approx(value, abs=1e-6), (row.ood_data, row.detector, metric)
        assert row.model == "two-stage" and row.checkpoint.startswith("TwoStageNet weights ")
        assert set(row.intervals) == set(row.metrics)
    written = write_result(result, tmp_path / "logs")
    assert (tmp_path / "logs" / "results.csv").is_file() and written

    net.forwards = 0
    _, again = python_run(data_root, tmp_path, model)
    assert net.forwards == 0  # every image's features came from the cache
    assert [row.metrics for row in again.rows] == [row.metrics for row in result.rows]

    with torch.no_grad():
        net.hidden.weight[0, 0] += 0.5
    _, changed = python_run(data_root, tmp_path, model)
    assert net.forwards > 0  # one changed weight: recomputed, not served stale
    assert [row.metrics for row in changed.rows] != [row.metrics for row in result.rows]


def test_python_module_cut_by_features_and_logits_equals_the_head_cut(data_root, tmp_path):
    torch.manual_seed(6)
    net = TwoStageNet()
    by_head = python_run(data_root, tmp_path / "head", PythonModel("by-head", net, CIFAR_TRANSFORM))[1]
    by_callable = python_run(data_root, tmp_path / "callable", PythonModel(
        "by-callable", net, CIFAR_TRANSFORM,
        features_and_logits=lambda images: (net.penultimate(images), net.out(net.penultimate(images)))))[1]
    for head_row, callable_row in zip(by_head.rows, by_callable.rows):
        assert head_row.metrics == pytest.approx(callable_row.metrics, abs=1e-6)


def test_python_model_mistakes_are_clear_errors():
    net = TwoStageNet()
    with pytest.raises(UserError, match="memory address"):
        PythonModel("m", net, lambda image: torch.zeros(3, 8, 8))
    with pytest.raises(UserError, match="ReAct"):
        PythonModel("m", net, CIFAR_TRANSFORM, features_and_logits=lambda x: (x, x), react_percentile=0.9)
    with pytest.raises(UserError, match="'hidden'"):
        PythonModel("m", net, CIFAR_TRANSFORM, head="hidden").backbone()  # its output is not the model's
    with pytest.raises(UserError) as error:
        resolve_experiment(None, {"train_data": "cifar10", "id_data": "cifar10", "ood_data": ["svhn"]},
                           model=PythonModel("m", net, CIFAR_TRANSFORM), datasets={"gradiends": Gradients()})
    assert "'gradiends'" in str(error.value)


def test_the_code_of_the_class_is_part_of_the_key():
    net = TwoStageNet()
    key = PythonModel("m", net, CIFAR_TRANSFORM).cache_key()
    assert key["architecture"].endswith("TwoStageNet")
    other = nn.Sequential(*net.children())  # same weights, other code
    other_key = PythonModel("m", other, CIFAR_TRANSFORM).cache_key()
    assert other_key["weights_sha256"] != key["weights_sha256"] or other_key["code_sha256"] != key["code_sha256"]
    assert other_key["code_sha256"] != key["code_sha256"]


def doc_blocks(language: str) -> list[str]:
    text = (REPO / "docs" / "your-model.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # two main.py runs (a ConvNeXt-T at 224 px) and the Python example
def test_the_examples_of_the_docs_page_run_as_printed(data_root, tmp_path, monkeypatch):
    yamls, commands, (python_example,) = doc_blocks("yaml"), doc_blocks("bash"), doc_blocks("python")
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    torch.save(randomised(torchvision.models.convnext_tiny(), seed=7), pretrained / "convnext_tiny-983f1562.pth")
    safetensors.torch.save_file(randomised(timm.create_model("convnext_atto"), seed=8),
                                pretrained / "convnext_atto.d2_in1k.safetensors")
    runs = []
    for yaml_text, command in zip(yamls, commands):
        name = re.search(r"# configs/models/([\w-]+)\.yaml", yaml_text).group(1)
        (tmp_path / f"{name}.yaml").write_text(yaml_text)
        arguments = command.split()[2:]
        arguments[arguments.index(name)] = str(tmp_path / f"{name}.yaml")
        runs.append([*arguments, "--data-root", data_root, "--pretrained-dir", pretrained, "--cache-dir",
                     tmp_path / "cache", "--output-dir", tmp_path / name, "--device", "cpu", "--num-workers", "0",
                     "--set", "bank_ratio=1.0", "--set", "bootstrap=10", "--set", "plots=false",
                     "--detectors", "nnguide", "knn", "energy"])
    for process in [start_main(arguments) for arguments in runs]:
        _, stderr = process.communicate(timeout=900)  # a guard against a hang only
        assert process.returncode == 0, stderr
    for yaml_text in yamls:
        name = re.search(r"# configs/models/([\w-]+)\.yaml", yaml_text).group(1)
        assert (tmp_path / name / "results.csv").read_text().count("\n") == 1 + 2 * 3  # 2 OOD sets x 3 detectors

    monkeypatch.chdir(tmp_path)
    settings = 'settings = {"data_root": "~/datasets", "bootstrap": 1000}'
    assert settings in python_example
    python_example = python_example.replace(settings, (
        f'settings = {{"data_root": "{data_root}", "bootstrap": 10, "bank_ratio": 1.0, "num_workers": 0, '
        f'"device": "cpu", "plots": False, "cache_dir": "{tmp_path / "cache"}"}}'))
    namespace: dict = {}
    net_class_source = python_example.split("net = MyNet()")[0]
    exec(compile(net_class_source, "docs/your-model.md", "exec"), namespace)
    torch.save(randomised(namespace["MyNet"](), seed=9), tmp_path / "my-net.pth")
    exec(compile(python_example, "docs/your-model.md", "exec"), {"__name__": "docs_example"})
    assert (tmp_path / "logs" / "my-net" / "results.csv").read_text().count("\n") == 1 + 2 * 3
