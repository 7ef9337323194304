#!/usr/bin/env bash
# Installs the pinned requirements and the right faiss build into the active Python
# interpreter (your venv or conda env). Safe to run again; stops at the first failure.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="${PYTHON:-python}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
command -v "$python_bin" >/dev/null 2>&1 || { echo "install_packages.sh: no python or python3 on PATH" >&2; exit 1; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    faiss_package="faiss-gpu==1.15.1"
else
    faiss_package="faiss-cpu==1.15.1"
fi

echo "Installing into $("$python_bin" -c 'import sys; print(sys.prefix)') with $faiss_package"
"$python_bin" -m pip install --quiet --disable-pip-version-check -r "$repo_dir/requirements.txt" "$faiss_package"
"$python_bin" - <<'PY'
import faiss, numpy, safetensors, sklearn, timm, torch, torchvision, yaml  # noqa: F401  (fails loudly if anything is missing)
gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
print(f"OK: torch {torch.__version__}, torchvision {torchvision.__version__}, faiss {faiss.__version__} ({gpus} GPU(s) visible to faiss)")
PY
