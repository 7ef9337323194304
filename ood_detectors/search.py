"""Exact top-k inner-product search against a fixed bank: faiss (`IndexFlatIP`) or blocked matmul + top-k.

The index is built once (in a detector's `fit`) and reused for every query set. The blocked backends walk the
bank in blocks and the queries in chunks, keeping a running top-k (topk.py), so memory stays bounded; a bank
too large for the queries' GPU stays in host memory and is streamed to it. On a CPU the matmul is numpy's for
searches of at least NUMPY_MIN_FLOPS and torch's below; on GPUs it is torch's. `precision="bf16"` finds
candidates with a bfloat16 product and ranks them by their fp32 similarities (bf16.py): the fp32 search's
neighbours, faster where the hardware multiplies bf16 ("auto" chooses it there for large searches).
`bank_dtype="float16"` stores (and on GPUs multiplies) the bank in half precision: similarities keep about 3
significant digits. Why, and what it costs: docs/design.md ("Exact search, bounded memory", "The CPU search
kernel", "bf16 candidates, fp32 neighbours").
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from ood_detectors import bf16
from ood_detectors.topk import block_top_k, merge_top_k

BACKENDS = ("auto", "faiss", "torch", "numpy")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16")
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection limit
NUMPY_MIN_FLOPS = 1e11  # CPU 'auto': numpy's matmul from this many flops, torch's below (docs/design.md)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 without faiss or with faiss-cpu."""
    if not faiss_available():
        return 0
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': faiss when faiss-gpu sees a GPU, else blocked matmul + top-k with the device's matmul
    (see docs/design.md, "Exact search, bounded memory"); 'torch' and 'numpy' force one matmul.

    Raises ValueError when 'faiss' is asked for and faiss is not installed."""
    if backend == "faiss" and not faiss_available():
        raise ValueError("search backend 'faiss' was asked for but faiss is not installed "
                         "(run ./install_packages.sh, or use backend='auto')")
    if backend != "auto":
        return backend
    return "faiss" if faiss_gpu_count() > 0 else "auto"


def check_search_options(backend: str, bank_dtype: str, precision: str, detector: str) -> None:
    """ValueError for an unknown backend, bank_dtype or precision, or for bf16 with a backend or bank that cannot
    give it; called at construction, before any feature is extracted."""
    if backend not in BACKENDS:
        raise ValueError(f"{detector}: unknown search backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"{detector}: unknown bank_dtype '{bank_dtype}'; valid: {', '.join(BANK_DTYPES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"{detector}: unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision == "bf16" and (backend in ("numpy", "faiss") or bank_dtype != "float32"):
        raise ValueError(f"{detector}: precision 'bf16' multiplies with torch and ranks by the float32 bank; "
                         f"got backend '{backend}', bank_dtype '{bank_dtype}' (use 'auto' or 'torch', 'float32')")


def _numpy_matmul(queries: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
    """out = queries @ block.T with numpy's BLAS; CPU float32 tensors, `out` contiguous (shares their memory)."""
    np.matmul(queries.numpy(), block.numpy().T, out=out.numpy())


def _torch_matmul(queries: torch.Tensor, block: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(queries, block.T, out=out)


MATMULS = {"numpy": _numpy_matmul, "torch": _torch_matmul}


class InnerProductSearch:
    """The k largest inner products <query, bank_i> for each query, sorted in decreasing order.

    `bank` is an (M, D) float tensor; a bank that is not 2-D, empty or not float is a ValueError, and so is
    backend="faiss" with a bank that does not fit in the GPUs' free memory. `precision`: "fp32", "bf16"
    (bf16 candidates, fp32 neighbours) or "auto" (bf16 where the device multiplies it natively and the search
    has at least bf16.MIN_FLOPS; see docs/design.md).
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto", bank_dtype: str = "float32",
                 precision: str = "auto", chunk_bytes: int = 1 << 30, bank_block_rows: int = 1 << 16) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0 or not bank.is_floating_point():
            raise ValueError(f"the search bank must be a non-empty 2-D float tensor, got {bank.dtype} "
                             f"{tuple(bank.shape)}")
        check_search_options(backend, bank_dtype, precision, "search")
        # bf16 asked for: the blocked search, even where faiss-gpu would be the default
        self.backend = "auto" if precision == "bf16" else resolve_backend(backend, bank.device)
        self.precision = precision
        self.size, self.dim = bank.shape
        self.dtype = BANK_DTYPES[bank_dtype]
        self.chunk_bytes = chunk_bytes  # one (queries x bank block) similarity matrix: 1 GB holds 15,000 x 12,811
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
        self._bf16_bank: tuple[torch.Tensor, torch.Tensor] | None = None  # made at the first bf16 search
        self._bf16_resident: dict[torch.device, torch.Tensor] = {}
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # similarity blocks, reused

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(N, k) float32 top-k inner products of (N, D) `queries`, on their device; ValueError for another D, or
        k outside [1, M] (or above FAISS_GPU_MAX_K with faiss on GPUs)."""
        return self.top_k(queries, k)[0]

    def top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`search`'s (N, k) inner products and the (N, k) int64 bank rows they come from."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (N, {self.dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the bank size {self.size}")
        if self.backend == "faiss":
            if self._faiss_on_gpu and k > FAISS_GPU_MAX_K:
                raise ValueError(f"k={k}: faiss on GPUs finds at most {FAISS_GPU_MAX_K} neighbours; "
                                 "use backend='auto' for larger k")
            return self._search_faiss(queries, k)
        bank_rows = min(self.size, self.bank_block_rows)
        query_rows = max(1, min(queries.shape[0], self.chunk_bytes // (4 * bank_rows)))  # one block's rows
        if self.uses_bf16(queries):
            buffer = (self._buffer(query_rows * bank_rows, torch.bfloat16, queries.device)
                      if queries.device.type == "cpu" else None)  # GPUs return the product in float32
            return bf16.top_k(queries, k, self._bank, *self._bf16_bank_on(queries.device), bank_rows, query_rows,
                              self.chunk_bytes, buffer)
        return self._search_blocks(queries, k, self.matmul_for(queries), bank_rows, query_rows)

    def _flops(self, queries: torch.Tensor) -> int:
        return 2 * queries.shape[0] * self.size * self.dim

    def uses_bf16(self, queries: torch.Tensor) -> bool:
        """Whether a search of `queries` finds candidates in bf16: asked for, or on 'auto' a large enough search
        of a float32 bank by torch on a device that multiplies bf16 natively."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return (self.backend in ("auto", "torch") and self.dtype == torch.float32
                and self._flops(queries) >= bf16.MIN_FLOPS and bf16.native_bf16(queries.device))

    def matmul_for(self, queries: torch.Tensor) -> str:
        """The fp32 matmul a blocked search of `queries` uses: torch's on GPUs, the forced one, or on a CPU numpy's
        for searches of at least NUMPY_MIN_FLOPS and torch's below (docs/design.md, "The CPU search kernel")."""
        if queries.device.type != "cpu":
            if self.backend == "numpy":
                raise ValueError(f"search backend 'numpy' runs on the CPU, but the queries are on {queries.device}; "
                                 f"use backend='auto' or 'torch'")
            return "torch"
        if self.backend != "auto":
            return self.backend
        return "numpy" if self._flops(queries) >= NUMPY_MIN_FLOPS else "torch"

    def _search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows_per_chunk = max(1, self.chunk_bytes // (4 * self.dim))
        values, rows = [], []
        for start in range(0, queries.shape[0], rows_per_chunk):
            chunk = queries[start:start + rows_per_chunk].detach().to("cpu", torch.float32).numpy()
            chunk_values, chunk_rows = self._index.search(np.ascontiguousarray(chunk), k)
            values.append(torch.from_numpy(chunk_values))
            rows.append(torch.from_numpy(chunk_rows))
        return torch.cat(values).to(queries.device), torch.cat(rows).to(queries.device)

    def _search_blocks(self, queries: torch.Tensor, k: int, matmul: str, bank_rows: int,
                       query_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-k over bank blocks x query chunks, each similarity block written into one reused buffer."""
        device = queries.device
        bank = _on_device(self._bank, device, self._resident)
        # half-precision matmuls only where they are fast (GPUs); on CPUs, half is a storage format
        compute_dtype = self.dtype if device.type == "cuda" else torch.float32
        queries = queries.detach().to(compute_dtype).contiguous()
        buffer = self._buffer(query_rows * bank_rows, compute_dtype, device)
        values = torch.full((queries.shape[0], k), -torch.inf, device=device)  # running top-k, decreasing
        rows = torch.zeros((queries.shape[0], k), dtype=torch.int64, device=device)
        for b_start in range(0, self.size, bank_rows):
            # copied to the device block by block when the bank stays in host memory
            block = bank[b_start:b_start + bank_rows].to(device, compute_dtype, non_blocking=True)
            for q_start in range(0, queries.shape[0], query_rows):
                chunk = queries[q_start:q_start + query_rows]
                similarities = buffer[:chunk.shape[0] * block.shape[0]].view(chunk.shape[0], block.shape[0])
                MATMULS[matmul](chunk, block, similarities)  # (q, b)
                block_values, columns = block_top_k(similarities, k)
                part = slice(q_start, q_start + chunk.shape[0])
                values[part], rows[part] = merge_top_k(values[part], rows[part], block_values, columns + b_start, k)
        return values, rows

    def _buffer(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised similarity buffer of at least `size` elements, kept for the next search: a fresh one's
        pages fault inside the first matmul, 5-7% of a search on a 2-core VM. On CPUs numpy allocates it and asks
        Linux for huge pages: matmuls into it ran 4% faster than into torch's 4 KB pages (2-core AMD EPYC)."""
        key = (device, dtype)
        if key not in self._buffers or self._buffers[key].numel() < size:
            self._buffers[key] = (torch.empty(size, dtype=dtype, device=device) if device.type != "cpu" else
                                  torch.from_numpy(np.empty(size * dtype.itemsize, np.uint8)).view(dtype))
        return self._buffers[key]

    def _bf16_bank_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank in bf16 on `device` (when it fits there, else in host memory) and its rows' norms on `device`,
        both made at the first bf16 search."""
        if self._bf16_bank is None:
            self._bf16_bank = bf16.round_bank(self._bank, self.chunk_bytes)
            self._bf16_resident[self._bank.device] = self._bf16_bank[0]
        bank16, norms = self._bf16_bank
        return _on_device(bank16, device, self._bf16_resident), norms.to(device)


def _on_device(bank: torch.Tensor, device: torch.device, resident: dict[torch.device, torch.Tensor]) -> torch.Tensor:
    """`bank` on `device` when it fits there (copied once, kept in `resident`), else where it is, to be streamed
    in blocks."""
    if device not in resident:
        if device.type != "cuda" or bank.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
            resident[device] = bank.to(device)
        else:
            return bank
    return resident[device]


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
