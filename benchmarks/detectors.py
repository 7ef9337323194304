"""Time fit and score of every detector on ImageNet-shaped synthetic outputs.

Shapes follow the paper's setting: a 1% ImageNet bank (12,811 x 2048), 50,000 ID and 10,000 OOD queries,
1000 classes. For knn and nnguide the achieved GFLOP/s of scoring (2 * queries * bank * dim flops for the
inner products) is printed next to a plain fp32 matmul of the same shape on the same device, the practical
limit. Usage: python benchmarks/detectors.py [--small] [--device cuda] [--backend torch]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_detectors import available_detectors, create_detector  # noqa: E402
from ood_detectors.metrics import ood_metrics  # noqa: E402
from ood_detectors.search import faiss_gpu_count, resolve_backend  # noqa: E402


def synthetic_outputs(n: int, weight: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """ReLU features like a ResNet's penultimate layer, their logits, random labels; on weight's device."""
    dim, classes = weight.shape
    raw = torch.randn(n, dim, generator=generator, device=weight.device).relu_()
    return {"feas": torch.nn.functional.normalize(raw, dim=1), "logits": raw @ weight,
            "labels": torch.randint(0, classes, (n,), generator=generator, device=weight.device)}


def timed(fn, device: torch.device, repeats: int = 1):
    """(result, best seconds over repeats) with the device synchronised around each call."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="10x smaller shapes, for a quick run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="nearest-neighbour search: auto, faiss or torch")
    parser.add_argument("--repeats", type=int, default=2, help="timings keep the best of this many runs")
    parser.add_argument("--detectors", nargs="+", default=available_detectors())
    parser.add_argument("--bank-size", type=int, default=12811, help="1%% of ImageNet; 1281167 for all of it")
    parser.add_argument("--bank-dtype", default="float32", choices=["float32", "float16"],
                        help="knn/nnguide bank precision; float16 also reports how far scores move from float32")
    args = parser.parse_args()

    device = torch.device(args.device)
    bank_size, id_size, ood_size, dim, classes = args.bank_size, 50000, 10000, 2048, 1000
    if args.small:
        bank_size, id_size, ood_size = bank_size // 10, id_size // 10, ood_size // 10
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(dim, classes, generator=generator, device=device) / dim ** 0.5
    bank = synthetic_outputs(bank_size, weight, generator)
    queries = synthetic_outputs(id_size + ood_size, weight, generator)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; bank {bank_size} x {dim}, queries {id_size} ID + {ood_size} OOD, {classes} classes")
    backend, gpus = resolve_backend(args.backend, device), faiss_gpu_count()
    where = f" on {gpus} GPU(s){', one bank shard each' if gpus > 1 else ''}" if backend == "faiss" and gpus else ""
    print(f"search backend: {backend}{where}")

    inner_product_flops = 2 * (id_size + ood_size) * bank_size * dim
    block = bank["feas"][:65536].T.contiguous()  # a larger bank's full product would not fit in memory
    _, matmul_seconds = timed(lambda: queries["feas"] @ block, device, args.repeats)
    matmul_rate = 2 * (id_size + ood_size) * block.shape[1] * dim / matmul_seconds / 1e9
    print(f"plain matmul ({id_size + ood_size} x {dim}) @ ({dim} x {min(bank_size, 65536)}): "
          f"{matmul_seconds:.3f} s, {matmul_rate:.0f} GFLOP/s")

    print(f"\n| detector | fit (s) | score {id_size + ood_size} (s) | GFLOP/s | % of matmul |")
    print("|---|---:|---:|---:|---:|")
    fp16_effects = []
    for detector_name in args.detectors:
        searches = detector_name in ("knn", "nnguide")
        kwargs = {"backend": args.backend, "bank_dtype": args.bank_dtype} if searches else {}
        detector, fit_seconds = timed(lambda: create_detector(detector_name, **kwargs).fit(bank), device)
        detector.score_samples(queries)  # warm-up (moves the bank to the device, autotuning)
        _, score_seconds = timed(lambda: detector.score_samples(queries), device, args.repeats)
        rate = inner_product_flops / score_seconds / 1e9 if searches else None
        rate_cells = f"{rate:.0f} | {100 * rate / matmul_rate:.0f}%" if rate else "- | -"
        print(f"| {detector_name} | {fit_seconds:.2f} | {score_seconds:.3f} | {rate_cells} |")
        if searches and args.bank_dtype != "float32":
            fp16_effects.append(half_precision_effect(detector, detector_name, args.backend, bank, queries, id_size))
    for line in fp16_effects:
        print(line)


def half_precision_effect(half_detector, name: str, backend: str, bank, queries, id_size: int) -> str:
    """How far float16-bank scores are from float32 ones, and what that does to AUROC/FPR95 of ID vs OOD rows."""
    half = half_detector.score_samples(queries)
    exact = create_detector(name, backend=backend).fit(bank).score_samples(queries)
    relative = ((half - exact).abs().max() / exact.abs().max()).item()
    half_metrics = ood_metrics(half[:id_size], half[id_size:])
    exact_metrics = ood_metrics(exact[:id_size], exact[id_size:])
    changes = {m: 100 * abs(half_metrics[m] - exact_metrics[m]) for m in ("auroc", "fpr95")}
    return (f"{name} float16 vs float32: max |score change| = {relative:.1e} of the largest score; "
            f"|AUROC change| = {changes['auroc']:.4f} points, |FPR95 change| = {changes['fpr95']:.4f} points "
            f"(synthetic ID/OOD halves)")


if __name__ == "__main__":
    main()
