"""Extraction throughput: data loading alone vs. loading + a random-initialised ResNet-50 forward.

Writes synthetic ImageNet-sized JPEGs (500 x 375, smooth random content) into a temporary class-folder
tree, reads them through the real dataset, transforms and DataLoader settings, and runs the pipeline's own
FeatureExtractor with an empty cache. The network is not the bottleneck when end-to-end extraction reaches
about the loading-alone rate. Usage: python benchmarks/extraction.py [--images 4000] [--device cuda]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders import DatasetConfig, build_dataset  # noqa: E402
from models import Backbone, TransformConfig  # noqa: E402
from pipeline.features.extract import ExtractionSettings, FeatureExtractor, make_loader  # noqa: E402


def write_jpeg(args: tuple[Path, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)  # upsampled: compresses like a photo
    image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
    image.save(path, quality=90)


def write_images(root: Path, count: int, classes: int = 10) -> None:
    jobs = []
    for index in range(count):
        folder = root / f"n{index % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"img_{index:06d}.JPEG", index))
    with multiprocessing.Pool() as pool:
        pool.map(write_jpeg, jobs, chunksize=64)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_images(scratch / "images", args.images)
        dataset = build_dataset(DatasetConfig("synthetic", "class_folders", {"test": "images"}), "test", scratch,
                                TransformConfig().build())
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
              f"{len(dataset)} JPEGs 500x375, batch {args.batch_size}, {args.num_workers} workers")
        print("\n| stage | images/s | % of loading alone |\n|---|---:|---:|")

        settings = ExtractionSettings(device, args.batch_size, args.num_workers, "off", False, 10000)
        for _ in range(2):  # only the second pass counts: the first warms the page cache, as a real run finds it
            start = time.perf_counter()
            for images, _ in make_loader(dataset, settings):
                images.to(device, non_blocking=True)
            synchronise(device)
        loading_rate = len(dataset) / (time.perf_counter() - start)
        print(f"| data loading alone | {loading_rate:.0f} | 100% |")

        backbone = Backbone(torchvision.models.resnet50(), "fc").eval()
        with torch.inference_mode():  # CUDA context and kernel selection happen once per run, not per image
            backbone.to(device).features(torch.zeros(args.batch_size, 3, 224, 224, device=device))
        for label, amp, channels_last in [("fp32", "off", False), ("bf16 + channels_last", "bf16", True)]:
            settings = ExtractionSettings(device, args.batch_size, args.num_workers, amp, channels_last, 10000)
            extractor = FeatureExtractor(backbone, {"model": "resnet50-random"}, scratch / f"cache-{label}", settings)
            start = time.perf_counter()
            features = extractor.features(dataset, {"dataset": "synthetic", "images": dataset.fingerprint()},
                                          "synthetic")
            synchronise(device)
            rate = len(features) / (time.perf_counter() - start)
            print(f"| extraction, ResNet-50 {label} | {rate:.0f} | {100 * rate / loading_rate:.0f}% |")


if __name__ == "__main__":
    main()
