"""On a CUDA machine: detectors and the whole pipeline give the CPU's answers. Skipped without a GPU."""
from __future__ import annotations

import csv

import pytest
import torch

import main
from ood_detectors import available_detectors, bf16, create_detector
from ood_detectors.search import InnerProductSearch, faiss_gpu_count
from tests.test_detectors import make_outputs
from tests.test_search_bf16 import float32_output_near_tie, relu_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", available_detectors())
def test_scores_on_cuda_equal_scores_on_cpu(name):
    bank, test = make_outputs(300, seed=0), make_outputs(80, seed=1)
    hyper_parameters = {"principal_dim": 10} if name == "vim" else {}
    on_cpu = create_detector(name, **hyper_parameters).fit(bank).score_samples(test)
    to_cuda = {key: value.cuda() for key, value in bank.items()}
    on_cuda = create_detector(name, **hyper_parameters).fit(to_cuda).score_samples(
        {key: value.cuda() for key, value in test.items()})
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-4 * on_cpu.abs().max().item())


def test_pipeline_on_cuda_matches_cpu(data_root, tiny_model_yaml, tmp_path):
    common = ["--model", str(tiny_model_yaml), "--train-data", "imagenet1k", "--id-data", "imagenet1k",
              "--ood-data", "inaturalist", "textures", "--detectors", "nnguide", "knn", "energy",
              "--data-root", str(data_root), "--batch-size", "8", "--num-workers", "2", "--bank-ratio", "0.5"]
    results = {}
    for run, extra in [("cpu", ["--device", "cpu"]), ("cuda", ["--device", "cuda"])]:
        output = tmp_path / run
        assert main.main([*common, *extra, "--output-dir", str(output),
                          "--cache-dir", str(tmp_path / f"cache-{run}")]) == 0
        with (output / "results.csv").open() as file:
            results[run] = list(csv.DictReader(file))
    for cpu_row, cuda_row in zip(results["cpu"], results["cuda"]):
        # cuDNN convolutions (TF32 by default) round differently; rankings, hence metrics, barely move
        assert abs(float(cpu_row["auroc"]) - float(cuda_row["auroc"])) < 1.0


def test_a_bank_too_large_for_the_gpu_is_streamed_from_host_memory(monkeypatch):
    bank = torch.nn.functional.normalize(torch.randn(5000, 64), dim=1)          # stays on the CPU
    queries = torch.nn.functional.normalize(torch.randn(300, 64), dim=1).cuda()
    resident = InnerProductSearch(bank, backend="torch").search(queries, 7)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 1 << 40))  # "1 KiB free"
    streamed_index = InnerProductSearch(bank, backend="torch", bank_block_rows=512)
    streamed = streamed_index.search(queries, 7)
    assert streamed.device.type == "cuda" and list(streamed_index._resident) == [torch.device("cpu")]  # no copy
    torch.testing.assert_close(streamed, resident)


def test_bf16_on_cuda_gives_the_fp32_neighbours():
    """Tensor cores: the bf16 product returned in float32, candidates re-ranked in fp32 (whole bank resident)."""
    confidence = 1 + 19 * torch.rand(4000, generator=torch.Generator().manual_seed(2))
    bank, queries = (relu_features(4000, 128, seed=1) * confidence[:, None]).cuda(), relu_features(300, 128, 3).cuda()
    exact_values, exact_rows = InnerProductSearch(bank, backend="torch", precision="fp32").top_k(queries, 10)
    index = InnerProductSearch(bank, precision="bf16", bank_block_rows=700)
    values, rows = index.top_k(queries, 10)
    assert index.uses_bf16(queries) and torch.equal(rows, exact_rows)
    torch.testing.assert_close(values, exact_values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("scale", "row", "value"), [(1.0, 20, 257.125), (0.5, 21, 257.0)])
def test_bf16_on_cuda_keeps_a_near_tie_at_its_bound_and_loses_it_with_half(scale, row, value, monkeypatch):
    monkeypatch.setattr(bf16, "BOUND_SCALE", scale)
    bank, query = float32_output_near_tie()
    values, rows = InnerProductSearch(bank.cuda(), precision="bf16").top_k(query.cuda(), 1)
    assert rows.item() == row and values.item() == value


def test_float16_bank_on_the_gpu_stays_close_to_float32():
    bank, test = make_outputs(2000, seed=3, dim=256), make_outputs(200, seed=4, dim=256)
    cuda = {key: value.cuda() for key, value in bank.items()}
    queries = {key: value.cuda() for key, value in test.items()}
    exact = create_detector("nnguide", backend="torch").fit(cuda).score_samples(queries)
    half = create_detector("nnguide", backend="torch", bank_dtype="float16").fit(cuda).score_samples(queries)
    torch.testing.assert_close(half, exact, rtol=0, atol=3e-3 * exact.abs().max().item())


needs_faiss_gpu = pytest.mark.skipif(not torch.cuda.is_available() or faiss_gpu_count() == 0,
                                     reason="needs faiss-gpu")


@needs_faiss_gpu
@pytest.mark.parametrize("bank_dtype", ["float32", "float16"])
def test_faiss_on_every_visible_gpu_agrees_with_the_torch_backend(bank_dtype):
    """One GPU: a GpuIndexFlatIP; several: one bank shard per GPU merged by IndexShards."""
    import faiss

    bank = torch.nn.functional.normalize(torch.randn(20_000, 128), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(500, 128), dim=1)
    index = InnerProductSearch(bank, backend="faiss", bank_dtype=bank_dtype)
    assert isinstance(index._index, faiss.IndexShards) == (faiss_gpu_count() > 1)
    expected = InnerProductSearch(bank, backend="torch").search(queries, 10)
    torch.testing.assert_close(index.search(queries, 10), expected, rtol=0,
                               atol=2e-3 if bank_dtype == "float16" else 1e-5)
    with pytest.raises(ValueError, match="k=2049: faiss on GPUs finds at most 2048 neighbours"):
        index.search(queries, 2049)
