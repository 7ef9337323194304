"""Exact top-k inner-product search against a fixed bank: faiss (`IndexFlatIP`) or blocked matmul + top-k.

The index is built once (in a detector's `fit`) and reused for every query set. The blocked backends walk the
bank in blocks and the queries in chunks, keeping a running top-k, so memory stays bounded; a bank too large for
the queries' GPU stays in host memory and is streamed to it. On a CPU the matmul is numpy's or torch's, the
faster measured once per process (`fastest_cpu_matmul`); on GPUs it is torch's. `bank_dtype="float16"` stores
(and on GPUs multiplies) the bank in half precision: similarities keep about 3 significant digits.
Why, and what it costs: docs/design.md ("Exact search, bounded memory", "The CPU search kernel").
"""
from __future__ import annotations

import functools
import importlib.util
import time

import numpy as np
import torch

BACKENDS = ("auto", "faiss", "torch", "numpy")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection limit
CALIBRATION_MIN_FLOPS = 1e11  # CPU searches with fewer flops use torch's matmul without timing (docs/design.md)
NUMPY_PREFERENCE = 1.10  # torch's matmul replaces numpy's only when measured over 10% faster (no flip-flop on noise)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 without faiss or with faiss-cpu."""
    if not faiss_available():
        return 0
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': faiss when faiss-gpu sees a GPU, else blocked matmul + top-k with the device's fastest matmul
    (see docs/design.md, "Exact search, bounded memory"); 'torch' and 'numpy' force one matmul.

    Raises ValueError when 'faiss' is asked for and faiss is not installed."""
    if backend == "faiss" and not faiss_available():
        raise ValueError("search backend 'faiss' was asked for but faiss is not installed "
                         "(run ./install_packages.sh, or use backend='auto')")
    if backend != "auto":
        return backend
    return "faiss" if faiss_gpu_count() > 0 else "auto"


def check_search_options(backend: str, bank_dtype: str, detector: str) -> None:
    """ValueError for an unknown backend or bank_dtype; called at construction, before any feature is extracted."""
    if backend not in BACKENDS:
        raise ValueError(f"{detector}: unknown search backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"{detector}: unknown bank_dtype '{bank_dtype}'; valid: {', '.join(BANK_DTYPES)}")


def _numpy_matmul(queries: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
    """out = queries @ block.T with numpy's BLAS; CPU float32 tensors, `out` contiguous (shares their memory)."""
    np.matmul(queries.numpy(), block.numpy().T, out=out.numpy())


def _torch_matmul(queries: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(queries, block.T, out=out)


MATMULS = {"numpy": _numpy_matmul, "torch": _torch_matmul}


@functools.cache
def fastest_cpu_matmul(dim: int) -> str:
    """'numpy' or 'torch': whose blocked search (matmul + top-k) is faster on this CPU for `dim`-wide rows,
    measured once per process.

    Times one whole search step of each (512 queries against 4,096 bank rows, best of three after a warm-up);
    numpy is kept unless torch is NUMPY_PREFERENCE times faster. Why, and the measured benefit: docs/design.md
    ("The CPU search kernel").
    """
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(4096, dim, generator=generator), torch.randn(512, dim, generator=generator)
    seconds = {}
    for name in MATMULS:
        index = InnerProductSearch(bank, backend=name)
        index.search(queries, 10)  # warm-up: thread pools, page faults
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            index.search(queries, 10)
            runs.append(time.perf_counter() - start)
        seconds[name] = min(runs)
    return "torch" if seconds["torch"] * NUMPY_PREFERENCE < seconds["numpy"] else "numpy"


class InnerProductSearch:
    """The k largest inner products <query, bank_i> for each query, sorted in decreasing order.

    `bank` is an (M, D) float tensor; a bank that is not 2-D, empty or not float is a ValueError, and so is
    backend="faiss" with a bank that does not fit in the GPUs' free memory.
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto", bank_dtype: str = "float32",
                 chunk_bytes: int = 1 << 28, bank_block_rows: int = 1 << 16) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0 or not bank.is_floating_point():
            raise ValueError(f"the search bank must be a non-empty 2-D float tensor, got {bank.dtype} "
                             f"{tuple(bank.shape)}")
        check_search_options(backend, bank_dtype, "search")
        self.backend = resolve_backend(backend, bank.device)
        self.size, self.dim = bank.shape
        self.dtype = BANK_DTYPES[bank_dtype]
        self.chunk_bytes = chunk_bytes            # budget for one (queries x bank block) similarity matrix
        self.bank_block_rows = bank_block_rows    # blocked backends: bank rows per matmul
        if self.backend == "faiss":
            devices = list(range(faiss_gpu_count())) or [None]
            self._faiss_on_gpu = devices != [None]
            if not self._faiss_on_gpu or _shards_fit(self.size, self.dim, devices):
                self._index = build_faiss_index(bank, self.dtype == torch.float16, devices)
                return
            if backend == "faiss":
                raise ValueError(f"the bank ({self.size} x {self.dim}) does not fit in the free memory of "
                                 f"{len(devices)} GPU(s) for faiss; use backend='auto' or 'torch', which stream it "
                                 f"from host memory")
            self.backend = "auto"  # the blocked search streams what does not fit
        self._bank = bank.detach().to(self.dtype).contiguous()
        self._resident = {self._bank.device: self._bank}  # copies on query devices, made once

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(N, k) float32 top-k inner products of (N, D) `queries`, on their device; ValueError for another D, or
        k outside [1, M] (or above FAISS_GPU_MAX_K with faiss on GPUs)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (N, {self.dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the bank size {self.size}")
        if self.backend == "faiss":
            if self._faiss_on_gpu and k > FAISS_GPU_MAX_K:
                raise ValueError(f"k={k}: faiss on GPUs finds at most {FAISS_GPU_MAX_K} neighbours; "
                                 "use backend='auto' for larger k")
            return self._search_faiss(queries, k)
        return self._search_blocks(queries, k, self.matmul_for(queries))

    def matmul_for(self, queries: torch.Tensor) -> str:
        """The matmul a blocked search of `queries` uses: torch's on GPUs, the forced one, or on a CPU the faster."""
        if queries.device.type != "cpu":
            if self.backend == "numpy":
                raise ValueError(f"search backend 'numpy' runs on the CPU, but the queries are on {queries.device}; "
                                 f"use backend='auto' or 'torch'")
            return "torch"
        if self.backend != "auto":
            return self.backend
        if 2 * queries.shape[0] * self.size * self.dim < CALIBRATION_MIN_FLOPS:
            # not numpy's: OpenBLAS's idle threads keep spinning after each call and slow the next torch work
            return "torch"
        return fastest_cpu_matmul(self.dim)

    def _search_faiss(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        rows_per_chunk = max(1, self.chunk_bytes // (4 * self.dim))
        results = []
        for start in range(0, queries.shape[0], rows_per_chunk):
            chunk = queries[start:start + rows_per_chunk].detach().to("cpu", torch.float32).numpy()
            values, _ = self._index.search(np.ascontiguousarray(chunk), k)
            results.append(torch.from_numpy(values))
        return torch.cat(results).to(queries.device)

    def _search_blocks(self, queries: torch.Tensor, k: int, matmul: str) -> torch.Tensor:
        """Running top-k over bank blocks x query chunks, each similarity block written into one reused buffer."""
        device = queries.device
        bank = self._bank_on(device)
        # half-precision matmuls only where they are fast (GPUs); on CPUs, half is a storage format
        compute_dtype = self.dtype if device.type == "cuda" else torch.float32
        queries = queries.detach().to(compute_dtype).contiguous()
        bank_rows = min(self.size, self.bank_block_rows)
        query_rows = max(1, min(queries.shape[0], self.chunk_bytes // (4 * bank_rows)))
        buffer = torch.empty(query_rows * bank_rows, dtype=compute_dtype, device=device)
        best = torch.full((queries.shape[0], k), -torch.inf, device=device)  # running top-k, decreasing
        for b_start in range(0, self.size, bank_rows):
            # copied to the device block by block when the bank stays in host memory
            block = bank[b_start:b_start + bank_rows].to(device, compute_dtype, non_blocking=True)
            for q_start in range(0, queries.shape[0], query_rows):
                chunk = queries[q_start:q_start + query_rows]
                similarities = buffer[:chunk.shape[0] * block.shape[0]].view(chunk.shape[0], block.shape[0])
                MATMULS[matmul](chunk, block, similarities)  # (q, b)
                top = similarities.topk(min(k, block.shape[0]), dim=1).values.float()
                rows = slice(q_start, q_start + query_rows)
                best[rows] = torch.cat([best[rows], top], dim=1).topk(k, dim=1).values
        return best

    def _bank_on(self, device: torch.device) -> torch.Tensor:
        """The bank on `device` when it fits there (copied once), else where it is, to be streamed in blocks."""
        if device not in self._resident:
            if device.type != "cuda" or self._bank.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
                self._resident[device] = self._bank.to(device)
            else:
                return self._bank
        return self._resident[device]


def _shards_fit(rows: int, dim: int, devices: list[int]) -> bool:
    """Whether one float32 shard of the bank per GPU fits in half of each GPU's free memory (faiss keeps its
    shard resident and needs scratch space beside it; float16 storage is not counted on, to stay safe)."""
    if not torch.cuda.is_available():  # faiss sees GPUs torch cannot measure: leave the choice to faiss
        return True
    shard_bytes = -(-rows // len(devices)) * dim * 4
    return all(shard_bytes < torch.cuda.mem_get_info(device)[0] // 2 for device in devices)


def build_faiss_index(bank: torch.Tensor, half: bool, devices: list[int | None]):
    """A flat inner-product index over the bank, on `devices` (GPU ids, or None for the CPU).

    Several devices get one contiguous shard of the bank each, searched in parallel and merged exactly by
    faiss's `IndexShards`; a `None` device keeps its shard on the CPU, which lets the merge run without GPUs.
    """
    import faiss
    vectors = bank.detach().to("cpu", torch.float32).numpy()
    devices = devices[:len(vectors)]  # never an empty shard
    shards = [_flat_index(np.ascontiguousarray(part), half, device)
              for part, device in zip(np.array_split(vectors, len(devices)), devices)]
    if len(shards) == 1:
        return shards[0]
    sharded = faiss.IndexShards(vectors.shape[1], True, True)  # threaded, successive ids; metric from the shards
    for shard in shards:
        sharded.add_shard(shard)
    return sharded


def _flat_index(vectors: np.ndarray, half: bool, device: int | None):
    """Exact inner products over `vectors`, stored in half precision if `half`, on GPU `device` or the CPU."""
    import faiss
    dim = vectors.shape[1]
    if device is None:
        index = (faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                 if half else faiss.IndexFlatIP(dim))
    else:  # filled straight from host memory: no CPU index holding a second copy of the bank
        config = faiss.GpuIndexFlatConfig()
        config.device, config.useFloat16 = device, half
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim, config)
        index.referenced_objects = [resources]  # faiss's idiom: the resources live as long as the index
    index.add(vectors)
    return index
