"""What a run's numbers were computed with, for config.yaml: library versions, the device, and the code's commit."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import torchvision

from ood_detectors.search import faiss_gpu_count

REPOSITORY = Path(__file__).resolve().parents[2]
LIBRARIES = ("numpy", "scikit-learn", "scipy", "matplotlib")  # distribution names, as pip lists them
FAISS_DISTRIBUTIONS = ("faiss-gpu", "faiss-cpu", "faiss-gpu-cu12", "faiss")


def environment(device: torch.device) -> dict[str, Any]:
    """Python and library versions, faiss (which build, whether it sees a GPU), CUDA / cuDNN and the GPU's name
    when `device` is one, and the repository's git commit with a dirty flag."""
    # torch's and torchvision's own strings carry the build (2.14.1+cu130), which their metadata drops
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": str(torch.__version__),
                                "torchvision": str(torchvision.__version__)}
    versions.update({name: _installed_version(name) for name in LIBRARIES})
    record: dict[str, Any] = {"versions": versions, "faiss": _faiss(), "device": str(device)}
    if device.type == "cuda":
        record.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                      gpu=torch.cuda.get_device_name(device))
    record["git"] = git_state(REPOSITORY)
    return record


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _faiss() -> dict[str, Any] | None:
    """The installed faiss distribution, its version, and how many GPUs it sees; None when it is not installed."""
    for distribution in FAISS_DISTRIBUTIONS:
        version = _installed_version(distribution)
        if version is not None:
            return {"distribution": distribution, "version": version, "gpus": faiss_gpu_count()}
    return None


def git_state(folder: Path) -> dict[str, Any] | None:
    """{"commit": HEAD's hash, "dirty": whether tracked or untracked, not ignored, files differ} of the checkout
    holding `folder`; None when it is not a git checkout or git is not installed."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
