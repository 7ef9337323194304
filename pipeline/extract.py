"""Feature extraction: every image of a dataset decoded and forwarded once per model, then cached."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloaders import ImageDataset
from models import Backbone
from pipeline.cache import FeatureEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionSettings:
    """How images reach the network; all but amp/channels_last leave the features unchanged."""

    device: torch.device
    batch_size: int
    num_workers: int
    amp: str             # "off" or "bf16"
    channels_last: bool
    chunk_size: int      # images per cache file


def make_loader(dataset: ImageDataset, settings: ExtractionSettings) -> DataLoader:
    """In-order batches; pinned memory for CUDA and a deep prefetch queue so the GPU never waits on a batch."""
    return DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=settings.num_workers,
                      pin_memory=settings.device.type == "cuda",
                      prefetch_factor=4 if settings.num_workers > 0 else None)


class FeatureExtractor:
    """Raw penultimate features of (a prefix of) an ordered dataset, from the cache or from the network."""

    def __init__(self, backbone: Backbone, model_key: dict, cache_dir: Path, settings: ExtractionSettings) -> None:
        self.backbone = backbone
        self.model_key = model_key
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self._on_device = False

    def features(self, dataset: ImageDataset, dataset_key: dict, label: str, num_rows: int | None = None
                 ) -> np.ndarray:
        """(num_rows, D) float32 raw features of dataset[:num_rows]; only rows not in the cache are computed."""
        num_rows = len(dataset) if num_rows is None else num_rows
        key = {**self.model_key, **dataset_key, "amp": self.settings.amp,
               "channels_last": self.settings.channels_last}
        entry = FeatureEntry(self.cache_dir / self.model_key["model"], key, label)
        missing = entry.missing_ranges(num_rows, self.settings.chunk_size)
        if missing:
            todo = sum(end - start for start, end in missing)
            log.info("extracting %d of %d images of %s (cache: %s)", todo, num_rows, label, entry.directory)
            self._extract(dataset, missing, entry, label)
        else:
            log.info("%s: all %d images' features are cached in %s", label, num_rows, entry.directory)
        return entry.read(num_rows)

    def _extract(self, dataset: ImageDataset, ranges: list[tuple[int, int]], entry: FeatureEntry,
                 label: str) -> None:
        """One pass of one DataLoader over every missing row; each range is written once it is complete."""
        settings = self.settings
        model = self._model()
        indices = np.concatenate([np.arange(start, end) for start, end in ranges])
        loader = make_loader(dataset.subset(indices), settings)
        autocast = (torch.autocast(settings.device.type, dtype=torch.bfloat16) if settings.amp == "bf16"
                    else contextlib.nullcontext())
        pending: list[np.ndarray] = []  # rows of the range being filled, written once it is complete
        ranges_left = iter(ranges)
        start, end = next(ranges_left)
        filled = 0
        with torch.inference_mode(), autocast, tqdm(total=len(indices), unit="img", desc=label) as progress:
            for images, _ in loader:
                images = images.to(settings.device, non_blocking=True)
                if settings.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                batch = model.features(images).float().cpu().numpy()
                progress.update(len(batch))
                while len(batch):  # a batch may finish one range and start the next
                    taken = batch[:end - start - filled]
                    pending.append(taken)
                    filled += len(taken)
                    batch = batch[len(taken):]
                    if filled == end - start:
                        entry.write_rows(start, np.concatenate(pending))
                        pending, filled = [], 0
                        start, end = next(ranges_left, (None, None))  # the loader ends with the last range

    def _model(self) -> Backbone:
        if not self._on_device:
            memory_format = torch.channels_last if self.settings.channels_last else torch.preserve_format
            self.backbone.to(self.settings.device, memory_format=memory_format)
            self._on_device = True
        return self.backbone
