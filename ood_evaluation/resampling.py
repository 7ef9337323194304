"""The bootstrap's engine: per-image draw counts of each resample, and the metrics of the scores repeated by those
counts, for a block of resamples at a time with no Python loop per resample.

A resample's metrics are those of `ood_metrics` on the scores repeated by their counts (to 1e-9, tested; the two
FPR95s pick the same ROC point in the same float arithmetic, so they are scikit-learn's exactly). They come from
the counts per distinct score value, sorted once:
- Equal scores form one threshold, as in scikit-learn's roc_curve, so ties (between ID and OOD too) need no
  special case: at a distinct ID value v the ROC point is (OOD drawn with score >= v, ID drawn with score >= v),
  cumulative sums of counts; values not drawn in a resample only repeat the previous point.
- TP steps only at ID values, so fpr95 (the first point whose |TP / n - 0.95| is least, found by a binary search
  per row) and aupr_in (at each ID value, precision TP / (TP + FP) weighted by the ID drawn there: step-wise
  average precision) need only the ID values; the OOD count steps only at OOD values, where auroc (each OOD draw
  earns the ID drawn above it plus half those tied with it), dtacc (the largest TPR - FPR, reached just above an
  OOD value), aupr_out and fpr95_ood_positive (the ID-side ones on negated scores) are read.
Memory is bounded by the block: about 50 bytes per draw of at most 2**18 ID + OOD draws of one set, plus each
set's ID side (about 25 bytes per ID score), whatever the number of resamples (docs/intervals.md).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ood_evaluation.definitions import METRIC_NAMES
from ood_evaluation.metrics import as_scores

# Draws (ID + one OOD set's scores over resamples) handled at once, about 50 bytes each. Results do not depend on it
# (see _draw_blocks).
_BLOCK_DRAWS = 2 ** 18


def sets_resample_counts(id_size: int, ood_sizes: Sequence[int], resamples: int = 1000,
                         seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """The ID counts (resamples, id_size), drawn once for all sets, and each OOD set's counts (resamples, its
    size) of the resamples bootstrap_sets_distribution uses, written out to check or reuse them."""
    id_counts = np.empty((resamples, id_size), dtype=np.int64)
    ood_counts = [np.empty((resamples, size), dtype=np.int64) for size in ood_sizes]
    for rows, id_draws, ood_draws in _draw_blocks(id_size, ood_sizes, resamples, seed):
        id_counts[rows] = _count_per_row(id_draws, id_size)
        for counts, draws, size in zip(ood_counts, ood_draws, ood_sizes):
            counts[rows] = _count_per_row(draws, size)
    return id_counts, ood_counts


def metrics_from_counts(id_scores: Any, ood_scores: Any, id_counts: np.ndarray,
                        ood_counts: np.ndarray) -> np.ndarray:
    """The metrics (columns in METRIC_NAMES order) of the scores repeated by counts, one row per counts row.

    id_counts (R, N) or (N,) and ood_counts (R, M) or (M,): non-negative integers, each row with at least one
    draw. Returns an array of shape (R, 6), (1, 6) for single vectors.
    """
    layout = _ScoreLayout(as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores"))
    id_counts = _check_counts(id_counts, layout.id_size, "id_counts")
    ood_counts = _check_counts(ood_counts, layout.ood_size, "ood_counts")
    if id_counts.shape[0] != ood_counts.shape[0]:
        raise ValueError(f"id_counts has {id_counts.shape[0]} rows and ood_counts {ood_counts.shape[0]}")
    return layout.metrics(_sum_by_value(id_counts, layout.id_value_index, layout.id_values.size),
                          _sum_by_value(ood_counts, layout.ood_value_index, layout.ood_values.size))


class _ScoreLayout:
    """The distinct ID and OOD score values (descending), each image's index among its set's values, and where each
    set's values fall among the other set's: all a resample's metrics need besides its counts per value."""

    def __init__(self, id_scores: np.ndarray, ood_scores: np.ndarray,
                 id_distinct: tuple[np.ndarray, np.ndarray] | None = None):
        """`id_distinct`: `_distinct_descending(id_scores)`, when computed once for several OOD sets."""
        self.id_size, self.ood_size = id_scores.size, ood_scores.size
        self.id_values, self.id_value_index = id_distinct or _distinct_descending(id_scores)
        self.ood_values, self.ood_value_index = _distinct_descending(ood_scores)
        id_ascending, ood_ascending = self.id_values[::-1], self.ood_values[::-1]
        # For each OOD value w: how many distinct ID values are > w and >= w (they differ where ID and OOD tie).
        self.id_above_ood = self.id_values.size - np.searchsorted(id_ascending, self.ood_values, side="right")
        self.id_at_or_above_ood = self.id_values.size - np.searchsorted(id_ascending, self.ood_values, side="left")
        # For each ID value v: how many distinct OOD values are >= v.
        self.ood_at_or_above_id = self.ood_values.size - np.searchsorted(ood_ascending, self.id_values, side="left")
        self._scratch_arrays: dict[str, np.ndarray] = {}

    def id_value_counts(self, id_draws: np.ndarray) -> np.ndarray:
        """How often each distinct ID value was drawn, per resample: (R, distinct ID values) from indices (R, N)."""
        return self._value_counts(self.id_value_index, self.id_values.size, id_draws, "id_keys")

    def ood_value_counts(self, ood_draws: np.ndarray) -> np.ndarray:
        """How often each distinct OOD value was drawn, per resample: (R, distinct OOD values) from (R, M)."""
        return self._value_counts(self.ood_value_index, self.ood_values.size, ood_draws, "ood_keys")

    def metrics(self, id_counts: np.ndarray, ood_counts: np.ndarray) -> np.ndarray:
        """(R, 6) metrics from counts per distinct value: id_counts (R, distinct ID values), ood_counts (R, distinct
        OOD values), int64, in descending value order."""
        rows, id_columns, ood_columns = id_counts.shape[0], self.id_values.size, self.ood_values.size
        # id_cumulative[:, j]: ID drawn at the j highest distinct ID values (column 0 stays 0); likewise OOD.
        id_cumulative = self._scratch("id_cumulative", rows, id_columns + 1, np.int64)
        np.cumsum(id_counts, axis=1, out=id_cumulative[:, 1:])
        ood_cumulative = self._scratch("ood_cumulative", rows, ood_columns + 1, np.int64)
        np.cumsum(ood_counts, axis=1, out=ood_cumulative[:, 1:])
        id_total = id_cumulative[:, -1].astype(np.float64)             # (R,)
        ood_total = ood_cumulative[:, -1].astype(np.float64)

        # ROC points at the distinct ID values v (TP steps there): TP = ID drawn >= v, FP = OOD drawn >= v.
        true_positives = id_cumulative[:, 1:]                                                # (R, K_id)
        false_positives = np.take(ood_cumulative, self.ood_at_or_above_id, axis=1, mode="clip",
                                  out=self._scratch("id_integers", rows, id_columns, np.int64))
        fpr95 = _take_rows(false_positives, self._nearest_to_95(id_cumulative, id_total)) / ood_total
        # AP: precision at each ID value, weighted by the ID drawn there, step-wise.
        predicted_id = np.add(true_positives, false_positives, out=false_positives)
        np.maximum(predicted_id, 1, out=predicted_id)   # 0 only where nothing ranks this high: no ID drawn there
        precision = np.divide(true_positives, predicted_id, out=self._scratch("id_floats", rows, id_columns))
        aupr_in = np.einsum("ij,ij->i", id_counts, precision) / id_total

        # At the distinct OOD values w: ID drawn strictly above w, at or above w, and OOD drawn strictly above w.
        id_above = np.take(id_cumulative, self.id_above_ood, axis=1, mode="clip",
                           out=self._scratch("id_above", rows, ood_columns, np.int64))            # (R, K_ood)
        id_at_or_above = np.take(id_cumulative, self.id_at_or_above_ood, axis=1, mode="clip",
                                 out=self._scratch("ood_integers", rows, ood_columns, np.int64))
        ood_above = ood_cumulative[:, :-1]
        # AUROC: each OOD draw at w earns the ID above it and half the ID tied with it (exact integers).
        twice_credit = np.add(id_above, id_at_or_above, out=id_at_or_above)
        auroc = np.einsum("ij,ij->i", ood_counts, twice_credit) / (2 * id_total * ood_total)
        # DTACC: the best TPR - FPR is reached just above an OOD value, or is 0 (the curve's two ends).
        gap = np.divide(id_above, id_total[:, None], out=self._scratch("ood_floats", rows, ood_columns))
        gap -= np.divide(ood_above, ood_total[:, None], out=self._scratch("ood_floats_2", rows, ood_columns))
        dtacc = 0.5 * (1.0 + np.maximum(gap.max(axis=1), 0.0))
        # OOD positive on negated scores: at w, the OOD and ID drawn at or below w are predicted OOD (exact).
        ood_at_or_below = np.subtract(ood_total[:, None], ood_above,
                                      out=self._scratch("ood_floats_2", rows, ood_columns))
        id_at_or_below = np.subtract(id_total[:, None], id_above, out=gap)
        predicted_ood = np.add(ood_at_or_below, id_at_or_below, out=self._scratch("ood_floats_3", rows, ood_columns))
        np.maximum(predicted_ood, 1, out=predicted_ood)  # 0 only below every draw: no OOD drawn there
        precision = np.divide(ood_at_or_below, predicted_ood, out=predicted_ood)
        aupr_out = np.einsum("ij,ij->i", ood_counts, precision) / ood_total
        # The first threshold from below whose OOD TPR (tps / tps[-1]) reaches 0.95: the lowest such w.
        reached = _count_at_most(ood_cumulative, _largest_miss(ood_total)) - 1
        fpr95_ood_positive = _take_rows(id_at_or_below, reached) / id_total
        return np.stack([auroc, fpr95, aupr_in, aupr_out, dtacc, fpr95_ood_positive], axis=1)

    def _value_counts(self, value_index: np.ndarray, values: int, draws: np.ndarray, name: str) -> np.ndarray:
        """How often each distinct value was drawn, per resample: (rows, values) from image indices (rows, draws)."""
        return _count_per_row(np.take(value_index, draws, mode="clip",
                                      out=self._scratch(name, draws.shape[0], draws.shape[1], np.int32)), values)

    def _scratch(self, name: str, rows: int, columns: int, dtype: type = np.float64) -> np.ndarray:
        """A (rows, columns) array kept from one block of resamples to the next (fresh arrays would cost page
        faults, about a third of the time); arrays start as zeros."""
        array = self._scratch_arrays.get(name)
        if array is None or array.shape[0] < rows or array.shape[1] != columns:
            array = self._scratch_arrays[name] = np.zeros((rows, columns), dtype=dtype)
        return array[:rows]

    @staticmethod
    def _nearest_to_95(id_cumulative: np.ndarray, id_total: np.ndarray) -> np.ndarray:
        """Per row, the TP column (id_cumulative's column - 1) of sklearn's fpr95 point: the first where
        |TP / n - 0.95| is least, in floats.

        fl(t / n) - 0.95 rises with t, so the least distance is at the largest TP with t / n <= 0.95 or at the
        smallest above it (TP rises along a row); a tie goes to the first, the smaller TP.
        """
        below_limit = _largest_at_most(id_total, 0.95)                               # (R,) integers
        above = _count_at_most(id_cumulative, below_limit) - 1    # first TP column with TP / n > 0.95
        tp_above = _take_rows(id_cumulative, above + 1)
        tp_below = _take_rows(id_cumulative, above)    # 0 where nothing is below: the curve's origin, never chosen
        below_nearer = np.abs(tp_below / id_total - 0.95) <= np.abs(tp_above / id_total - 0.95)
        first_below = _count_at_most(id_cumulative, tp_below - 1) - 1     # where TP first reaches tp_below
        return np.where(below_nearer & (tp_below > 0), first_below, above)


def _largest_at_most(totals: np.ndarray, fraction: float) -> np.ndarray:
    """Per total n (float, integral), the largest integer t with t / n <= fraction in float64 arithmetic."""
    guess = np.floor(totals * fraction) + 2
    for _ in range(4):   # floor(n * fraction) is within one of the answer; step down until it holds
        guess = np.where(guess / totals <= fraction, guess, guess - 1)
    return guess.astype(np.int64)


def _largest_miss(ood_total: np.ndarray) -> np.ndarray:
    """Per OOD total m, the largest count x of OOD above a threshold with (m - x) / m >= 0.95 in float64."""
    guess = np.floor(ood_total * 0.05) + 2
    for _ in range(4):
        guess = np.where((ood_total - guess) / ood_total >= 0.95, guess, guess - 1)
    return guess.astype(np.int64)


def _count_at_most(sorted_rows: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Per row r of an (R, K) array, non-decreasing along rows with its last column above limits[r], how many
    entries are <= limits[r]: one binary search over all rows at once (log2 K steps of a few calls on R values)."""
    rows, columns = sorted_rows.shape
    row_index = np.arange(rows)
    count = np.zeros(rows, dtype=np.int64)
    step = 1 << (columns.bit_length() - 1)
    while step:
        # Would count + step entries be <= the limit? Past the end, the last column answers no.
        at_most = sorted_rows[row_index, np.minimum(count + (step - 1), columns - 1)] <= limits
        count += step * at_most
        step >>= 1
    return count


def _take_rows(matrix: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """matrix[r, columns[r]] for each row r."""
    return matrix[np.arange(matrix.shape[0]), columns]


def _distinct_descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values in descending order (equal values, -0.0 and 0.0 included, are one) and each score's index."""
    negated_values, index = np.unique(-scores, return_inverse=True)
    return -negated_values, index.ravel().astype(np.int32)


def sets_distribution(id_scores: np.ndarray, ood_scores: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """The metrics of each resample on each OOD set of checked arrays: (resamples, sets, 6), METRIC_NAMES order."""
    id_distinct = _distinct_descending(id_scores)  # sorted once: every layout shares the ID side
    layouts = [_ScoreLayout(id_scores, scores, id_distinct) for scores in ood_scores]
    distribution = np.empty((resamples, len(layouts), len(METRIC_NAMES)))
    for rows, id_draws, ood_draws in _draw_blocks(id_scores.size, [scores.size for scores in ood_scores], resamples,
                                                  seed):
        id_counts = layouts[0].id_value_counts(id_draws)  # every layout has the same distinct ID values
        for column, (layout, draws) in enumerate(zip(layouts, ood_draws)):
            distribution[rows, column] = layout.metrics(id_counts, layout.ood_value_counts(draws))
    return distribution


def _draw_blocks(id_size: int, ood_sizes: Sequence[int], resamples: int,
                 seed: int) -> Iterator[tuple[slice, np.ndarray, list[np.ndarray]]]:
    """(rows, ID image indices (rows, id_size), each OOD set's image indices (rows, its size)) for blocks of
    resamples: the ID images are drawn once per resample, for all sets.

    The ID draws and each set's come from their own stream spawned from the seed (the ID's first, then the sets'
    in order, so one set's draws are those of the first of several), each drawn block after block: the draws (and
    every result) are the same whatever the block size.
    """
    if not (isinstance(resamples, (int, np.integer)) and resamples >= 1):
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if min(id_size, *ood_sizes) < 1:
        raise ValueError(f"{id_size} ID and {', '.join(map(str, ood_sizes))} OOD scores: each set needs at least one")
    if id_size + max(ood_sizes) > np.iinfo(np.int32).max:
        raise ValueError(f"{id_size} + {max(ood_sizes)} scores: more than 2**31 - 1 are not supported")
    id_stream, *ood_streams = (np.random.default_rng(child)
                               for child in np.random.SeedSequence(seed).spawn(1 + len(ood_sizes)))
    block = max(1, min(resamples, _BLOCK_DRAWS // (id_size + max(ood_sizes))))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        yield (slice(start, start + rows), id_stream.integers(0, id_size, size=(rows, id_size), dtype=np.int32),
               [stream.integers(0, size, size=(rows, size), dtype=np.int32)
                for stream, size in zip(ood_streams, ood_sizes)])


def _count_per_row(keys: np.ndarray, bins: int) -> np.ndarray:
    """How often each of 0..bins-1 occurs in each row of keys (rows, K), int32, overwritten: (rows, bins) int64."""
    rows = keys.shape[0]
    keys += (np.arange(rows, dtype=np.int64) * bins).astype(np.int32)[:, None]   # each row its own bins
    return np.bincount(keys.ravel(), minlength=rows * bins).reshape(rows, bins)


def _sum_by_value(counts: np.ndarray, value_index: np.ndarray, values: int) -> np.ndarray:
    """Per-image counts (R, N) summed over the images sharing each distinct value: (R, values)."""
    order = np.argsort(value_index, kind="stable")
    starts = np.searchsorted(value_index[order], np.arange(values))
    return np.add.reduceat(counts[:, order], starts, axis=1)


def _check_counts(counts: np.ndarray, size: int, what: str) -> np.ndarray:
    counts = np.asarray(counts)
    counts = counts[None, :] if counts.ndim == 1 else counts
    if counts.ndim != 2 or counts.shape[1] != size:
        raise ValueError(f"{what} has shape {np.shape(counts)}: expected ({size},) or (resamples, {size})")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got {counts.dtype}")
    if (counts < 0).any() or (counts.sum(axis=1) == 0).any():
        raise ValueError(f"{what} must be non-negative with at least one draw in each row")
    return counts.astype(np.int64)
