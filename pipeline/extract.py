"""Feature extraction: every image of a dataset decoded and forwarded once per model, then cached."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode
from tqdm import tqdm

from dataloaders import ImageDataset
from dataloaders.base import BrokenImageError, FileImageDataset
from models import Backbone, TransformConfig
from pipeline.cache import FeatureEntry, StoredRows, assemble, missing_ranges, write_atomically
from pipeline.distributed import Topology, barrier, broadcast_ranges, shard_bounds

log = logging.getLogger(__name__)

_ENTRY_FOLDER = re.compile(r"(.+)-[0-9a-f]{16}")  # FeatureEntry's folder: <label>-<the key's digest>


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """How images reach the network. amp, channels_last and GPU decoding change the features and are part of
    the cache key. The batch size is not: it can change the last digits (convolution kernels are chosen per
    batch shape; measured on CPU, ResNet-50 features were bit-identical for batches 1-64 and MobileNet-V2's
    moved by 2e-7 of the largest feature at batch 1), far below what moves a metric's second decimal, and
    keying on it would re-extract a whole dataset whenever it changes (chunk_size too: batches end at chunk
    boundaries). The number of workers changes nothing."""

    device: torch.device
    batch_size: int
    num_workers: int
    amp: str             # "off" or "bf16"
    channels_last: bool
    chunk_size: int      # images per cache file
    recompute: bool = False           # delete and re-extract every cache entry this extractor uses, once
    skip_broken_images: bool = False  # undecodable images become NaN rows reported as broken, not an error
    gpu_transform: TransformConfig | None = None  # set: decode JPEG files on `device` (nvJPEG), transform there
    verify_image_content: bool = False  # reuse cached rows only if their images' bytes hash as when cached


@dataclasses.dataclass(frozen=True)
class SameImages:
    """Another cache entry of the same images in another order (another seed's bank, the train list's own order):
    the rows it already holds are copied into the entry being filled instead of being decoded and forwarded again."""

    dataset_key: dict
    label: str
    images: ImageDataset  # the images in the numbering shared with the entry being filled (the train split's own)
    order: np.ndarray     # (N,) its rows as indices into `images`


@dataclasses.dataclass(frozen=True)
class CopiedRows:
    """Rows of an entry copied from entries of the same images (`SameImages`)."""

    rows: np.ndarray      # sorted entry rows
    features: np.ndarray  # (len(rows), D) float32
    broken: list[int]     # the entry rows among them whose image could not be decoded
    sources: dict[str, int] = dataclasses.field(default_factory=dict)  # label of the entry read -> rows copied

    @classmethod
    def none(cls, feature_dim: int) -> CopiedRows:
        return cls(np.empty(0, dtype=np.int64), np.empty((0, feature_dim), dtype=np.float32), [])

    def within(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The copied rows in [start, end), their features and the broken ones among them."""
        first, last = np.searchsorted(self.rows, [start, end])
        return self.rows[first:last], self.features[first:last], [row for row in self.broken if start <= row < end]


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
                      pin_memory=settings.device.type == "cuda",
                      prefetch_factor=4 if settings.num_workers > 0 else None, **batching)


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


class _EncodedFiles(Dataset):
    """(index, the image file's bytes as a uint8 tensor): workers only read; decoding happens on the device."""

    def __init__(self, dataset: FileImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        # a plain tensor (torchvision.io.read_file maps the file, which workers cannot hand over)
        data = (self.dataset.root / self.dataset.image_ids[index]).read_bytes()
        return index, torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_on_device(dataset: FileImageDataset, samples: list[tuple[int, torch.Tensor]],
                      transform: TransformConfig, device: torch.device
                      ) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """`_collate`'s output for encoded files: JPEGs decoded together on the device (nvJPEG on GPUs), other
    formats on the CPU; a file that fails to decode is reported by row, as the CPU path does."""
    indices = [index for index, _ in samples]
    encoded = [data for _, data in samples]
    is_jpeg = [data[:3].tolist() == [0xFF, 0xD8, 0xFF] for data in encoded]
    decoded: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}

    def decode_one(offset: int) -> None:
        try:
            image = (torchvision.io.decode_jpeg(encoded[offset], mode=ImageReadMode.RGB, device=device)
                     if is_jpeg[offset] else torchvision.io.decode_image(encoded[offset], mode=ImageReadMode.RGB))
            decoded[offset] = image.to(device)
        except RuntimeError as error:
            path = dataset.root / dataset.image_ids[indices[offset]]
            errors[indices[offset]] = f"cannot decode image {path}: {error}"

    jpegs = [offset for offset, jpeg in enumerate(is_jpeg) if jpeg]
    try:  # one batched call for the JPEGs; a corrupt one fails it, then each is decoded alone to find it
        decoded.update(zip(jpegs, torchvision.io.decode_jpeg([encoded[offset] for offset in jpegs],
                                                             mode=ImageReadMode.RGB, device=device)))
    except RuntimeError:
        for offset in jpegs:
            decode_one(offset)
    for offset in (offset for offset, jpeg in enumerate(is_jpeg) if not jpeg):
        decode_one(offset)
    images = [transform.apply_to_tensor(decoded[offset]) for offset in sorted(decoded)]
    return indices, torch.stack(images) if images else None, errors


def _rows_of(ranges: list[tuple[int, int]]) -> np.ndarray:
    """The rows of sorted, disjoint (start, end) ranges, as one sorted array."""
    return np.concatenate([np.arange(start, end) for start, end in ranges])


def _ranges_without(ranges: list[tuple[int, int]], rows: np.ndarray) -> list[tuple[int, int]]:
    """The runs of consecutive rows of `ranges` that are not in the sorted array `rows`, each within its range."""
    pieces = []
    for start, end in ranges:
        inside = rows[np.searchsorted(rows, start):np.searchsorted(rows, end)]
        for low, high in zip([start, *(inside + 1)], [*inside, end]):
            if low < high:
                pieces.append((int(low), int(high)))
    return pieces


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

    def cached_labels(self) -> list[str]:
        """The labels of the entries in this model's cache folder (folders named `<label>-<16 hex digits>`)."""
        folder = self.cache_dir / self.model_key["model"]
        if not folder.is_dir():
            return []
        return sorted({match.group(1) for path in folder.iterdir()
                       if (match := _ENTRY_FOLDER.fullmatch(path.name)) and path.is_dir()})

    def extract(self, dataset: ImageDataset, dataset_key: dict, label: str, num_rows: int | None = None,
                order: np.ndarray | None = None, same_images: Sequence[SameImages] = ()) -> Extracted:
        """Raw features of dataset[:num_rows]: cached rows are verified, only the rest are computed.

        With `same_images` (entries of the same images in other orders) and `order` (this dataset's rows as indices
        into their `images`), rows whose image one of them holds are copied from it, not forwarded again. The entry
        is locked throughout, so a second run sharing the cache waits, then finds the rows."""
        num_rows = len(dataset) if num_rows is None else num_rows
        entry = self._entry(dataset, dataset_key, label)
        main = self.topology.is_main
        stored: list[StoredRows] = []
        with entry.locked() if main else contextlib.nullcontext():  # rank 0 holds it for all ranks
            missing: list[tuple[int, int]] = []
            copied = CopiedRows.none(self.backbone.feature_dim)
            images_sha256 = self._images_sha256(dataset)
            if main:
                if self.settings.recompute and entry.directory not in self._recomputed:
                    log.info("%s: --recompute, deleting the cached features in %s", label, entry.directory)
                    entry.clear()
                    self._recomputed.add(entry.directory)
                stored = entry.load(num_rows, self.backbone.feature_dim, images_sha256)  # other widths: recomputed
                missing = missing_ranges(stored, num_rows, self.settings.chunk_size)
                if missing and same_images and not self.settings.recompute:  # --recompute trusts no cached row
                    copied = self._copy_same_images(_rows_of(missing), order, same_images)
            # the other ranks write their shards only after this broadcast, so never while rank 0, under the
            # lock, removes the files a killed run left in the entry
            missing = broadcast_ranges(missing, self.topology)
            to_compute = broadcast_ranges(_ranges_without(missing, copied.rows), self.topology)
            if missing:
                todo = sum(end - start for start, end in to_compute)
                from_others = "".join(f"; {count} copied from {source}" for source, count in copied.sources.items())
                log.info("extracting %d of %d images of %s (cache: %s%s)", todo, num_rows, label, entry.directory,
                         from_others)
                stored += self._extract(dataset, missing, to_compute, copied, entry, label, images_sha256)
            else:
                log.info("%s: all %d images' features are cached in %s", label, num_rows, entry.directory)
        if not main:  # only rank 0 scores
            return Extracted(np.empty((0, self.backbone.feature_dim), dtype=np.float32), [])
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

    def _entry(self, dataset: ImageDataset, dataset_key: dict, label: str) -> FeatureEntry:
        """The cache entry of `dataset`'s features: keyed by the model, the images and how they reach the network."""
        key = {**self.model_key, **dataset_key, "amp": self.settings.amp,
               "channels_last": self.settings.channels_last, "gpu_decode": self._decodes_on_device(dataset)}
        return FeatureEntry(self.cache_dir / self.model_key["model"], key, label)

    def _copy_same_images(self, rows: np.ndarray, order: np.ndarray | None,
                          same_images: Sequence[SameImages]) -> CopiedRows:
        """The entry rows among `rows` whose image an entry of `same_images` already holds, read from its verified
        rows files (without its lock: they are read, never written or deleted).

        A copied row was computed in another batch than a fresh extraction would put it in; on CPU that changes
        nothing measurable (ResNet-50's features are bit-identical across batch sizes; see ExtractionSettings)."""
        if order is None:
            raise ValueError("same_images needs the order of the dataset's rows as indices into their images")
        feature_dim = self.backbone.feature_dim
        found_rows, found_features, broken, sources = [], [], [], {}
        wanted = rows
        for other in same_images:
            entry = self._entry(other.images, other.dataset_key, other.label)
            if not len(wanted) or not entry.directory.is_dir():
                continue
            # its images in its order, for their content hashes; built only when verifying (a copy of N ids)
            images_sha256 = (self._images_sha256(other.images.subset(other.order))
                             if self.settings.verify_image_content else None)
            row_in_other = np.empty(len(other.order), dtype=np.int64)
            row_in_other[other.order] = np.arange(len(other.order))
            their_rows = row_in_other[order[wanted]]
            found = np.zeros(len(wanted), dtype=bool)
            for start, end in entry.stored_ranges():
                inside = (their_rows >= start) & (their_rows < end)
                if not inside.any():
                    continue
                stored = entry.read_verified(start, end, feature_dim, images_sha256)
                if stored is None:
                    continue
                found_rows.append(wanted[inside])
                found_features.append(stored.features[their_rows[inside] - start])
                broken += [int(row) for row, theirs in zip(wanted[inside], their_rows[inside])
                           if theirs in stored.broken]
                found |= inside
            if found.any():
                sources[other.label] = int(found.sum())
            wanted = wanted[~found]
        if not found_rows:
            return CopiedRows.none(feature_dim)
        copied_rows = np.concatenate(found_rows)
        by_row = np.argsort(copied_rows)
        return CopiedRows(copied_rows[by_row], np.concatenate(found_features)[by_row], sorted(broken), sources)

    def _images_sha256(self, dataset: ImageDataset) -> Callable[[int, int], str] | None:
        """With verify_image_content: (start, end) -> the content hash of those rows' images, which the entry
        records beside their features and compares before reusing them."""
        if not self.settings.verify_image_content:
            return None
        return lambda start, end: dataset.content_fingerprint(range(start, end))

    def _extract(self, dataset: ImageDataset, ranges: list[tuple[int, int]], to_compute: list[tuple[int, int]],
                 copied: CopiedRows, entry: FeatureEntry, label: str,
                 images_sha256: Callable[[int, int], str] | None = None) -> list[StoredRows]:
        """Compute the rows of `to_compute` (within `ranges`, without the `copied` rows) and write each of `ranges`
        once complete.

        A batch never spans two ranges, so every row is computed in the same batch whether the extraction
        ran in one go, resumed after an interruption, or was split across torchrun ranks (CPU results are
        then bit-identical)."""
        batches = [list(range(first, min(first + self.settings.batch_size, end)))
                   for start, end in to_compute for first in range(start, end, self.settings.batch_size)]
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
            written = self._write_ranges(ranges, copied, computed, entry, images_sha256)
        if self.topology.distributed:
            for rank in range(self.topology.world_size):
                (entry.directory / f"shard-{rank:05d}.npz").unlink()
            barrier(self.topology)
        return written

    def _write_ranges(self, ranges: list[tuple[int, int]], copied: CopiedRows,
                      computed: Iterator[tuple[list[int], tuple[np.ndarray, list[int]]]], entry: FeatureEntry,
                      images_sha256: Callable[[int, int], str] | None) -> list[StoredRows]:
        """Write each of `ranges` from its copied rows and the `computed` batches (in row order, each within one
        range) as soon as it is complete."""
        written: list[StoredRows] = []
        for start, end in ranges:
            rows, features, broken = copied.within(start, end)
            block = np.empty((end - start, self.backbone.feature_dim), dtype=np.float32)
            block[rows - start] = features
            filled = len(rows)
            while filled < end - start:  # the computed batches come in row order and never span two ranges
                batch_rows, (batch, batch_broken) = next(computed)
                block[batch_rows[0] - start:batch_rows[-1] + 1 - start] = batch
                broken += batch_broken
                filled += len(batch)
            written.append(entry.write_rows(start, block, broken,
                                            images_sha256(start, end) if images_sha256 else None))
        return written

    def _forward_distributed(self, dataset: ImageDataset, batches: list[list[int]], entry: FeatureEntry, label: str
                             ) -> Iterator[tuple[list[int], tuple[np.ndarray, list[int]]]]:
        """Each rank computes a contiguous run of whole batches and saves it atomically as a shard; on rank 0,
        the batches of all shards in order, as `_forward` yields them with their rows (the shards stay until
        `_extract` has written the rows files)."""
        first, last = shard_bounds(len(batches), self.topology)
        parts, broken = [np.empty((0, self.backbone.feature_dim), dtype=np.float32)], []
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
        if self._decodes_on_device(dataset):
            loader = make_loader(_EncodedFiles(dataset), settings, batches, list)
            decode = functools.partial(_decode_on_device, dataset, transform=settings.gpu_transform,
                                       device=settings.device)
        else:  # decoded by PIL in the workers (arrays in memory have nothing to decode on a GPU)
            loader = make_loader(_DecodedOrBroken(dataset), settings, batches, _collate)
            decode = None
        autocast = (torch.autocast(settings.device.type, dtype=torch.bfloat16) if settings.amp == "bf16"
                    else contextlib.nullcontext())
        total = sum(len(batch) for batch in batches)
        with tqdm(total=total, unit="img", desc=label, disable=not self.topology.is_main) as progress:
            for batch_data in loader:
                # entered per batch: held across `yield`, inference mode would leak into the caller's code
                with torch.inference_mode(), autocast:
                    indices, images, errors = decode(batch_data) if decode else batch_data
                    if errors and not settings.skip_broken_images:
                        raise _broken_image_error(next(iter(errors.values())))
                    batch = np.full((len(indices), self.backbone.feature_dim), np.nan, dtype=np.float32)  # (B, D)
                    if images is not None:
                        images = images.to(settings.device, non_blocking=True)
                        if settings.channels_last:
                            images = images.contiguous(memory_format=torch.channels_last)
                        decoded = [offset for offset, index in enumerate(indices) if index not in errors]
                        batch[decoded] = model.features(images).float().cpu().numpy()
                progress.update(len(batch))
                yield batch, sorted(errors)

    def _decodes_on_device(self, dataset: ImageDataset) -> bool:
        """GPU decoding applies to image files only (arrays in memory have nothing to decode), so only their
        features, whose pixels it changes, are cached apart."""
        return self.settings.gpu_transform is not None and isinstance(dataset, FileImageDataset)

    def _model(self) -> Backbone:
        if not self._on_device:
            memory_format = torch.channels_last if self.settings.channels_last else torch.preserve_format
            self.backbone.to(self.settings.device, memory_format=memory_format)
            self._on_device = True
        return self.backbone
