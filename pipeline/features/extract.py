"""Feature extraction: every image of a dataset decoded and forwarded once per model, then cached."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders import ImageDataset
from dataloaders.base import BrokenImageError
from errors import UserError
from models import Backbone
from pipeline.features.cache import ChunkPlan, FeatureEntry, StoredRows, assemble, plan_chunks
from pipeline.features.distributed import Topology, barrier, broadcast_ranges, shard_bounds
from pipeline.files import write_atomically

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """How images reach the network. amp and channels_last change the features and are part of the cache key;
    the batch size and chunk_size are not (they can move the last digits only: see docs/design.md)."""

    device: torch.device
    batch_size: int
    num_workers: int
    amp: str             # "off" or "bf16"
    channels_last: bool
    chunk_size: int      # images per cache file
    recompute: bool = False           # delete and re-extract every cache entry this extractor uses, once
    skip_broken_images: bool = False  # undecodable images become NaN rows reported as broken, not an error
    verify_image_content: bool = False  # reuse cached rows only if their images' bytes hash as when cached


@dataclasses.dataclass(frozen=True)
class Extracted:
    """Raw features of a dataset prefix and the rows whose image could not be decoded."""

    features: np.ndarray    # (num_rows, D) float32, NaN in the broken rows
    broken_rows: list[int]  # always empty unless settings.skip_broken_images


def make_loader(dataset: Dataset, settings: ExtractionSettings, batches: list[list[int]] | None = None,
                collate_fn: Callable | None = None) -> DataLoader:
    """In-order batches (or exactly `batches`); pinned memory for CUDA and a deep prefetch queue so the GPU
    never waits on a batch. Workers are not persistent: every loader makes exactly one pass (a dataset is
    read once per model), and persistence only keeps workers between passes of the same loader."""
    batching = {"batch_sampler": batches} if batches is not None else {"batch_size": settings.batch_size}
    return DataLoader(dataset, shuffle=False, num_workers=settings.num_workers, collate_fn=collate_fn,
                      pin_memory=settings.device.type == "cuda", worker_init_fn=quiet_when_the_run_stops,
                      prefetch_factor=4 if settings.num_workers > 0 else None, **batching)


def quiet_when_the_run_stops(worker_id: int) -> None:
    """In a loader worker: multiprocessing's thread that hands a batch's shared memory to the main process
    reports the ConnectionError or EOFError it meets when the main process stops mid-handover (Ctrl-C, SIGTERM)
    through sys.excepthook. That is the run stopping, not an error: no traceback beside main.py's notice."""
    print_error = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            print_error(kind, error, traceback)
    sys.excepthook = hook


class _DecodedOrBroken(Dataset):
    """(index, image tensor or None, error message or ""): a broken image reaches the main process as a
    message instead of an exception re-raised with the worker's traceback."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.dataset[index][0], ""
        except BrokenImageError as error:
            return index, None, str(error)


def _collate(samples: list[tuple[int, torch.Tensor | None, str]]
             ) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """Row indices, the decoded images stacked (None if none decoded), and row -> error of the others."""
    decoded = [image for _, image, error in samples if not error]
    return ([index for index, _, _ in samples], torch.stack(decoded) if decoded else None,
            {index: error for index, _, error in samples if error})


def _broken_image_error(message: str) -> BrokenImageError:
    return BrokenImageError(f"{message}; fix or delete the file, or pass --skip-broken-images")


class FeatureExtractor:
    """Raw penultimate features of (a prefix of) an ordered dataset, from the cache or from the network."""

    def __init__(self, backbone: Backbone, model_key: dict, cache_dir: Path, settings: ExtractionSettings,
                 topology: Topology = Topology()) -> None:
        self.backbone = backbone
        self.model_key = model_key
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self.topology = topology  # under torchrun: this rank's place; rank 0 owns the cache entry
        self._on_device = False
        self._recomputed: set[Path] = set()  # entries --recompute has already cleared

    def features(self, dataset: ImageDataset, dataset_key: dict, label: str, num_rows: int | None = None
                 ) -> np.ndarray:
        """(num_rows, D) float32 raw features of dataset[:num_rows]; `extract(...).features`."""
        return self.extract(dataset, dataset_key, label, num_rows).features

    def extract(self, dataset: ImageDataset, dataset_key: dict, label: str, num_rows: int | None = None
                ) -> Extracted:
        """Raw features of dataset[:num_rows]: cached rows are verified, only the rest are computed. The entry is
        locked throughout, so a second run sharing the cache waits, then finds the rows."""
        num_rows = len(dataset) if num_rows is None else num_rows
        entry = self._entry(dataset_key, label)
        main = self.topology.is_main
        if main and not entry.writable():
            return self._assembled(self._read_only(entry, num_rows, label, dataset), num_rows, dataset, label)
        stored: list[StoredRows] = []
        plans: list[ChunkPlan] = []
        with entry.locked() if main else contextlib.nullcontext():  # rank 0 holds it for all ranks
            images_sha256 = self._images_sha256(dataset)
            if main:
                if self.settings.recompute and entry.directory not in self._recomputed:
                    log.info("%s: --recompute, deleting the cached features in %s", label, entry.directory)
                    entry.clear()
                    self._recomputed.add(entry.directory)
                stored = entry.load(num_rows, self.backbone.row_dim, images_sha256)  # other widths: recomputed
                plans = plan_chunks(stored, num_rows, self.settings.chunk_size, self.settings.batch_size)
            # the other ranks write their shards only after this broadcast, so never while rank 0, under the
            # lock, removes the files a killed run left in the entry
            missing = broadcast_ranges([(plan.compute_from, plan.end) for plan in plans], self.topology)
            if missing:
                todo = sum(end - start for start, end in missing)
                log.info("extracting %d of %d images of %s (cache: %s)", todo, num_rows, label, entry.directory)
                written = self._extract(dataset, missing, plans, stored, entry, label, images_sha256)
                stored = [rows for rows in stored if not any(plan.supersedes(rows) for plan in plans)] + written
            else:
                log.info("%s: all %d images' features are cached in %s", label, num_rows, entry.directory)
        if not main:  # only rank 0 scores
            return Extracted(np.empty((0, self.backbone.row_dim), dtype=np.float32), [])
        return self._assembled(stored, num_rows, dataset, label)

    def _read_only(self, entry: FeatureEntry, num_rows: int, label: str, dataset: ImageDataset) -> list[StoredRows]:
        """The verified rows of an entry this user cannot write (another user's, in a shared cache), read without
        its lock and deleting nothing; a UserError when rows are missing or fail their checks, since they cannot
        be computed into it."""
        if self.settings.recompute or self.topology.distributed:
            raise UserError(f"cache entry {entry.directory} is not writable by this user: it cannot be "
                            f"{'recomputed' if self.settings.recompute else 'shared out over torchrun ranks'}; "
                            f"use another --cache-dir")
        stored = entry.load(num_rows, self.backbone.row_dim, self._images_sha256(dataset), delete_failed=False)
        missing = plan_chunks(stored, num_rows, self.settings.chunk_size, self.settings.batch_size)
        if missing:
            raise UserError(f"cache entry {entry.directory} is not writable by this user and lacks verified rows "
                            f"{missing[0].compute_from}..{missing[-1].end - 1} of the {num_rows} images of {label}: "
                            f"ask its owner to run this once, or use another --cache-dir")
        log.info("%s: all %d images' features are cached in %s (read-only)", label, num_rows, entry.directory)
        return stored

    def _assembled(self, stored: list[StoredRows], num_rows: int, dataset: ImageDataset, label: str) -> Extracted:
        """Rows [0, num_rows) of `stored`; a broken image stops the run unless skip_broken_images."""
        features, broken = assemble(stored, num_rows)
        if broken and not self.settings.skip_broken_images:
            try:  # decode the first one again for the reason; the cache recorded it from an earlier run
                dataset[broken[0]]
            except BrokenImageError as error:
                raise _broken_image_error(str(error)) from None
            raise _broken_image_error(f"{label}: image {dataset.image_ids[broken[0]]} could not be decoded "
                                      f"when it was cached; rerun with --recompute")
        if broken:
            log.warning("%s: skipped %d images that cannot be decoded: %s", label, len(broken),
                        ", ".join(dataset.image_ids[row] for row in broken))
        return Extracted(features, broken)

    def _entry(self, dataset_key: dict, label: str) -> FeatureEntry:
        """The cache entry of a dataset's features: keyed by the model, the images and how they reach the network.
        ("gpu_decode": False keeps the digests, so the folders, of entries already on users' disks.)"""
        key = {**self.model_key, **dataset_key, "amp": self.settings.amp,
               "channels_last": self.settings.channels_last, "gpu_decode": False}
        return FeatureEntry(self.cache_dir / self.model_key["model"], key, label)

    def _images_sha256(self, dataset: ImageDataset) -> Callable[[int, int], str] | None:
        """With verify_image_content: (start, end) -> the content hash of those rows' images, which the entry
        records beside their features and compares before reusing them."""
        if not self.settings.verify_image_content:
            return None
        return lambda start, end: dataset.content_fingerprint(range(start, end))

    def _extract(self, dataset: ImageDataset, ranges: list[tuple[int, int]], plans: list[ChunkPlan],
                 stored: list[StoredRows], entry: FeatureEntry, label: str,
                 images_sha256: Callable[[int, int], str] | None = None) -> list[StoredRows]:
        """Compute the rows of `ranges` (on rank 0, those of `plans`) and write each planned chunk once complete,
        its first rows taken from `stored`.

        A batch never spans two ranges, so every row is computed in the same batch whether the extraction
        ran in one go, resumed after an interruption, or was split across torchrun ranks (CPU results are
        then bit-identical)."""
        batches = [list(range(first, min(first + self.settings.batch_size, end)))
                   for start, end in ranges for first in range(start, end, self.settings.batch_size)]
        # the images' content hashes, taken before they are read for the network: a file replaced while the run
        # extracts leaves a recorded hash that no longer matches it, and the next verifying run recomputes its rows
        hashes = ({(plan.start, plan.end): images_sha256(plan.start, plan.end) for plan in plans}
                  if images_sha256 and self.topology.is_main else {})
        if self.topology.distributed:
            computed = self._forward_distributed(dataset, batches, entry, label)
            if not self.topology.is_main:
                barrier(self.topology)
                return []
            forward = contextlib.nullcontext()
        else:
            forwarded = self._forward(dataset, batches, label)
            forward = contextlib.closing(forwarded)  # closed on an error too, which ends its loader's workers
            computed = zip(batches, forwarded)
        with forward:
            written = self._write_chunks(plans, stored, computed, entry, hashes)
        if self.topology.distributed:
            for rank in range(self.topology.world_size):
                (entry.directory / f"shard-{rank:05d}.npz").unlink()
            barrier(self.topology)
        return written

    def _write_chunks(self, plans: list[ChunkPlan], stored: list[StoredRows],
                      computed: Iterator[tuple[list[int], tuple[np.ndarray, list[int]]]], entry: FeatureEntry,
                      hashes: dict[tuple[int, int], str]) -> list[StoredRows]:
        """Write each planned chunk as soon as the `computed` batches (in row order, each within one chunk) complete
        it, its rows before `compute_from` taken from `stored`; then delete the stored files it supersedes."""
        written: list[StoredRows] = []
        for plan in plans:
            block = np.empty((plan.end - plan.start, self.backbone.row_dim), dtype=np.float32)
            broken: list[int] = []
            if plan.compute_from > plan.start:
                block[:plan.compute_from - plan.start], broken = assemble(stored, plan.compute_from, plan.start)
            filled = plan.compute_from - plan.start
            while filled < plan.end - plan.start:  # the computed batches come in row order and never span two chunks
                batch_rows, (batch, batch_broken) = next(computed)
                block[batch_rows[0] - plan.start:batch_rows[-1] + 1 - plan.start] = batch
                broken += batch_broken
                filled += len(batch)
            written.append(entry.write_rows(plan.start, block, broken, hashes.get((plan.start, plan.end))))
            for rows in stored:
                if plan.supersedes(rows) and (rows.start, rows.end) != (plan.start, plan.end):  # same name: replaced
                    entry.delete_rows(rows.start, rows.end)
        return written

    def _forward_distributed(self, dataset: ImageDataset, batches: list[list[int]], entry: FeatureEntry, label: str
                             ) -> Iterator[tuple[list[int], tuple[np.ndarray, list[int]]]]:
        """Each rank computes a contiguous run of whole batches and saves it atomically as a shard; on rank 0,
        the batches of all shards in order, as `_forward` yields them with their rows (the shards stay until
        `_extract` has written the rows files)."""
        first, last = shard_bounds(len(batches), self.topology)
        parts, broken = [np.empty((0, self.backbone.row_dim), dtype=np.float32)], []
        for batch, batch_broken in self._forward(dataset, batches[first:last], label):
            parts.append(batch)
            broken += batch_broken
        shard = entry.directory / f"shard-{self.topology.rank:05d}.npz"
        features = np.concatenate(parts)

        def save(path: Path) -> None:
            with path.open("wb") as file:
                np.savez(file, features=features, broken=np.asarray(broken, dtype=np.int64))
        write_atomically(shard, save, features.nbytes)
        barrier(self.topology)
        if not self.topology.is_main:
            return iter(())
        shards = [np.load(entry.directory / f"shard-{rank:05d}.npz", allow_pickle=False)
                  for rank in range(self.topology.world_size)]
        rows = np.concatenate([data["features"] for data in shards])  # the rows of `batches`, in order
        all_broken = set(np.concatenate([data["broken"] for data in shards]).tolist())
        offsets = np.cumsum([0, *map(len, batches)])
        return iter([(batch, (rows[offsets[index]:offsets[index + 1]], sorted(all_broken.intersection(batch))))
                     for index, batch in enumerate(batches)])

    def _forward(self, dataset: ImageDataset, batches: list[list[int]], label: str
                 ) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Per batch, in order: (B, D) float32 features (NaN rows for undecodable images) and those rows."""
        settings = self.settings
        model = self._model()
        rows_read = batches[-1][-1] + 1 if batches else 0  # the rows of `batches` increase
        if 0 < rows_read < len(dataset):  # e.g. a 1% bank: workers that are spawned, not forked, get a pickled copy
            dataset = dataset.subset(np.arange(rows_read))
        loader = make_loader(_DecodedOrBroken(dataset), settings, batches, _collate)
        autocast = (torch.autocast(settings.device.type, dtype=torch.bfloat16) if settings.amp == "bf16"
                    else contextlib.nullcontext())
        total = sum(len(batch) for batch in batches)
        with tqdm(total=total, unit="img", desc=label, disable=not self.topology.is_main) as progress:
            for batch_data in loader:
                # entered per batch: held across `yield`, inference mode would leak into the caller's code
                with torch.inference_mode(), autocast:
                    indices, images, errors = batch_data
                    if errors and not settings.skip_broken_images:
                        raise _broken_image_error(next(iter(errors.values())))
                    batch = np.full((len(indices), self.backbone.row_dim), np.nan, dtype=np.float32)  # (B, D)
                    if images is not None:
                        images = images.to(settings.device, non_blocking=True)
                        if settings.channels_last:
                            images = images.contiguous(memory_format=torch.channels_last)
                        decoded = [offset for offset, index in enumerate(indices) if index not in errors]
                        batch[decoded] = model.features(images).float().cpu().numpy()
                progress.update(len(batch))
                yield batch, sorted(errors)

    def _model(self) -> Backbone:
        if not self._on_device:
            memory_format = torch.channels_last if self.settings.channels_last else torch.preserve_format
            self.backbone.to(self.settings.device, memory_format=memory_format)
            self._on_device = True
        return self.backbone
