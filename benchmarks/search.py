"""Time the exact top-k search against the matmul it is built on, faiss's IndexFlatIP, and the bf16 path.

For the issue's shapes (a 1% ImageNet bank, 12,811 x 2048, 15,000 queries, k=10) and for one bank block of the
full 1.28M bank (65,536 rows, the 4,096 queries of one 1 GB similarity block), it prints our fp32 search's time as a
fraction of (a) the best fp32 matmul of the same shape in this process (numpy's and torch's, into a fresh and
into a reused output; timed in turn with our search, round by round), (b) numpy's matmul in a subprocess
without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, with the kernel threadpoolctl reports, and (c) faiss-cpu's
IndexFlatIP; then the bf16 path and its candidates per query.
Usage: python benchmarks/search.py [--repeats 3] [--shapes issue block] [--no-bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")  # as main.py sets it

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_detectors.bf16 import native_bf16  # noqa: E402
from ood_detectors import search  # noqa: E402
from ood_detectors.search import InnerProductSearch, faiss_available  # noqa: E402

SHAPES = {"issue": (12811, 15000), "block": (65536, 4096)}  # (bank rows, queries); width 2048, k = 10
SUBPROCESS = """
import json, sys, time, numpy as np, threadpoolctl
rows, queries, dim, repeats = map(int, sys.argv[1:])
generator = np.random.default_rng(0)
bank, query = generator.random((rows, dim), np.float32), generator.random((queries, dim), np.float32)
query @ bank.T
times = []
for _ in range(repeats):
    start = time.perf_counter()
    query @ bank.T
    times.append(time.perf_counter() - start)
blas = [info.get("architecture") for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
print(json.dumps({"seconds": min(times), "blas": blas}))
"""


def features(n: int, dim: int, seed: int) -> torch.Tensor:
    """Normalised ReLU rows, like a ResNet's penultimate features."""
    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).relu_()
    return torch.nn.functional.normalize(rows, dim=1)


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    return interleaved_best_seconds({"": fn}, repeats)[""]


def interleaved_best_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function over `repeats` rounds that call every function once, in turn, after one
    warm-up round: a machine whose speed drifts slows all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def subprocess_matmul(rows: int, queries: int, dim: int, repeats: int) -> dict:
    """numpy's matmul in a fresh process whose environment has no OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, so
    OpenBLAS picks its kernel for this CPU itself."""
    env = {key: value for key, value in os.environ.items() if key not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    result = subprocess.run([sys.executable, "-c", SUBPROCESS, str(rows), str(queries), str(dim), str(repeats)],
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def where_the_time_goes(index: InnerProductSearch, query: torch.Tensor, k: int) -> dict[str, float]:
    """Seconds of one search spent in its matmuls, block top-ks and merges (each wrapped in a timer), and the rest."""
    spent = {"matmul": 0.0, "block top-k": 0.0, "merge": 0.0}

    def timer(part, fn):
        def timed(*args):
            start = time.perf_counter()
            result = fn(*args)
            spent[part] += time.perf_counter() - start
            return result
        return timed

    with mock.patch.dict(search.MATMULS, {name: timer("matmul", fn) for name, fn in search.MATMULS.items()}), \
            mock.patch.object(search, "block_top_k", timer("block top-k", search.block_top_k)), \
            mock.patch.object(search, "merge_top_k", timer("merge", search.merge_top_k)):
        start = time.perf_counter()
        index.search(query, k)
        total = time.perf_counter() - start
    return {**spent, "rest": total - sum(spent.values())}


def run_shape(name: str, rows: int, queries: int, repeats: int, bf16: bool) -> None:
    dim, k = 2048, 10
    bank, query = features(rows, dim, seed=0), features(queries, dim, seed=1)
    flops = 2 * rows * queries * dim
    out = np.empty((queries, rows), np.float32)
    bank_np, query_np = bank.numpy(), query.numpy()
    index = InnerProductSearch(bank, backend="auto", precision="fp32")
    searches = {"ours": lambda: index.search(query, k)}
    if faiss_available():
        import faiss
        flat = faiss.IndexFlatIP(dim)
        flat.add(bank_np)
        searches["faiss"] = lambda: flat.search(query_np, k)
    seconds = interleaved_best_seconds({
        **searches,
        "numpy matmul, fresh output": lambda: query_np @ bank_np.T,
        "numpy matmul, reused output": lambda: np.matmul(query_np, bank_np.T, out=out),
        "torch matmul, fresh output": lambda: query @ bank.T,
    }, repeats)
    ours, faiss_seconds = seconds.pop("ours"), seconds.pop("faiss", None)
    out = None  # frees the product
    print(f"\n{name}: bank {rows} x {dim}, {queries} queries, k={k}; our fp32 search uses "
          f"{index.matmul_for(query)}'s matmul")
    print("| | seconds | GFLOP/s | ours / this (time) |\n|---|---:|---:|---:|")
    print(f"| ours, fp32 | {ours:.3f} | {flops / ours / 1e9:.0f} | 1.00 |")
    for label, value in seconds.items():
        print(f"| (a) {label} | {value:.3f} | {flops / value / 1e9:.0f} | {ours / value:.3f} |")
    machine = subprocess_matmul(rows, queries, dim, repeats)
    print(f"| (b) numpy matmul, own process, kernel {'/'.join(map(str, machine['blas']))} | {machine['seconds']:.3f} "
          f"| {flops / machine['seconds'] / 1e9:.0f} | {ours / machine['seconds']:.3f} |")
    if faiss_seconds is not None:
        print(f"| (c) faiss IndexFlatIP.search | {faiss_seconds:.3f} | {flops / faiss_seconds / 1e9:.0f} "
              f"| {ours / faiss_seconds:.3f} |")
    best_in_process = min(seconds.values())
    print(f"fp32 search / best in-process matmul: {best_in_process / ours:.3f} of its speed")
    parts = where_the_time_goes(index, query, k)
    total = sum(parts.values())
    print("inside one search: " + ", ".join(f"{part} {value:.3f} s ({value / total:.1%})"
                                            for part, value in parts.items()))
    if bf16:
        half = InnerProductSearch(bank, backend="torch", precision="bf16")
        bf16_product = best_seconds(lambda: query.bfloat16() @ bank.bfloat16().T, 1)
        bf16_seconds = best_seconds(lambda: half.search(query, k), 1)
        exact_rows, rows_found = index.top_k(query, k)[1], half.top_k(query, k)[1]
        print(f"bf16 (native on this CPU: {native_bf16(torch.device('cpu'))}): product alone {bf16_product:.3f} s "
              f"({flops / bf16_product / 1e9:.0f} GFLOP/s); bf16 search {bf16_seconds:.3f} s, "
              f"{ours / bf16_seconds:.2f}x the fp32 search's speed; same rows as fp32: "
              f"{bool(torch.equal(exact_rows, rows_found))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings keep the best of this many runs")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 path (slow where bf16 is emulated)")
    args = parser.parse_args()
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}, numpy {np.__version__}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in args.shapes:
        run_shape(name, *SHAPES[name], args.repeats, not args.no_bf16)


if __name__ == "__main__":
    main()
