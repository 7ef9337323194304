"""The top k of each row of a similarity block, reading the block once, and the merge into a running top k.

A row's k largest entries lie in the k column groups with the largest maxima (docs/design.md, "Exact search,
bounded memory"), so a block is read once for its group maxima and only k groups per row are ranked.
"""
from __future__ import annotations

import torch

GROUP = 32  # columns per group whose maximum is taken


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


def group_columns(groups: torch.Tensor, maxima: torch.Tensor, width: int) -> torch.Tensor:
    """(..., size) block columns of the group ids `groups`, for a block of `width` columns and its `maxima`."""
    size = _group_size(maxima, width)
    return groups[..., None] * size + torch.arange(size, device=groups.device)


def ungrouped_columns(maxima: torch.Tensor, width: int) -> torch.Tensor:
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
