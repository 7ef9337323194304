#!/usr/bin/env bash
# One script for a fresh GPU machine (no internet; faiss may be absent, then the torch search backend is
# used): the CUDA tests, then the detector, search, extraction and latency benchmarks, as markdown tables.
# Pass --cpu to run the same benchmarks, at smaller sizes, on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python_bin="${PYTHON:-python3}"

if [[ "${1:-}" == "--cpu" ]]; then
    "$python_bin" benchmarks/detectors.py --device cpu --small
    "$python_bin" benchmarks/extraction.py --device cpu --images 200 --batch-size 32
    "$python_bin" benchmarks/latency.py --cpu
    exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python_bin" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_detectors.py tests/test_search.py \
    tests/test_search_bf16.py
echo "## detectors, 1% ImageNet bank (precision auto: bf16 candidates on a GPU)"
"$python_bin" benchmarks/detectors.py --device cuda --backend auto
echo "## top-k search, full ImageNet bank (1,281,167 x 2048), fp32 and bf16 candidates"
"$python_bin" benchmarks/detectors.py --device cuda --backend auto --detectors knn nnguide --bank-size 1281167 --repeats 1 --precision fp32
"$python_bin" benchmarks/detectors.py --device cuda --backend auto --detectors knn nnguide --bank-size 1281167 --repeats 1 --precision bf16
echo "## the same with a float16 bank"
"$python_bin" benchmarks/detectors.py --device cuda --backend auto --detectors knn nnguide --bank-size 1281167 --repeats 1 --bank-dtype float16
echo "## extraction"
"$python_bin" benchmarks/extraction.py --device cuda --images 6000 --batch-size 128 2> >(grep -v 'img/s' >&2)
echo "## latency per image: forward + scoring at batch 1, throughput at batch 256 (the paper's backbones)"
"$python_bin" benchmarks/latency.py --device cuda
