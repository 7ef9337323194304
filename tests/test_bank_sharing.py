"""Banks of different seeds (and the train list's own order) hold overlapping images: each image is decoded and
forwarded once, and the rows another entry already holds are copied from it, verified, never stale."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dataloaders.base import ArrayImageDataset, BrokenImageError, FileImageDataset
from pipeline.features.extract import ExtractionSettings, FeatureExtractor, SameImages
from tests.test_reliability import CountingBackbone, colour_dataset

IMAGES = 40
BANK = 16  # rows of each order extracted: two orders' banks share about BANK**2 / IMAGES images


def settings(**changes) -> ExtractionSettings:
    return ExtractionSettings(torch.device("cpu"), **{"batch_size": 3, "num_workers": 0, "amp": "off",
                                                      "channels_last": False, "chunk_size": 5, **changes})


class Orders:
    """One image set in seeded orders, each its own cache entry, as Experiment.bank keys the banks of seeds."""

    def __init__(self, images: ArrayImageDataset | FileImageDataset) -> None:
        self.images = images

    def order(self, seed: int) -> np.ndarray:
        return np.random.RandomState(seed).permutation(len(self.images))

    def key(self, seed: int) -> dict:
        return {"dataset": "colours", "images": self.images.fingerprint(), "order": f"seed {seed}"}

    def same_images(self, *seeds: int) -> list[SameImages]:
        return [SameImages(self.key(seed), f"colours-seed{seed}", self.images, self.order(seed)) for seed in seeds]

    def extract(self, extractor: FeatureExtractor, seed: int, rows: int = BANK, copy_from: tuple[int, ...] = ()):
        return extractor.extract(self.images.subset(self.order(seed)), self.key(seed), f"colours-seed{seed}", rows,
                                 self.order(seed), self.same_images(*copy_from))


def extractor(cache: Path, backbone: CountingBackbone | None = None, **changes) -> FeatureExtractor:
    return FeatureExtractor(backbone or CountingBackbone(), {"model": "counting"}, cache, settings(**changes))


def shared(orders: Orders, seed: int, other: int) -> int:
    """How many of seed's first BANK images are among other's first BANK."""
    return len(np.intersect1d(orders.order(seed)[:BANK], orders.order(other)[:BANK]))


def test_another_seeds_bank_forwards_only_the_images_no_cached_bank_holds(tmp_path, caplog):
    orders = Orders(colour_dataset(IMAGES))
    counting = CountingBackbone()
    sharing = extractor(tmp_path / "cache", counting)
    orders.extract(sharing, seed=0)
    assert counting.forwarded == BANK
    overlap = shared(orders, 1, 0)
    assert 2 <= overlap < BANK  # the copy is exercised, and so is the forward pass around it

    counting.forwarded = 0
    with caplog.at_level(logging.INFO):
        copied = orders.extract(sharing, seed=1, copy_from=(0,))
    assert counting.forwarded == BANK - overlap
    assert f"extracting {BANK - overlap} of {BANK} images of colours-seed1" in caplog.text
    assert f"{overlap} copied from colours-seed0" in caplog.text
    fresh = orders.extract(extractor(tmp_path / "fresh"), seed=1)  # every row forwarded
    np.testing.assert_array_equal(copied.features, fresh.features)  # each image's own row, in seed 1's order

    counting.forwarded = 0
    third = orders.extract(sharing, seed=2, copy_from=(0, 1))  # from both: each row from the first that holds it
    held = np.union1d(orders.order(0)[:BANK], orders.order(1)[:BANK])
    assert counting.forwarded == BANK - len(np.intersect1d(orders.order(2)[:BANK], held))
    np.testing.assert_array_equal(third.features, orders.extract(extractor(tmp_path / "fresh"), seed=2).features)

    counting.forwarded = 0
    again = orders.extract(sharing, seed=1, copy_from=(0, 2))  # now cached in its own entry: nothing to do
    assert counting.forwarded == 0
    np.testing.assert_array_equal(again.features, fresh.features)


def test_a_corrupt_or_missing_entry_is_not_copied_and_left_to_its_owner(tmp_path, caplog):
    orders = Orders(colour_dataset(IMAGES))
    counting = CountingBackbone()
    sharing = extractor(tmp_path, counting)
    orders.extract(sharing, seed=0)
    files = sorted((tmp_path / "counting").glob("colours-seed0-*/rows_*.npy"))
    files[0].write_bytes(files[0].read_bytes()[:-8])  # truncated: fails its checksum
    truncated_rows = set(orders.order(0)[:5])  # chunk_size 5: the first file's images
    lost = len(truncated_rows.intersection(orders.order(1)[:BANK]))
    assert lost  # the truncated file held images seed 1 needs

    counting.forwarded = 0
    with caplog.at_level(logging.WARNING):
        copied = orders.extract(sharing, seed=1, copy_from=(0, 5))  # seed 5 has no entry at all
    assert counting.forwarded == BANK - shared(orders, 1, 0) + lost
    assert "does not match its checksum" in caplog.text
    assert files[0].exists()  # not deleted by a reader that does not hold seed 0's lock: seed 0's run mends it
    np.testing.assert_array_equal(copied.features, orders.extract(extractor(tmp_path / "fresh"), seed=1).features)


def test_recompute_copies_nothing(tmp_path):
    orders = Orders(colour_dataset(IMAGES))
    orders.extract(extractor(tmp_path), seed=0)
    counting = CountingBackbone()
    orders.extract(extractor(tmp_path, counting, recompute=True), seed=1, copy_from=(0,))
    assert counting.forwarded == BANK


def test_an_image_that_could_not_be_decoded_stays_broken_when_copied(tmp_path, monkeypatch):
    orders = Orders(colour_dataset(IMAGES))
    broken_image = int(np.intersect1d(orders.order(0)[:BANK], orders.order(1)[:BANK])[0])
    decoded = []
    load_image = ArrayImageDataset._load_image

    def fails_on_one(self, index: int) -> Image.Image:
        decoded.append(self.image_ids[index])
        if self.image_ids[index] == f"img{broken_image}":
            raise BrokenImageError(f"cannot decode img{broken_image}")
        return load_image(self, index)
    monkeypatch.setattr(ArrayImageDataset, "_load_image", fails_on_one)

    orders.extract(extractor(tmp_path, skip_broken_images=True), seed=0)
    copied = orders.extract(extractor(tmp_path, skip_broken_images=True), seed=1, copy_from=(0,))
    row = int(np.flatnonzero(orders.order(1) == broken_image)[0])
    assert copied.broken_rows == [row] and np.isnan(copied.features[row]).all()
    assert decoded.count(f"img{broken_image}") == 1  # seed 1 did not try it again


def test_with_verify_image_content_a_file_changed_since_it_was_cached_is_not_copied(tmp_path):
    """A file rewritten with the same size and modification time keeps the stat fingerprint (the key); the
    content hash recorded with the other entry's rows catches it, so its row is forwarded again, not copied."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(IMAGES, 4, 4, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"img{index:02d}.bmp")
    files = FileImageDataset("folder", tmp_path, [f"img{index:02d}.bmp" for index in range(IMAGES)], [0] * IMAGES,
                             torchvision.transforms.ToTensor())
    orders = Orders(files)
    orders.extract(extractor(tmp_path / "cache", verify_image_content=True), seed=0)

    changed = int(np.intersect1d(orders.order(0)[:BANK], orders.order(1)[:BANK])[0])
    path = tmp_path / f"img{changed:02d}.bmp"
    times = path.stat()
    Image.fromarray(255 - pixels[changed]).save(path)
    assert path.stat().st_size == times.st_size  # BMP: the size follows from the image's shape alone
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    unchanged_key = FileImageDataset("folder", tmp_path, files.image_ids, files.labels, None).fingerprint()
    assert unchanged_key == files.fingerprint()

    copied = orders.extract(extractor(tmp_path / "cache", verify_image_content=True), seed=1, copy_from=(0,))
    row = int(np.flatnonzero(orders.order(1) == changed)[0])
    expected = torch.from_numpy(255 - pixels[changed]).float().mean(dim=(0, 1)) / 255
    np.testing.assert_allclose(copied.features[row], expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("copy_from", [(), (0,)])
def test_the_copied_and_forwarded_rows_are_written_in_the_usual_rows_files(tmp_path, copy_from):
    orders = Orders(colour_dataset(IMAGES))
    orders.extract(extractor(tmp_path), seed=0)
    orders.extract(extractor(tmp_path), seed=1, copy_from=copy_from)
    (entry,) = (tmp_path / "counting").glob("colours-seed1-*")
    assert sorted(path.name for path in entry.glob("rows_*.npy")) == [
        f"rows_{start:09d}_{min(start + 5, BANK):09d}.npy" for start in range(0, BANK, 5)]

