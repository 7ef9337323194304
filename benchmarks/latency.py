"""Per-image latency of forward + OOD scoring for each backbone and detector, and throughput at a large batch.

The paper's latency column. Each backbone is built with random weights (latency does not depend on their
values; nothing is downloaded) and fed random images of its config's crop size, already on the device
(decoding, resizing and the host-to-device copy are benchmarks/extraction.py's subject). "Forward" is what
turns images into the detector's inputs, as the pipeline does: the trunk (under bf16 autocast with --amp
bf16), the ReAct clip for resnet50-react, the classifier and the L2 normalisation. "Detector" is
score_samples alone, each detector fitted once per backbone on a synthetic bank on the device (1% of
ImageNet: 12,811 random ReLU features, their logits through the model's own classifier). Every figure is the
median of --repeats (--batch-repeats at the large batch) timed calls, after --warmup untimed calls of the
forward and of each detector, the device synchronised around each call; "total" is timed end to end, so it
can differ from forward + detector by a little. Extraction settings mirror the pipeline's defaults (fp32, no
channels_last, no cudnn.benchmark, PyTorch's TF32 defaults).
Usage: python benchmarks/latency.py [--cpu] [--device cuda] [--models resnet50-react ...] [--detectors nnguide ...]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from errors import UserError  # noqa: E402
from models import Backbone, ModelConfig, find_head, react_threshold  # noqa: E402
from models.base import architecture_builder  # noqa: E402
from ood_detectors import OODDetector  # noqa: E402
from pipeline.config.experiment import detector_spec  # noqa: E402
from pipeline.config.loading import load_detector_config, load_model_config  # noqa: E402
from pipeline.run.experiment import resolve_device  # noqa: E402

PAPER_MODELS = ["resnet50-react", "regnet-y-16gf-swag-e2e-v1", "vit-b16-swag-e2e-v1"]
SEARCHING_DETECTORS = ("knn", "nnguide")  # the registered detectors that take a search `backend`


@dataclass(frozen=True)
class LatencySettings:
    """What one measurement run uses; the defaults are a GPU's (see `parse_args` for --cpu's)."""

    device: torch.device
    batch_size: int = 256           # the large batch, for throughput
    repeats: int = 50               # timed calls at batch 1; the median is reported
    batch_repeats: int = 5          # timed calls at the large batch
    warmup: int = 3                 # untimed calls before each timing (kernel loading, allocator, autotuning)
    bank_size: int = 12811          # bank rows: 1% of ImageNet's train split, the paper's setting
    amp: str = "off"                # "bf16": autocast around the trunk, as the pipeline's --amp bf16
    channels_last: bool = False     # channels_last images and weights, as the pipeline's --channels-last
    backend: str | None = None      # knn/nnguide search backend; None = the detector's default ("auto")
    seed: int = 0


@dataclass(frozen=True)
class LatencyRow:
    """One backbone + detector pair: milliseconds at batch 1 and images per second at the large batch."""

    model: str
    detector: str
    forward_ms: float          # batch 1: images -> detector inputs
    detector_ms: float         # batch 1: score_samples alone
    total_ms: float            # batch 1: both, timed end to end
    images_per_s: float        # large batch: forward + score_samples, end to end
    batch_detector_share: float  # large batch: % of forward + detector time spent in score_samples

    @property
    def detector_share(self) -> float:
        """Batch 1: % of forward + detector time spent in score_samples."""
        return 100 * self.detector_ms / (self.forward_ms + self.detector_ms)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of `repeats` calls of fn after `warmup` untimed ones, the device synchronised around each."""
    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        fn()
        synchronise()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_random_backbone(config: ModelConfig) -> Backbone:
    """The config's architecture with random weights, in eval mode; a failure names the model."""
    try:
        model, head = architecture_builder(config.architecture)(config.num_classes, config.transform.crop)
        return Backbone(model.eval(), *find_head(model.eval(), config.transform.crop, config.head or head))
    except (AssertionError, RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"model '{config.name}': cannot build architecture '{config.architecture}' at "
                        f"{config.transform.crop} px: {error}") from None


def outputs_from_features(backbone: Backbone, features: torch.Tensor, clip: float | None) -> dict[str, torch.Tensor]:
    """Raw (N, D) penultimate features -> what detectors see, as pipeline.run.scoring.model_outputs builds it:
    L2-normalised (ReAct-clipped) features and the classifier's logits of the clipped features."""
    features, logits = backbone.outputs(features, clip)
    return {"feas": torch.nn.functional.normalize(features, dim=1), "logits": logits}


def forward_outputs(backbone: Backbone, images: torch.Tensor, clip: float | None,
                    amp: str = "off") -> dict[str, torch.Tensor]:
    """(N, 3, H, W) images -> detector inputs; the trunk runs under bf16 autocast with amp="bf16", as in
    pipeline.features.extract, and its features are float32 again before the clip and the classifier."""
    autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if amp == "bf16"
                else contextlib.nullcontext())
    with autocast:
        features = backbone.features(images)
    return outputs_from_features(backbone, features.float(), clip)


def synthetic_bank(backbone: Backbone, config: ModelConfig, size: int, device: torch.device,
                   generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float | None]:
    """A bank of `size` random ReLU features (N, D) on the device, as detector inputs, and the ReAct clip
    fitted on it as the pipeline fits it (react_threshold of the raw bank features) when the model uses ReAct."""
    raw = torch.randn(size, backbone.feature_dim, generator=generator, device=device).relu_()  # (M, D)
    clip = (react_threshold(raw.cpu().numpy(), config.react_percentile)
            if config.react_percentile is not None else None)
    labels = torch.randint(0, config.num_classes, (size,), generator=generator, device=device)
    return {**outputs_from_features(backbone, raw, clip), "labels": labels}, clip


def fitted_detector(name: str, bank: dict[str, torch.Tensor], feature_dim: int,
                    backend: str | None) -> OODDetector:
    """configs/detectors/<name>.yaml's detector (the paper's hyper-parameters), fitted on the bank."""
    detector_config = load_detector_config(name)
    if backend is not None and detector_config["detector"] in SEARCHING_DETECTORS:
        detector_config = {**detector_config, "backend": backend}
    try:  # fit checks the feature width and bank size first
        return detector_spec(name, detector_config).build().fit(bank)
    except ValueError as error:
        raise UserError(f"detector '{name}': {error} ({feature_dim}-d features, bank of {len(bank['feas'])})") from None


def measure_model(config: ModelConfig, detector_names: list[str], settings: LatencySettings) -> list[LatencyRow]:
    """One LatencyRow per detector; the model, bank and detectors are freed before returning."""
    try:
        timings = _timings(config, detector_names, settings)
    except torch.OutOfMemoryError:
        raise UserError(f"model '{config.name}': a batch of {settings.batch_size} images of {config.transform.crop} "
                        f"px does not fit in {settings.device}'s memory; lower --batch-size") from None
    finally:
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for name in detector_names:
        forward, scoring, total = timings[name, "single"]
        batch_forward, batch_scoring, batch_total = timings[name, "batch"]
        rows.append(LatencyRow(config.name, name, 1000 * forward, 1000 * scoring, 1000 * total,
                               settings.batch_size / batch_total,
                               100 * batch_scoring / (batch_forward + batch_scoring)))
    return rows


def _timings(config: ModelConfig, detector_names: list[str], settings: LatencySettings
             ) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(detector, "single" | "batch") -> median seconds of (forward, score_samples, both end to end)."""
    device = settings.device
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    backbone = build_random_backbone(config).to(device, memory_format=memory_format)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    side = config.transform.crop
    timings = {}
    with torch.inference_mode():
        bank, clip = synthetic_bank(backbone, config, settings.bank_size, device, generator)
        detectors = {name: fitted_detector(name, bank, backbone.feature_dim, settings.backend)
                     for name in detector_names}
        for kind, batch_size, repeats in (("single", 1, settings.repeats),
                                          ("batch", settings.batch_size, settings.batch_repeats)):
            images = torch.randn(batch_size, 3, side, side, generator=generator, device=device)  # (N, 3, H, W)
            images = images.contiguous(memory_format=memory_format)

            def forward() -> dict[str, torch.Tensor]:
                return forward_outputs(backbone, images, clip, settings.amp)

            outputs = forward()
            forward_seconds = median_seconds(forward, device, repeats, settings.warmup)
            for name, detector in detectors.items():
                scoring = median_seconds(lambda: detector.score_samples(outputs), device, repeats, settings.warmup)
                # both parts were just warmed up: no warm-up calls of their own
                total = median_seconds(lambda: detector.score_samples(forward()), device, repeats, warmup=0)
                timings[name, kind] = (forward_seconds, scoring, total)
    return timings


def table_header(batch_size: int) -> str:
    return (f"| backbone | detector | forward (ms) | detector (ms) | total (ms) | detector share | "
            f"img/s at batch {batch_size} | detector share at batch {batch_size} |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")


def table_row(row: LatencyRow) -> str:
    return (f"| {row.model} | {row.detector} | {row.forward_ms:.2f} | {row.detector_ms:.3f} | {row.total_ms:.2f} | "
            f"{row.detector_share:.1f}% | {row.images_per_s:.1f} | {row.batch_detector_share:.1f}% |")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, LatencySettings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="a quick look on the CPU: resnet50-react only, batch 16, fewer repeats")
    parser.add_argument("--device", help="cuda, cuda:1, cpu; default: cuda when available, else cpu")
    parser.add_argument("--models", nargs="+", help=f"configs/models names; default: {' '.join(PAPER_MODELS)}")
    parser.add_argument("--detectors", nargs="+", default=["nnguide", "knn", "energy"],
                        help="configs/detectors names, with their hyper-parameters")
    parser.add_argument("--batch-size", type=int, help="the large batch; default 256 on CUDA, 32 on CPU, 16 with --cpu")
    parser.add_argument("--repeats", type=int, help="timed calls at batch 1; default 50, 10 with --cpu")
    parser.add_argument("--batch-repeats", type=int, help="timed calls at the large batch; default 5, 2 with --cpu")
    parser.add_argument("--warmup", type=int, help="untimed calls before each timing; default 3, 1 with --cpu")
    parser.add_argument("--bank-size", type=int, default=12811, help="bank rows; 12811 = 1%% of ImageNet")
    parser.add_argument("--amp", choices=["off", "bf16"], default="off", help="as the pipeline's --amp")
    parser.add_argument("--channels-last", action="store_true", help="as the pipeline's --channels-last")
    parser.add_argument("--backend", help="knn/nnguide search backend (auto, faiss, torch, ...); default: theirs")
    args = parser.parse_args(argv)
    if args.cpu and args.device not in (None, "cpu"):
        parser.error("--cpu runs on the CPU; drop --device or --cpu")
    device = resolve_device("cpu" if args.cpu else args.device or "auto")
    quick = args.cpu
    args.models = args.models or (["resnet50-react"] if quick else PAPER_MODELS)
    settings = LatencySettings(
        device=device,
        batch_size=args.batch_size or (16 if quick else 256 if device.type == "cuda" else 32),
        repeats=args.repeats or (10 if quick else 50),
        batch_repeats=args.batch_repeats or (2 if quick else 5),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        bank_size=args.bank_size, amp=args.amp, channels_last=args.channels_last, backend=args.backend)
    for name in ("batch_size", "repeats", "batch_repeats", "bank_size"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if settings.warmup < 0:
        parser.error("--warmup must be zero or more")
    return args, settings


def describe(settings: LatencySettings) -> str:
    device = settings.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    precision = "bf16 autocast trunk, fp32 classifier and detectors" if settings.amp == "bf16" else "fp32"
    if device.type == "cuda":
        precision += (f" (cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
                      f"{torch.backends.cuda.matmul.allow_tf32}: PyTorch's defaults, which the pipeline keeps)")
    return (f"device: {name}; torch {torch.__version__}; {precision}; "
            f"{'channels_last' if settings.channels_last else 'contiguous'} images\n"
            f"random weights; random images already on the device; synthetic bank of {settings.bank_size} rows "
            f"on the device; search backend: {settings.backend or 'auto, the detectors default'}\n"
            f"batch 1: median of {settings.repeats} calls, batch {settings.batch_size}: median of "
            f"{settings.batch_repeats}, after {settings.warmup} warm-up calls of the forward and of each detector")


def main(argv: list[str] | None = None) -> int:
    """Prints the settings, then the table a backbone at a time (rows measured before a failure are kept)."""
    try:
        args, settings = parse_args(sys.argv[1:] if argv is None else argv)
        for name in args.detectors:  # fail on a typo before building any model
            load_detector_config(name)
        configs = [load_model_config(name) for name in args.models]
        print(describe(settings) + "\n\n" + table_header(settings.batch_size), flush=True)
        for config in configs:
            start = time.perf_counter()
            for row in measure_model(config, args.detectors, settings):
                print(table_row(row), flush=True)
            print(f"{config.name} ({config.transform.crop} px): measured in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
