"""Exact top-k inner-product search against a fixed bank: faiss (`IndexFlatIP`) or blocked matmul + top-k.

The index is built once (in a detector's `fit`) and reused for every query set. The blocked backends walk the
bank in blocks and the queries in chunks, keeping a running top-k, so memory stays bounded; a bank too large for
the queries' GPU stays in host memory and is streamed to it. On a CPU the matmul is numpy's for searches of at
least NUMPY_MIN_FLOPS and torch's below; on GPUs it is torch's. `precision="bf16"` finds candidates with a
bfloat16 product and ranks them by their fp32 similarities: the fp32 search's neighbours, faster where the
hardware multiplies bf16 ("auto" chooses it there for large searches). `bank_dtype="float16"` stores (and on
GPUs multiplies) the bank in half precision: similarities keep about 3 significant digits.
Why, and what it costs: docs/design.md ("Exact search, bounded memory", "The CPU search kernel",
"bf16 candidates, fp32 neighbours").
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("auto", "faiss", "torch", "numpy")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16")
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection limit
NUMPY_MIN_FLOPS = 1e11  # CPU 'auto': numpy's matmul from this many flops, torch's below (docs/design.md)
BF16_MIN_FLOPS = 1e11   # precision 'auto': bf16 candidates from this many flops, where bf16 is native
GROUP = 32              # block top-k: columns per group whose maximum is taken (docs/design.md)
BF16_UNIT_ROUNDOFF = 2.0 ** -8
ACCUMULATION_UNIT_ROUNDOFF = 2.0 ** -23  # fp32 sums, rounded to nearest (2^-24) or truncated (tensor cores)
BOUND_SCALE = 1.0  # multiplies the bf16 rounding bound (docs/design.md); the tests show 0.5 loses neighbours


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


@functools.cache
def _cpu_has_bf16() -> bool:
    """Whether this CPU's flags (Linux's /proc/cpuinfo) include AVX512-BF16 or AMX-BF16."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU with bf16 tensor cores, or a CPU with
    AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and _cpu_has_bf16()


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
    has at least BF16_MIN_FLOPS; see docs/design.md).
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto", bank_dtype: str = "float32",
                 precision: str = "auto", chunk_bytes: int = 1 << 28, bank_block_rows: int = 1 << 16) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0 or not bank.is_floating_point():
            raise ValueError(f"the search bank must be a non-empty 2-D float tensor, got {bank.dtype} "
                             f"{tuple(bank.shape)}")
        check_search_options(backend, bank_dtype, precision, "search")
        # bf16 asked for: the blocked search, even where faiss-gpu would be the default
        self.backend = "auto" if precision == "bf16" else resolve_backend(backend, bank.device)
        self.precision = precision
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
        self._bf16_bank: tuple[torch.Tensor, torch.Tensor] | None = None  # made at the first bf16 search
        self._bf16_resident: dict[torch.device, torch.Tensor] = {}

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
        if self.uses_bf16(queries):
            return self._search_bf16(queries, k)
        return self._search_blocks(queries, k, self.matmul_for(queries))

    def _flops(self, queries: torch.Tensor) -> int:
        return 2 * queries.shape[0] * self.size * self.dim

    def uses_bf16(self, queries: torch.Tensor) -> bool:
        """Whether a search of `queries` finds candidates in bf16: asked for, or on 'auto' a large enough search
        of a float32 bank by torch on a device that multiplies bf16 natively."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return (self.backend in ("auto", "torch") and self.dtype == torch.float32
                and self._flops(queries) >= BF16_MIN_FLOPS and native_bf16(queries.device))

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

    def _search_blocks(self, queries: torch.Tensor, k: int, matmul: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-k over bank blocks x query chunks, each similarity block written into one reused buffer."""
        device = queries.device
        bank = _on_device(self._bank, device, self._resident)
        # half-precision matmuls only where they are fast (GPUs); on CPUs, half is a storage format
        compute_dtype = self.dtype if device.type == "cuda" else torch.float32
        queries = queries.detach().to(compute_dtype).contiguous()
        bank_rows = min(self.size, self.bank_block_rows)
        query_rows = max(1, min(queries.shape[0], self.chunk_bytes // (4 * bank_rows)))
        buffer = _scratch(query_rows * bank_rows, compute_dtype, device)
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

    def _search_bf16(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 top-k, ranked among candidates found with a bf16 product: every bank row whose bf16
        similarity is within the rounding bounds of the k-th largest (docs/design.md, "bf16 candidates, fp32
        neighbours"). Query chunks outer, so each chunk's candidates are final after one pass over the bank."""
        device = queries.device
        bank16, bank_norms = self._bf16_bank_on(device)
        largest_norms = bank_norms.max(dim=1).values                         # (3,)
        bank_rows = min(self.size, self.bank_block_rows)
        query_rows = max(1, min(queries.shape[0], self.chunk_bytes // (4 * bank_rows)))
        buffer = _scratch(query_rows * bank_rows, torch.bfloat16, device) if device.type == "cpu" else None
        values = torch.empty((queries.shape[0], k), device=device)
        rows = torch.empty((queries.shape[0], k), dtype=torch.int64, device=device)
        for q_start in range(0, queries.shape[0], query_rows):
            chunk = queries[q_start:q_start + query_rows].detach().to(torch.float32)
            chunk16 = chunk.to(torch.bfloat16)
            query_norms = _norms(chunk, chunk16)                             # (3, q)
            best = torch.full((chunk.shape[0], k), -torch.inf, device=device)  # by bf16 similarity
            best_rows = torch.zeros((chunk.shape[0], k), dtype=torch.int64, device=device)
            candidates = []
            for b_start in range(0, self.size, bank_rows):
                block16 = bank16[b_start:b_start + bank_rows].to(device, non_blocking=True)
                similarities = _bf16_product(chunk16, block16, buffer)       # (q, b)
                roundoff = 0.0 if similarities.dtype == torch.float32 else BF16_UNIT_ROUNDOFF
                maxima = group_maxima(similarities, k)
                block_values, columns = top_of_groups(similarities, maxima, k)
                best, best_rows = merge_top_k(best, best_rows, block_values, columns + b_start, k)
                # a superset of the final candidates: the running k-th is at most the final one, and no row's
                # bound exceeds the one with the bank's largest norms
                largest_bound = rounding_bound(query_norms, largest_norms[:, None],
                                               2 * query_norms[2] * largest_norms[2], roundoff, self.dim)
                threshold = _float32_at_most(best[:, -1].double() - 2 * largest_bound)
                query_index, column, similarity = entries_at_least(similarities, maxima, threshold)
                candidates.append((query_index, column + b_start, similarity))
            query_index, row, similarity = (torch.cat(parts) for parts in zip(*candidates))
            # the final rule: within the bound of this row plus the largest bound of the k bf16-best rows
            best_bound = rounding_bound(query_norms[:, :, None], bank_norms[:, best_rows], best.double(), roundoff,
                                        self.dim).max(dim=1).values          # (q,)
            bound = rounding_bound(query_norms[:, query_index], bank_norms[:, row], similarity.double(), roundoff,
                                   self.dim)
            keep = similarity.double() >= best[query_index, -1].double() - best_bound[query_index] - bound
            query_index, row = query_index[keep], row[keep]
            exact = self._fp32_similarities(chunk, query_index, row)
            part = slice(q_start, q_start + chunk.shape[0])
            values[part], rows[part] = _top_k_per_query(query_index, row, exact, chunk.shape[0], k)
        return values, rows

    def _fp32_similarities(self, queries: torch.Tensor, query_index: torch.Tensor,
                           row: torch.Tensor) -> torch.Tensor:
        """<queries[query_index], bank[row]> in float32, pair by pair, a chunk_bytes budget of rows at a time."""
        pairs = max(1, self.chunk_bytes // (8 * self.dim))
        results = []
        for start in range(0, len(row), pairs):
            bank_rows = self._bank.index_select(0, row[start:start + pairs].to(self._bank.device))
            query_rows = queries.index_select(0, query_index[start:start + pairs])
            results.append(torch.einsum("pd,pd->p", query_rows, bank_rows.to(queries.device)))
        return torch.cat(results) if results else queries.new_empty(0)

    def _bf16_bank_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank in bf16 on `device` (when it fits there, else in host memory), made once, and its rows'
        norms (3, M) float64: ||b||, ||b - bf16(b)||, ||bf16(b)||."""
        if self._bf16_bank is None:
            bank16 = torch.empty(self._bank.shape, dtype=torch.bfloat16, device=self._bank.device)
            norms = torch.empty((3, self.size), dtype=torch.float64, device=self._bank.device)
            piece = max(1, self.chunk_bytes // (16 * self.dim))
            for start in range(0, self.size, piece):
                part = self._bank[start:start + piece]
                bank16[start:start + piece] = part
                norms[:, start:start + piece] = _norms(part, bank16[start:start + piece])
            self._bf16_bank = bank16, norms
            self._bf16_resident[bank16.device] = bank16
        bank16, norms = self._bf16_bank
        return _on_device(bank16, device, self._bf16_resident), norms.to(device)


def _scratch(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D buffer. On CPUs numpy allocates it, and asks Linux for huge pages (torch's large
    allocations fault in 4 KB pages, inside the first matmul: 7% of a search's time on a 2-core VM)."""
    if device.type != "cpu":
        return torch.empty(size, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(size * dtype.itemsize, np.uint8)).view(dtype)


def _on_device(bank: torch.Tensor, device: torch.device, resident: dict[torch.device, torch.Tensor]) -> torch.Tensor:
    """`bank` on `device` when it fits there (copied once, kept in `resident`), else where it is, to be streamed
    in blocks."""
    if device not in resident:
        if device.type != "cuda" or bank.nbytes < torch.cuda.mem_get_info(device)[0] // 2:
            resident[device] = bank.to(device)
        else:
            return bank
    return resident[device]


def group_maxima(similarities: torch.Tensor, k: int) -> torch.Tensor:
    """(q, groups) maxima of column groups: group g of a (q, b) block holds columns g * size ... g * size + size - 1
    (size = GROUP, or 1 when b is under GROUP * (k + 1)); the last b mod size columns are in no group."""
    width = similarities.shape[1]
    size = GROUP if width // GROUP > k else 1
    groups = width // size
    return similarities[:, :groups * size].view(similarities.shape[0], groups, size).amax(dim=2)


def _group_size(maxima: torch.Tensor, width: int) -> int:
    """Columns per group of a block of `width` columns with these (q, groups) maxima."""
    return 1 if maxima.shape[1] == width else GROUP


def _columns(groups: torch.Tensor, maxima: torch.Tensor, width: int) -> torch.Tensor:
    """(..., size) block columns of the group ids `groups`, for a block of `width` columns and its `maxima`."""
    size = _group_size(maxima, width)
    return groups[..., None] * size + torch.arange(size, device=groups.device)


def _ungrouped(maxima: torch.Tensor, width: int) -> torch.Tensor:
    """The columns in no group: the last width mod GROUP of a block grouped by GROUP, none otherwise."""
    return torch.arange(maxima.shape[1] * _group_size(maxima, width), width, device=maxima.device)


def top_of_groups(similarities: torch.Tensor, maxima: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, b) largest entries of each row of a (q, b) block, decreasing (float32), and their columns.

    They lie in the k groups with the largest maxima or among the columns in no group, so only those are read."""
    rows, width = similarities.shape
    count, size = maxima.shape[1], _group_size(maxima, width)
    top_groups = maxima.topk(min(k, count), dim=1, sorted=False).indices       # (q, n)
    n = top_groups.shape[1]
    body = similarities[:, :count * size].view(rows, count, size)
    candidates = torch.cat([body.gather(1, top_groups[:, :, None].expand(-1, -1, size)).flatten(1),
                            similarities[:, count * size:]], dim=1)            # (q, n * size + ungrouped)
    values, picked = candidates.topk(min(k, width), dim=1)
    # candidate p < n * size is member p mod size of group top_groups[p // size]; the others are the ungrouped columns
    grouped = top_groups.gather(1, (picked // size).clamp(max=n - 1)) * size + picked % size
    return values.float(), torch.where(picked < n * size, grouped, picked - n * size + count * size)


def block_top_k(similarities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, b) largest entries of each row of a (q, b) similarity block, decreasing, and their columns:
    one read of the block (its group maxima), then a top-k over k groups (docs/design.md)."""
    return top_of_groups(similarities, group_maxima(similarities, k), k)


def merge_top_k(values: torch.Tensor, rows: torch.Tensor, new_values: torch.Tensor, new_rows: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of two (q, *) sets of values and their rows, decreasing."""
    merged, picked = torch.cat([values, new_values], dim=1).topk(k, dim=1)
    return merged, torch.cat([rows, new_rows], dim=1).gather(1, picked)


def entries_at_least(similarities: torch.Tensor, maxima: torch.Tensor,
                     threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query index, column, float32 value) of every entry >= threshold[query] (float32) of a (q, b) block,
    reading only the groups whose maximum reaches the threshold and the columns in no group."""
    rows, width = similarities.shape
    query_index, group = (maxima.float() >= threshold[:, None]).nonzero(as_tuple=True)
    columns = _columns(group, maxima, width)                                    # (P, size)
    query_index = query_index[:, None].expand_as(columns)
    ungrouped = _ungrouped(maxima, width)
    query_index = torch.cat([query_index.flatten(), torch.arange(rows, device=similarities.device)
                             .repeat_interleave(len(ungrouped))])
    columns = torch.cat([columns.flatten(), ungrouped.repeat(rows)])
    values = similarities[query_index, columns].float()
    keep = values >= threshold[query_index]
    return query_index[keep], columns[keep], values[keep]


def _bf16_product(queries16: torch.Tensor, block16: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """queries16 @ block16.T: in float32 on GPUs (out_dtype), in bf16 into `buffer` on CPUs, where torch's bf16
    product has no float32 output (its bf16 rounding enters the bound)."""
    if buffer is None:
        return torch.mm(queries16, block16.T, out_dtype=torch.float32)
    out = buffer[:queries16.shape[0] * block16.shape[0]].view(queries16.shape[0], block16.shape[0])
    return torch.mm(queries16, block16.T, out=out)


def _norms(rows: torch.Tensor, rows16: torch.Tensor) -> torch.Tensor:
    """(3, n) float64: ||x||, ||x - bf16(x)||, ||bf16(x)|| of (n, D) float32 rows and their bf16 roundings
    (x - bf16(x) is exact in float32)."""
    return torch.stack([torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
                        for x in (rows, rows - rows16.float(), rows16)])


def rounding_bound(query_norms: torch.Tensor, bank_norms: torch.Tensor, similarity: torch.Tensor,
                   output_roundoff: float, dim: int) -> torch.Tensor:
    """A bound on |bf16 product's similarity - fp32 similarity| of a query and a bank row, elementwise (float64).

    query_norms and bank_norms: `_norms`'s three rows, broadcast together; `similarity`: the bf16 product's value
    (its output rounding is output_roundoff * |value| / (1 - output_roundoff)). Derived in docs/design.md
    ("bf16 candidates, fp32 neighbours"); times BOUND_SCALE, and 2^-20 more for this float64 evaluation."""
    gamma = dim * ACCUMULATION_UNIT_ROUNDOFF / (1 - dim * ACCUMULATION_UNIT_ROUNDOFF)
    (query, query_residual, query16), (row, row_residual, row16) = query_norms, bank_norms
    bound = (query16 * row_residual + query_residual * row + gamma * (query16 * row16 + query * row)
             + output_roundoff / (1 - output_roundoff) * similarity.abs() + 2 * dim * 2.0 ** -126)
    return BOUND_SCALE * (1 + 2.0 ** -20) * bound


def _float32_at_most(values: torch.Tensor) -> torch.Tensor:
    """The float64 `values` as float32, rounded down (so that `x >= result` keeps every x >= value)."""
    rounded = values.float()
    return torch.where(rounded.double() > values, torch.nextafter(rounded, rounded.new_tensor(-torch.inf)), rounded)


def _top_k_per_query(query_index: torch.Tensor, row: torch.Tensor, similarity: torch.Tensor, queries: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, k) largest similarities of each query's candidate pairs, decreasing, and their rows (every query
    has at least k candidates)."""
    order = torch.argsort(similarity, descending=True, stable=True)
    order = order[torch.argsort(query_index[order], stable=True)]  # by query, each query's pairs decreasing
    query_index, row, similarity = query_index[order], row[order], similarity[order]
    counts = torch.bincount(query_index, minlength=queries)
    rank = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[query_index]
    first = rank < k
    values = torch.empty((queries, k), device=similarity.device)
    rows = torch.empty((queries, k), dtype=torch.int64, device=similarity.device)
    values[query_index[first], rank[first]] = similarity[first]
    rows[query_index[first], rank[first]] = row[first]
    return values, rows


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
