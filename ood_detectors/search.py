"""Exact top-k inner-product search against a fixed bank: faiss `IndexFlatIP` or chunked torch matmul + topk.

The index is built once (in a detector's `fit`) and reused for every query set. Both backends compute the
same fp32 inner products; queries and bank blocks are processed in chunks so memory stays bounded.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

BACKENDS = ("auto", "faiss", "torch")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _faiss_gpus() -> int:
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' picks faiss when it is installed and can run where the bank lives, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("search backend 'faiss' was asked for but faiss is not installed "
                         "(run ./install_packages.sh, or use backend='torch')")
    if backend != "auto":
        return backend
    if faiss_available() and (device.type == "cpu" or _faiss_gpus() > 0):
        return "faiss"
    return "torch"


class InnerProductSearch:
    """The k largest inner products <query, bank_i> for each query, sorted in decreasing order."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto", chunk_bytes: int = 1 << 28,
                 bank_block_rows: int = 1 << 16) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0 or not bank.is_floating_point():
            raise ValueError(f"the search bank must be a non-empty 2-D float tensor, got {bank.dtype} "
                             f"{tuple(bank.shape)}")
        self.backend = resolve_backend(backend, bank.device)
        self.size, self.dim = bank.shape
        self.chunk_bytes = chunk_bytes            # budget for one (queries x bank block) similarity matrix
        self.bank_block_rows = bank_block_rows    # torch backend: bank rows per matmul
        if self.backend == "faiss":
            self._index = _build_faiss_index(bank)
        else:
            self._banks = {bank.device: bank.float().contiguous()}  # one copy per device, made once

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
        if device not in self._banks:
            self._banks[device] = next(iter(self._banks.values())).to(device)
        bank = self._banks[device]
        bank_rows = min(self.size, self.bank_block_rows)
        query_rows = max(1, self.chunk_bytes // (4 * bank_rows))
        results = []
        for q_start in range(0, queries.shape[0], query_rows):
            chunk = queries[q_start:q_start + query_rows].to(torch.float32)
            best = None
            for b_start in range(0, self.size, bank_rows):
                similarities = chunk @ bank[b_start:b_start + bank_rows].T  # (q, b)
                top = similarities.topk(min(k, similarities.shape[1]), dim=1).values
                best = top if best is None else torch.cat([best, top], dim=1).topk(k, dim=1).values
            results.append(best)
        return torch.cat(results)


def _build_faiss_index(bank: torch.Tensor):
    """An IndexFlatIP over the bank, moved to the bank's GPU when faiss was built with GPU support."""
    import faiss
    vectors = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    if _faiss_gpus() > 0:
        gpu = bank.device.index if bank.device.type == "cuda" and bank.device.index is not None else 0
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
    return index
