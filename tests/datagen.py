"""Small deterministic datasets on disk, in each format dataloaders/ reads, for tests to build on."""
from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

FLAT_JUNK = ("fake.jpg", "notes.txt")  # the non-image files write_flat_folder adds


def random_pixels(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """uint8 array of shape (count, height, width, 3) with random colours."""
    return rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def _save_images(paths: list[Path], pixels: np.ndarray) -> list[Path]:
    for path, image in zip(paths, pixels):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return paths


def write_class_folders(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (40, 48),
                        seed: int = 0) -> list[Path]:
    """JPEGs `root/<class>/img<j>.JPEG` (ImageNet layout); size is (width, height). Returns the files."""
    rng = np.random.default_rng(seed)
    paths = [Path(root) / name / f"img{j}.JPEG" for name in classes for j in range(per_class)]
    return _save_images(paths, random_pixels(rng, len(paths), size[1], size[0]))


def write_class_index_folders(root: Path, num_classes: int, per_class: int, size: tuple[int, int] = (32, 32),
                              seed: int = 0) -> list[Path]:
    """JPEGs `root/<class index>/<j>.jpeg` (ImageNet-V2 layout). Returns the files, label-major."""
    rng = np.random.default_rng(seed)
    paths = [Path(root) / str(label) / f"{j}.jpeg" for label in range(num_classes) for j in range(per_class)]
    return _save_images(paths, random_pixels(rng, len(paths), size[1], size[0]))


def write_flat_folder(root: Path, count: int, size: tuple[int, int] = (32, 32), with_junk: bool = True,
                      seed: int = 0) -> tuple[list[Path], list[Path]]:
    """`count` images `img<i>.jpg` / `img<i>.png` (alternating) directly in `root`, plus FLAT_JUNK.

    Returns (images in natural name order, junk files in name order); `fake.jpg` holds text.
    """
    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    paths = [Path(root) / f"img{i}.{'png' if i % 2 else 'jpg'}" for i in range(count)]
    images = _save_images(paths, random_pixels(rng, count, size[1], size[0]))
    junk = [Path(root) / name for name in FLAT_JUNK] if with_junk else []
    for path in junk:
        path.write_text("not an image\n")
    return images, junk


def _balanced_labels(rng: np.random.Generator, num_classes: int, per_class: int) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


def _write_batch(path: Path, images: np.ndarray, labels: dict[str, list[int]]) -> None:
    """One pickle batch as the official files hold it: data (N, 3072) channel-major rows, label lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"batch_label": path.name, "filenames": [f"{path.name}_{i}.png" for i in range(len(images))],
             "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), **labels}
    with path.open("wb") as stream:
        pickle.dump(batch, stream, protocol=2)


def write_cifar10(root: Path, per_class: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`root/cifar-10-batches-py/{data_batch_1..5,test_batch}`, each with `per_class` images per class.

    Returns batch file name -> (images (N, 32, 32, 3) uint8, labels (N,) int64).
    """
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = _balanced_labels(rng, 10, per_class)
        images = random_pixels(rng, len(labels), 32, 32)
        _write_batch(Path(root) / "cifar-10-batches-py" / name, images, {"labels": labels.tolist()})
        written[name] = (images, labels)
    return written


def write_cifar100(root: Path, per_class: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`root/cifar-100-python/{train,test}` with fine and coarse labels; returns name -> (images, fine labels)."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in ("train", "test"):
        labels = _balanced_labels(rng, 100, per_class)
        images = random_pixels(rng, len(labels), 32, 32)
        _write_batch(Path(root) / "cifar-100-python" / name, images,
                     {"fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()})
        written[name] = (images, labels)
    return written


def write_svhn(root: Path, split: str, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`root/<split>_32x32.mat` with X (32, 32, 3, N) and y (N, 1) in 1..10 (10 = digit 0).

    Returns (images (N, 32, 32, 3) uint8, digit labels (N,) int64 in 0..9).
    """
    rng = np.random.default_rng(seed)
    images = random_pixels(rng, count, 32, 32)
    labels = rng.permutation(np.arange(count) % 10).astype(np.int64)  # every digit once count >= 10
    Path(root).mkdir(parents=True, exist_ok=True)
    digits = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]  # (N, 1)
    scipy.io.savemat(Path(root) / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": digits})
    return images, labels


def write_bitmaps(paths: list[Path], size: tuple[int, int] = (8, 8), seed: int = 0) -> list[Path]:
    """Uncompressed BMPs of random colours: every file of one size has the same byte count, whatever its pixels."""
    rng = np.random.default_rng(seed)
    return _save_images(paths, random_pixels(rng, len(paths), size[1], size[0]))


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG of `values` (uint16, (H, W) grey or (H, W, 3) RGB), written chunk by chunk (Pillow writes
    16-bit grey PNGs but not 16-bit RGB ones)."""
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0  # PNG colour types: 2 = RGB, 0 = grey
    rows = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, colour_type, 0, 0, 0])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                           + chunk(b"IEND", b""))
    return Path(path)


def write_openood_classic_layout(root: Path, per_list: int = 2, size: tuple[int, int] = (8, 8),
                                 seed: int = 0) -> dict[str, tuple[list[str], list[int], np.ndarray]]:
    """A miniature of OpenOOD v1.5's CIFAR-10 and CIFAR-100 benchmarks under `root/openood/`, laid out as its
    scripts/download/download.py does: benchmark_imglist/{cifar10,cifar100}/<list>.txt (train and test of the ID
    set, test_<set>.txt of each OOD set), `per_list` lines `<path> <label>` each, naming random-colour images of
    `size` (width, height) under images_classic/<set>/, written in the format their extension names.

    Paths have the shapes seen in OpenOOD's lists (cifar10/test/airplane/0001.png, numbered per class from 1;
    tin/val/images/val_<n>.JPEG; texture/<class>/<class>_<nnnn>.jpg; CIFAR-100 like CIFAR-10); the mnist, svhn
    and places365 shapes are stand-ins. ID lists give the class index (airplane 0, cat 3; apple 0, whale 95), OOD
    lists -1, as OpenOOD's do. The two benchmarks list different images of a shared set (OpenOOD filters
    TinyImageNet per benchmark), so a config that reads the other benchmark's list reads other images.

    Returns list file relative to `root` -> (image paths relative to images_classic, labels, pixels
    (N, H, W, 3) uint8 as the written files decode: exactly the generated ones for PNGs)."""
    def image_path(image_set: str, split: str, j: int) -> tuple[str, int]:
        """The j-th image of a set (j from 0) and its class index; classes alternate so each list has two."""
        number = j // 2 + 1
        if image_set in ("cifar10", "cifar100"):
            name, label = {"cifar10": [("airplane", 0), ("cat", 3)],
                           "cifar100": [("apple", 0), ("whale", 95)]}[image_set][j % 2]
            return f"{image_set}/{split}/{name}/{number:04d}.png", label
        texture, place = ("banded", "woven")[j % 2], ("abbey", "airfield")[j % 2]
        return {"tin": f"tin/val/images/val_{7 * j + 3}.JPEG",  # OpenOOD's filtered subset skips numbers
                "mnist": f"mnist/test/{j:05d}.png", "svhn": f"svhn/test/{j:05d}.png",
                "texture": f"texture/{texture}/{texture}_{number:04d}.jpg",
                "places365": f"places365/{place}/{number:08d}.jpg"}[image_set], -1

    rng = np.random.default_rng(seed)
    images = Path(root) / "openood" / "images_classic"
    written = {}
    for index, (benchmark, other) in enumerate([("cifar10", "cifar100"), ("cifar100", "cifar10")]):
        lists = [(f"train_{benchmark}", benchmark, "train"), (f"test_{benchmark}", benchmark, "test")]
        lists += [(f"test_{image_set}", image_set, "test")
                  for image_set in (other, "tin", "mnist", "svhn", "texture", "places365")]
        for list_name, image_set, split in lists:
            shown = [image_path(image_set, split, j) for j in range(index * per_list, (index + 1) * per_list)]
            paths = [path for path, _ in shown]
            labels = [label if image_set == benchmark else -1 for _, label in shown]
            pixels = []
            for path, colours in zip(paths, random_pixels(rng, per_list, size[1], size[0])):
                (images / path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(colours).save(images / path)
                with Image.open(images / path) as image:
                    pixels.append(np.asarray(image.convert("RGB")))
            list_file = f"openood/benchmark_imglist/{benchmark}/{list_name}.txt"
            (Path(root) / list_file).parent.mkdir(parents=True, exist_ok=True)
            (Path(root) / list_file).write_text("".join(f"{path} {label}\n" for path, label in zip(paths, labels)))
            written[list_file] = (paths, labels, np.stack(pixels))
    return written
