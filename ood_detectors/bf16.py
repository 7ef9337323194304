"""bf16 candidates, fp32 neighbours: the fp32 search's top k, ranked among the bank rows that a bfloat16 product
puts within a proven rounding bound of the k-th largest; faster where the device multiplies bf16 natively.
The bound and why the candidates suffice: docs/design.md ("bf16 candidates, fp32 neighbours").
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ood_detectors.topk import group_columns, group_maxima, merge_top_k, top_of_groups, ungrouped_columns

MIN_FLOPS = 1e11  # precision 'auto': bf16 candidates from this many flops, where bf16 is native
BF16_UNIT_ROUNDOFF = 2.0 ** -8
ACCUMULATION_UNIT_ROUNDOFF = 2.0 ** -23  # fp32 sums, rounded to nearest (2^-24) or truncated (tensor cores)
BOUND_SCALE = 1.0  # multiplies the rounding bound; the tests show that 0.5 loses neighbours


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


def round_bank(bank: torch.Tensor, chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (M, D) float32 bank in bf16, beside it, and its rows' norms (3, M) float64: ||b||, ||b - bf16(b)||,
    ||bf16(b)||; converted chunk_bytes of rows at a time."""
    bank16 = torch.empty(bank.shape, dtype=torch.bfloat16, device=bank.device)
    norms = torch.empty((3, bank.shape[0]), dtype=torch.float64, device=bank.device)
    piece = max(1, chunk_bytes // (16 * bank.shape[1]))
    for start in range(0, bank.shape[0], piece):
        bank16[start:start + piece] = bank[start:start + piece]
        norms[:, start:start + piece] = _norms(bank[start:start + piece], bank16[start:start + piece])
    return bank16, norms


def top_k(queries: torch.Tensor, k: int, bank: torch.Tensor, bank16: torch.Tensor, bank_norms: torch.Tensor,
          bank_rows: int, query_rows: int, chunk_bytes: int,
          buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, k) fp32 top-k inner products of `queries` with the float32 `bank` and their rows, ranked among the
    candidates of a bf16 product with `bank16` (`round_bank`'s, with its `bank_norms` on the queries' device), in
    bank blocks of bank_rows x query_rows: written into `buffer` (bf16, query_rows * bank_rows) on CPUs, returned
    in float32 on GPUs (None). Query chunks outer, so a chunk's candidates are final after one pass."""
    device, size, dim = queries.device, bank.shape[0], bank.shape[1]
    largest_norms = bank_norms.max(dim=1).values                             # (3,)
    values = torch.empty((queries.shape[0], k), device=device)
    rows = torch.empty((queries.shape[0], k), dtype=torch.int64, device=device)
    for q_start in range(0, queries.shape[0], query_rows):
        chunk = queries[q_start:q_start + query_rows].detach().to(torch.float32)
        chunk16 = chunk.to(torch.bfloat16)
        query_norms = _norms(chunk, chunk16)                                 # (3, q)
        best = torch.full((chunk.shape[0], k), -torch.inf, device=device)    # by bf16 similarity
        best_rows = torch.zeros((chunk.shape[0], k), dtype=torch.int64, device=device)
        candidates = []
        for b_start in range(0, size, bank_rows):
            block16 = bank16[b_start:b_start + bank_rows].to(device, non_blocking=True)
            similarities = _bf16_product(chunk16, block16, buffer)           # (q, b)
            roundoff = 0.0 if similarities.dtype == torch.float32 else BF16_UNIT_ROUNDOFF
            maxima = group_maxima(similarities, k)
            block_values, columns = top_of_groups(similarities, maxima, k)
            best, best_rows = merge_top_k(best, best_rows, block_values, columns + b_start, k)
            # a superset of the final candidates: the running k-th is at most the final one, and no row's
            # bound exceeds the one with the bank's largest norms
            largest_bound = rounding_bound(query_norms, largest_norms[:, None],
                                           2 * query_norms[2] * largest_norms[2], roundoff, dim)
            threshold = _float32_at_most(best[:, -1].double() - 2 * largest_bound)
            query_index, column, similarity = entries_at_least(similarities, maxima, threshold)
            candidates.append((query_index, column + b_start, similarity))
        query_index, row, similarity = (torch.cat(parts) for parts in zip(*candidates))
        # the final rule: within the bound of this row plus the largest bound of the k bf16-best rows
        best_bound = rounding_bound(query_norms[:, :, None], bank_norms[:, best_rows], best.double(), roundoff,
                                    dim).max(dim=1).values                   # (q,)
        bound = rounding_bound(query_norms[:, query_index], bank_norms[:, row], similarity.double(), roundoff, dim)
        keep = similarity.double() >= best[query_index, -1].double() - best_bound[query_index] - bound
        query_index, row = query_index[keep], row[keep]
        exact = _fp32_similarities(bank, chunk, query_index, row, chunk_bytes)
        part = slice(q_start, q_start + chunk.shape[0])
        values[part], rows[part] = _top_k_per_query(query_index, row, exact, chunk.shape[0], k)
    return values, rows


def _fp32_similarities(bank: torch.Tensor, queries: torch.Tensor, query_index: torch.Tensor, row: torch.Tensor,
                       chunk_bytes: int) -> torch.Tensor:
    """<queries[query_index], bank[row]> in float32, pair by pair, a chunk_bytes budget of rows at a time."""
    pairs = max(1, chunk_bytes // (8 * bank.shape[1]))
    results = []
    for start in range(0, len(row), pairs):
        bank_rows = bank.index_select(0, row[start:start + pairs].to(bank.device))
        query_rows = queries.index_select(0, query_index[start:start + pairs])
        results.append(torch.einsum("pd,pd->p", query_rows, bank_rows.to(queries.device)))
    return torch.cat(results) if results else queries.new_empty(0)


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


def entries_at_least(similarities: torch.Tensor, maxima: torch.Tensor,
                     threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query index, column, float32 value) of every entry >= threshold[query] (float32) of a (q, b) block,
    reading only the groups whose maximum reaches the threshold and the columns in no group."""
    rows, width = similarities.shape
    query_index, group = (maxima.float() >= threshold[:, None]).nonzero(as_tuple=True)
    columns = group_columns(group, maxima, width)                                    # (P, size)
    query_index = query_index[:, None].expand_as(columns)
    ungrouped = ungrouped_columns(maxima, width)
    query_index = torch.cat([query_index.flatten(), torch.arange(rows, device=similarities.device)
                             .repeat_interleave(len(ungrouped))])
    columns = torch.cat([columns.flatten(), ungrouped.repeat(rows)])
    values = similarities[query_index, columns].float()
    keep = values >= threshold[query_index]
    return query_index[keep], columns[keep], values[keep]
