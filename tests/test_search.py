"""The nearest-neighbour search backends (faiss, and blocked matmul + top-k with numpy's or torch's matmul) agree
with brute force and with each other."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ood_detectors import create_detector
from ood_detectors.search import MATMULS, InnerProductSearch, build_faiss_index, faiss_available
from tests.main_process import start_main

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def random_unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=1, keepdim=True)


BACKENDS = ["numpy", "torch", "auto", pytest.param("faiss", marks=needs_faiss)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_equals_brute_force(backend):
    bank, queries = random_unit_rows(500, 32, seed=0), random_unit_rows(70, 32, seed=1)
    expected = np.sort((queries @ bank.T).numpy(), axis=1)[:, ::-1][:, :7]
    found = InnerProductSearch(bank, backend=backend).search(queries, 7)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_blocked_search_merges_bank_and_query_chunks_exactly(backend):
    """Tiny chunk budgets force many query chunks and many bank blocks, the last of each shorter (the reused
    similarity buffer is then only partly filled); the merged top-k must not change."""
    bank, queries = random_unit_rows(3000, 16, seed=2), random_unit_rows(50, 16, seed=3)
    whole = InnerProductSearch(bank, backend=backend).search(queries, 5)
    chunked = InnerProductSearch(bank, backend=backend, chunk_bytes=4 * 7 * 128, bank_block_rows=128)
    torch.testing.assert_close(chunked.search(queries, 5), whole)  # 8 query chunks x 24 bank blocks
    expected = np.sort((queries @ bank.T).numpy(), axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(whole.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_auto_uses_numpys_matmul_for_large_cpu_searches_and_torchs_for_small_ones():
    """The CPU rule (docs/design.md): numpy's matmul from 1e11 flops, torch's below (no OpenBLAS threads left
    spinning beside torch's work), torch's on any accelerator; a forced backend is kept."""
    bank = random_unit_rows(1000, 100, seed=14)
    index = InnerProductSearch(bank, backend="auto")
    assert index.matmul_for(torch.zeros(10, 100)) == "torch"  # 2e6 flops
    assert index.matmul_for(torch.zeros(499_999, 100)) == "torch"  # just under 1e11 flops
    assert index.matmul_for(torch.empty(500_000, 100)) == "numpy"  # 1e11 flops
    assert InnerProductSearch(bank, backend="numpy").matmul_for(torch.zeros(10, 100)) == "numpy"
    assert InnerProductSearch(bank, backend="torch").matmul_for(torch.empty(500_000, 100)) == "torch"
    with pytest.raises(ValueError) as error:
        InnerProductSearch(bank, backend="numpy").matmul_for(torch.zeros(3, 100, device="meta"))
    assert "'numpy'" in str(error.value) and "meta" in str(error.value)  # the backend and the queries' device
    assert index.matmul_for(torch.zeros(3, 100, device="meta")) == "torch"  # any accelerator: torch's


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_searches_of_other_sizes_reuse_the_similarity_buffer_exactly(backend):
    """The index keeps its similarity buffer between searches: a small search, a larger one (the buffer grows),
    then a small one again (the front of the larger buffer) each give a fresh index's neighbours."""
    bank = random_unit_rows(3000, 16, seed=4)
    options = {"backend": backend, "chunk_bytes": 4 * 40 * 1000, "bank_block_rows": 1000}
    index = InnerProductSearch(bank, **options)
    for queries in (random_unit_rows(5, 16, seed=5), random_unit_rows(90, 16, seed=6), random_unit_rows(7, 16, 7)):
        values, rows = index.top_k(queries, 5)
        fresh_values, fresh_rows = InnerProductSearch(bank, **options).top_k(queries, 5)
        assert torch.equal(rows, fresh_rows) and torch.equal(values, fresh_values)


@pytest.mark.parametrize("matmul", MATMULS)
def test_each_cpu_matmul_writes_the_product_into_the_buffer(matmul):
    queries, block, out = random_unit_rows(5, 8, seed=15), random_unit_rows(7, 8, seed=16), torch.full((5, 7), 9.0)
    MATMULS[matmul](queries, block, out)
    torch.testing.assert_close(out, queries @ block.T)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(("bank_rows", "k"), [(2000, 10), (1000, 1), (333, 10), (12, 12)])
def test_blocked_search_returns_the_rows_of_the_largest_similarities(backend, bank_rows, k):
    """Wide blocks rank only the k column groups with the largest maxima (and the columns left over, here 2000 =
    62 x 32 + 16); narrow ones rank every column. The values are brute force's, and the rows are k distinct rows
    with those similarities, on non-negative rows with a duplicated bank row (exact ties)."""
    bank = random_unit_rows(bank_rows, 24, seed=17).abs()
    bank[-1] = bank[0]
    queries = random_unit_rows(90, 24, seed=18).abs()
    values, rows = InnerProductSearch(bank, backend=backend).top_k(queries, k)
    similarities = queries @ bank.T
    expected = similarities.topk(k, dim=1).values
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, similarities.gather(1, rows), rtol=1e-6, atol=1e-6)
    assert (rows.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct rows, each with its similarity


@needs_faiss
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize(("bank_rows", "shards", "k"), [(500, 3, 7), (10, 4, 5), (3, 4, 2)])
def test_sharded_faiss_index_merges_shards_exactly(bank_rows, shards, k, half):
    """The multi-GPU layout (one contiguous bank shard per device, merged by faiss's IndexShards), run with
    CPU shards: k above a shard's size, and more devices than bank rows, included."""
    bank, queries = random_unit_rows(bank_rows, 32, seed=10), random_unit_rows(40, 32, seed=11)
    similarities = (queries @ bank.T).numpy()
    index = build_faiss_index(bank, half, devices=[None] * shards)
    values, ids = index.search(queries.numpy(), k)
    assert index.ntotal == bank_rows
    expected_ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(values, np.take_along_axis(similarities, expected_ids, axis=1),
                               rtol=0, atol=2e-3 if half else 1e-6)
    if not half:  # ids are global bank rows: the shards' offsets were added back
        np.testing.assert_array_equal(ids, expected_ids)


def test_a_bank_too_large_for_faiss_on_the_gpus_goes_to_the_torch_backend(monkeypatch):
    """'auto' with faiss-gpu: a bank whose shard does not fit half a GPU's free memory is searched by the torch
    backend (which streams it); asking for faiss explicitly is then a clear error."""
    import ood_detectors.search as search
    monkeypatch.setattr(search, "faiss_gpu_count", lambda: 2)
    monkeypatch.setattr(search, "faiss_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 500 * 32 * 4 // 2, 1 << 40))
    bank, queries = random_unit_rows(1000, 32, seed=12), random_unit_rows(5, 32, seed=13)
    index = InnerProductSearch(bank, backend="auto")  # a 500-row shard needs 64 KB; 64 KB are free, half usable
    assert index.backend == "auto"  # blocked matmul + top-k
    expected = np.sort((queries @ bank.T).numpy(), axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(index.search(queries, 3).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError) as error:
        InnerProductSearch(bank, backend="faiss")
    for value in ("1000 x 32", "2 GPU(s)", "'auto'", "'torch'"):  # the bank, the GPUs, the backends that work
        assert value in str(error.value)


@needs_faiss
@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_detectors_score_the_same_with_either_backend(name):
    feas = random_unit_rows(400, 20, seed=4)
    bank = {"feas": feas, "logits": torch.randn(400, 5, generator=torch.Generator().manual_seed(5))}
    test = {"feas": random_unit_rows(60, 20, seed=6), "logits": torch.randn(60, 5)}
    via_faiss = create_detector(name, backend="faiss").fit(bank).score_samples(test)
    for backend in ("torch", "numpy"):
        blocked = create_detector(name, backend=backend).fit(bank).score_samples(test)
        torch.testing.assert_close(via_faiss, blocked, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_clear_errors():
    bank = random_unit_rows(10, 4, seed=7)
    index = InnerProductSearch(bank, backend="torch")
    with pytest.raises(ValueError) as error:
        index.search(bank, 11)
    assert "k=11" in str(error.value) and "size 10" in str(error.value)
    with pytest.raises(ValueError) as error:
        index.search(torch.zeros(3, 5), 1)
    assert "(N, 4)" in str(error.value) and "(3, 5)" in str(error.value)  # the shape expected, the one given
    with pytest.raises(ValueError) as error:
        InnerProductSearch(bank, backend="annoy")
    assert "'annoy'" in str(error.value) and "torch" in str(error.value)  # the name and a valid one
    with pytest.raises(ValueError) as error:
        InnerProductSearch(torch.zeros(0, 4))
    assert "(0, 4)" in str(error.value)  # the empty bank's shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_bank_rounds_similarities_only_slightly(backend):
    bank, queries = random_unit_rows(500, 64, seed=8), random_unit_rows(40, 64, seed=9)
    exact = InnerProductSearch(bank, backend=backend).search(queries, 5)
    half = InnerProductSearch(bank, backend=backend, bank_dtype="float16").search(queries, 5)
    assert not torch.equal(half, exact)
    torch.testing.assert_close(half, exact, rtol=0, atol=2e-3)  # unit vectors: fp16 keeps ~3 digits


def test_bad_search_options_fail_when_the_detector_is_created():
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", bank_dtype="fp8")
    for value in ("nnguide", "bank_dtype", "'fp8'", "float32", "float16"):  # detector, option, value, valid ones
        assert value in str(error.value)
    with pytest.raises(ValueError) as error:
        create_detector("knn", backend="annoy")
    assert "knn" in str(error.value) and "'annoy'" in str(error.value)


MEMORY_PROBE = """
import re, sys, torch
from ood_detectors.search import InnerProductSearch
def memory_mb(field):
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\\s+(\\d+) kB", status.read()).group(1)) / 1024
bank, queries = torch.randn(200_000, 64), torch.randn(256, 64)  # 2 query chunks x 4 bank blocks of 32 MB
index = InnerProductSearch(bank, backend=sys.argv[1], chunk_bytes=32 << 20)
index.search(queries[:8], 10)
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # resets the peak resident set size (VmHWM) to the current one
before = memory_mb("VmRSS")
index.search(queries, 10)
print(memory_mb("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through Linux's /proc")
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_blocked_search_on_a_cpu_needs_one_similarity_block_beyond_the_bank(backend, tmp_path):
    """Peak memory of a search = the bank (already there) + one chunk_bytes block: not a copy of the bank
    (49 MB here), not two blocks alive at once, not the full 256 x 200,000 similarity matrix (205 MB).
    The probe is a process of its own (its peak is its own), forked from the tests' preloaded interpreter."""
    probe = tmp_path / "memory_probe.py"
    probe.write_text(MEMORY_PROBE)
    run = start_main([backend], cwd=tmp_path, script=probe)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    extra_mb = float(stdout)
    assert 0.95 * 32 <= extra_mb < 1.5 * 32, extra_mb  # one 32 MB block, to within page accounting
