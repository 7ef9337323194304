"""Time fit and score of every detector on ImageNet-shaped synthetic outputs, beside the official code's.

Shapes follow the paper's setting: a 1% ImageNet bank (12,811 x 2048), 50,000 ID and 10,000 OOD queries,
1000 classes. For knn and nnguide the achieved GFLOP/s of scoring (2 * queries * bank * dim flops for the
inner products) is printed next to the best plain fp32 matmul of the same shape on the same device, numpy's
and torch's, the practical limit. `--official` also times the official repository's knn, nnguide, vim and
ssd (benchmarks/official_detectors.py) on the same outputs, on a CPU.
Usage: python benchmarks/detectors.py [--small] [--device cuda] [--backend auto] [--queries 10000 5000] [--official]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")  # as main.py sets it

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_detectors import available_detectors, create_detector  # noqa: E402
from ood_evaluation.metrics import ood_metrics  # noqa: E402
from ood_detectors.search import InnerProductSearch, faiss_gpu_count, resolve_backend  # noqa: E402
from benchmarks.official_detectors import OFFICIAL  # noqa: E402


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
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="knn/nnguide search precision (bf16: bf16 candidates, the fp32 neighbours)")
    parser.add_argument("--queries", type=int, nargs=2, default=[50000, 10000], metavar=("ID", "OOD"),
                        help="query rows: ID and OOD (default: ImageNet's 50,000 validation images and 10,000 OOD)")
    parser.add_argument("--official", action="store_true",
                        help="also time the official code's knn, nnguide, vim and ssd (CPU only; needs faiss)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.official and device.type != "cpu":
        parser.error("--official runs the official code's numpy/faiss-cpu computations: use it with --device cpu")
    bank_size, (id_size, ood_size), dim, classes = args.bank_size, args.queries, 2048, 1000
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
    if backend != "faiss":
        where = f", {InnerProductSearch(bank['feas'], backend=args.backend).matmul_for(queries['feas'])}'s matmul"
    print(f"search backend: {backend}{where}")

    matmul_rate = best_matmul_rate(queries["feas"], bank["feas"], args.repeats)
    inner_product_flops = 2 * (id_size + ood_size) * bank_size * dim
    official = "| official fit + score (s) | ours / official " if args.official else ""
    print(f"\n| detector | fit (s) | score {id_size + ood_size} (s) | GFLOP/s | % of best matmul {official}|")
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if args.official else ""))
    fp16_effects = []
    for detector_name in args.detectors:
        searches = detector_name in ("knn", "nnguide")
        kwargs = ({"backend": args.backend, "bank_dtype": args.bank_dtype, "precision": args.precision}
                  if searches else {})
        detector, fit_seconds = timed(lambda: create_detector(detector_name, **kwargs).fit(bank), device)
        scores = detector.score_samples(queries)  # warm-up (moves the bank to the device, autotuning)
        _, score_seconds = timed(lambda: detector.score_samples(queries), device, args.repeats)
        rate = inner_product_flops / score_seconds / 1e9 if searches else None
        cells = f"{rate:.0f} | {100 * rate / matmul_rate:.0f}%" if rate else "- | -"
        if args.official:
            cells += f" | {official_cells(detector_name, bank, queries, scores, fit_seconds + score_seconds)}"
        print(f"| {detector_name} | {fit_seconds:.2f} | {score_seconds:.3f} | {cells} |")
        if searches and args.bank_dtype != "float32":
            fp16_effects.append(half_precision_effect(detector, detector_name, args.backend, bank, queries, id_size))
    for line in fp16_effects:
        print(line)


def best_matmul_rate(queries: torch.Tensor, bank: torch.Tensor, repeats: int) -> float:
    """GFLOP/s of the fastest plain fp32 matmul queries @ bank.T on the queries' device (numpy's and torch's on a
    CPU, torch's on a GPU), each rate printed; a bank over 65,536 rows is cut there (the product must fit)."""
    block = bank[:65536]
    flops = 2 * queries.shape[0] * block.shape[0] * queries.shape[1]
    kernels = {"torch": lambda: queries @ block.T}
    if queries.device.type == "cpu":
        queries_np, block_np = queries.numpy(), block.numpy()
        kernels["numpy"] = lambda: queries_np @ block_np.T
    rates = {}
    for name, kernel in kernels.items():
        _, seconds = timed(kernel, queries.device, repeats)
        rates[name] = flops / seconds / 1e9
        print(f"plain {name} matmul ({queries.shape[0]} x {queries.shape[1]}) @ ({queries.shape[1]} x "
              f"{block.shape[0]}): {seconds:.3f} s, {rates[name]:.0f} GFLOP/s")
    return max(rates.values())


def official_cells(name: str, bank, queries, scores: torch.Tensor, our_seconds: float) -> str:
    """'official seconds | ours/official' for the detectors the official code has, after checking it computes
    our scores (SSD's official score is exp(-d / 4096) of our -d; the check is skipped where that saturates)."""
    if name not in OFFICIAL:
        return "- | -"
    start = time.perf_counter()
    with np.errstate(over="ignore", under="ignore"):
        official_scores = OFFICIAL[name]().fit(bank).score_samples(queries)
    seconds = time.perf_counter() - start
    if name == "ssd":
        official_scores = 4096 * torch.log(official_scores)
    if official_scores.isfinite().all():
        torch.testing.assert_close(scores.double(), official_scores.double(), rtol=1e-3, atol=1e-4)
    return f"{seconds:.2f} | {our_seconds / seconds:.2f}x"


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
