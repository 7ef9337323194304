"""Exact top-k inner-product search against a fixed bank: faiss (`IndexFlatIP`) or chunked torch matmul + topk.

The index is built once (in a detector's `fit`) and reused for every query set. Memory stays bounded: the
torch backend walks the bank in blocks and the queries in chunks, keeping a running top-k, and a bank too
large for the queries' GPU stays in host memory and is streamed to it block by block. `bank_dtype="float16"`
stores (and on GPUs multiplies) the bank in half precision: about twice as fast and half the memory, at the
cost of rounding every similarity to about 3 significant digits.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

BACKENDS = ("auto", "faiss", "torch")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _faiss_gpus() -> int:
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': faiss on GPUs when faiss-gpu sees one, else torch (as fast as faiss on a CPU, see the README)."""
    if backend == "faiss" and not faiss_available():
        raise ValueError("search backend 'faiss' was asked for but faiss is not installed "
                         "(run ./install_packages.sh, or use backend='torch')")
    if backend != "auto":
        return backend
    return "faiss" if faiss_available() and _faiss_gpus() > 0 else "torch"


def check_search_options(backend: str, bank_dtype: str, detector: str) -> None:
    """Hyper-parameter checks at construction, so a typo fails before any feature is extracted."""
    if backend not in BACKENDS:
        raise ValueError(f"{detector}: unknown search backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"{detector}: unknown bank_dtype '{bank_dtype}'; valid: {', '.join(BANK_DTYPES)}")


class InnerProductSearch:
    """The k largest inner products <query, bank_i> for each query, sorted in decreasing order."""

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
        self.bank_block_rows = bank_block_rows    # torch backend: bank rows per matmul
        if self.backend == "faiss":
            self._index = _build_faiss_index(bank, half=self.dtype == torch.float16)
        else:
            self._bank = bank.detach().to(self.dtype).contiguous()
            self._resident = {self._bank.device: self._bank}  # copies on query devices, made once

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(N, k) float32 tensor of the top-k inner products, on the queries' device."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (N, {self.dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the bank size {self.size}")
        if self.backend == "faiss":
            return self._search_faiss(queries, k)
        return self._search_torch(queries, k)

    def _search_faiss(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        rows_per_chunk = max(1, self.chunk_bytes // (4 * self.dim))
        results = []
        for start in range(0, queries.shape[0], rows_per_chunk):
            chunk = queries[start:start + rows_per_chunk].detach().to("cpu", torch.float32).numpy()
            values, _ = self._index.search(np.ascontiguousarray(chunk), k)
            results.append(torch.from_numpy(values))
        return torch.cat(results).to(queries.device)

    def _search_torch(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        device = queries.device
        bank = self._bank_on(device)
        # half-precision matmuls only where they are fast (GPUs); on CPUs, half is a storage format
        compute_dtype = self.dtype if device.type == "cuda" else torch.float32
        queries = queries.detach().to(compute_dtype)
        bank_rows = min(self.size, self.bank_block_rows)
        query_rows = max(1, self.chunk_bytes // (4 * bank_rows))
        best = torch.full((queries.shape[0], k), -torch.inf, device=device)  # running top-k, decreasing
        for b_start in range(0, self.size, bank_rows):
            block = bank[b_start:b_start + bank_rows].to(device, compute_dtype, non_blocking=True)  # streamed if on host
            for q_start in range(0, queries.shape[0], query_rows):
                similarities = queries[q_start:q_start + query_rows] @ block.T  # (q, b)
                top = similarities.topk(min(k, similarities.shape[1]), dim=1).values.float()
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


def _build_faiss_index(bank: torch.Tensor, half: bool):
    """A flat inner-product index over the bank; on the GPU(s) when faiss was built with GPU support,
    sharded across all of them when there are several."""
    import faiss
    vectors = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
    gpus = _faiss_gpus()
    if half and gpus == 0:  # exact inner products over fp16-stored vectors
        index = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                           faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    if gpus > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard, options.useFloat16 = True, half
        return faiss.index_cpu_to_all_gpus(index, co=options)
    if gpus == 1:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = half
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, options)
    return index
