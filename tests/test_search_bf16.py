"""precision="bf16": candidates from a bfloat16 product, ranked by fp32 similarity, give exactly the fp32 search's
neighbours, on random data, on ReLU features with confidence-scaled rows, and on constructed cases at the
rounding bound, which a halved bound gets wrong; on the CPU's branch (bf16 output) and on the GPUs' (float32)."""
from __future__ import annotations

import pytest
import torch

import ood_detectors.bf16 as bf16
from ood_detectors import create_detector
from ood_detectors.bf16 import rounding_bound
from ood_detectors.search import InnerProductSearch


def relu_features(n: int, dim: int, seed: int) -> torch.Tensor:
    """Normalised ReLU features of one random layer: non-negative, similar to each other (many near-ties)."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.randn(64, dim, generator=generator)
    inputs = torch.randn(n, 64, generator=generator)
    return torch.nn.functional.normalize((inputs @ layer).relu(), dim=1)


def assert_same_neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int, **options) -> None:
    exact_values, exact_rows = InnerProductSearch(bank, backend="torch", precision="fp32").top_k(queries, k)
    values, rows = InnerProductSearch(bank, backend="torch", precision="bf16", **options).top_k(queries, k)
    assert torch.equal(rows, exact_rows)
    torch.testing.assert_close(values, exact_values, rtol=1e-6, atol=1e-6)  # fp32 values, summed in another order


def test_random_data_gives_the_fp32_neighbours():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(3000, 96, generator=generator), torch.randn(200, 96, generator=generator)
    assert_same_neighbours(bank, queries, 10)


@pytest.mark.parametrize("blocks", [{}, {"chunk_bytes": 4 * 50 * 700, "bank_block_rows": 700}])
def test_confidence_scaled_relu_features_give_the_fp32_neighbours(blocks):
    """NNGuide's bank: each normalised feature times its own confidence (norms from 1 to 20), searched whole and
    in several bank blocks and query chunks (each block's running k-th only narrows the candidates)."""
    feas = relu_features(4000, 128, seed=1)
    confidence = 1 + 19 * torch.rand(4000, generator=torch.Generator().manual_seed(2))
    assert_same_neighbours(feas * confidence[:, None], relu_features(300, 128, seed=3), 10, **blocks)
    assert_same_neighbours(feas, relu_features(300, 128, seed=3), 1, **blocks)  # knn's unscaled bank, k=1


def test_the_bound_holds_for_each_similarity():
    """|bf16 product - exact similarity| <= rounding_bound, entry by entry, on scaled ReLU features."""
    bank = relu_features(500, 256, seed=4) * torch.linspace(1, 30, 500)[:, None]
    queries = relu_features(50, 256, seed=5)
    bank16, queries16 = bank.bfloat16(), queries.bfloat16()
    product = queries16 @ bank16.T                                               # (50, 500) bf16, as the search
    exact = queries.double() @ bank.double().T
    norms = [torch.stack([x.double().norm(dim=1), (x - x16.float()).double().norm(dim=1), x16.double().norm(dim=1)])
             for x, x16 in ((queries, queries16), (bank, bank16))]
    bound = rounding_bound(norms[0][:, :, None], norms[1][:, None, :], product.double(), 2.0 ** -8, 256)
    assert ((product.double() - exact).abs() <= bound).all()


def near_tie_at_the_bound() -> tuple[torch.Tensor, torch.Tensor]:
    """A bank whose fp32 nearest row (A, similarity 257.125) comes out 2 below another row (B, 256.875) in bf16.

    The query is all ones (exact in bf16). A's entries sit 2^-10 above bf16 values and round down, B's 2^-10
    below and round up: 0.25 of input rounding each, exactly the Cauchy-Schwarz bound (the residuals are parallel
    to the query). Their bf16 sums, 256.875 and 257.125, straddle bf16's midpoint 257 and round to 256 and 258,
    about bf16's unit roundoff times the value each. So A trails B by 2 while the two bounds add up to 2.55:
    A is a candidate, and with half the bound it is not."""
    return rows_a_and_b(1.875, 2.125, noise_seed=6)


def rows_a_and_b(a_first: float, b_first: float, noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An all-ones query and a bank of 52 rows: A (row 20) is ones with first entry a_first, every entry 2^-10
    above its bf16 value; B (row 21) ones with b_first, every entry 2^-10 below; the rest noise far below both."""
    a, b = torch.ones(256), torch.ones(256)
    a[0], b[0] = a_first, b_first
    noise = 0.1 * torch.rand(50, 256, generator=torch.Generator().manual_seed(noise_seed))
    return torch.cat([noise[:20], torch.stack([a + 2.0 ** -10, b - 2.0 ** -10]), noise[20:]]), torch.ones(1, 256)


def test_a_near_tie_at_the_bound_gives_the_fp32_neighbour():
    bank, query = near_tie_at_the_bound()
    exact_values, exact_rows = InnerProductSearch(bank, backend="torch", precision="fp32").top_k(query, 1)
    assert exact_rows.item() == 20 and exact_values.item() == 257.125  # A
    assert (query.bfloat16() @ bank[20:22].bfloat16().T).tolist() == [[256.0, 258.0]]  # bf16 ranks B first
    values, rows = InnerProductSearch(bank, backend="torch", precision="bf16").top_k(query, 1)
    assert rows.item() == 20 and values.item() == 257.125


def test_half_the_bound_loses_the_true_neighbour(monkeypatch):
    """The bound is not loose by 2x: halved, it drops A from the candidates and returns B."""
    monkeypatch.setattr(bf16, "BOUND_SCALE", 0.5)
    bank, query = near_tie_at_the_bound()
    values, rows = InnerProductSearch(bank, backend="torch", precision="bf16").top_k(query, 1)
    assert rows.item() == 21 and values.item() == 256.875


def gpu_branch_top_k(bank: torch.Tensor, queries: torch.Tensor, k: int, monkeypatch, bank_rows: int = 0,
                     query_rows: int = 0):
    """bf16.top_k on the branch GPUs take: the product returned in float32 (`out_dtype`), so no output rounding
    enters the bound. torch has no such product on CPUs; the same one, bf16 inputs summed in float32, stands in."""
    buffers = []
    monkeypatch.setattr(bf16, "_bf16_product", lambda queries16, block16, buffer: buffers.append(buffer) or
                        queries16.float() @ block16.float().T)
    bank16, norms = bf16.round_bank(bank, chunk_bytes=1 << 20)
    found = bf16.top_k(queries, k, bank, bank16, norms, bank_rows or len(bank), query_rows or len(queries),
                       chunk_bytes=1 << 20, buffer=None)
    assert buffers and set(buffers) == {None}
    return found


def test_the_gpu_branch_gives_the_fp32_neighbours_of_scaled_relu_features(monkeypatch):
    confidence = 1 + 19 * torch.rand(4000, generator=torch.Generator().manual_seed(11))
    bank, queries = relu_features(4000, 128, seed=10) * confidence[:, None], relu_features(300, 128, seed=12)
    values, rows = gpu_branch_top_k(bank, queries, 10, monkeypatch, bank_rows=700, query_rows=50)
    exact_values, exact_rows = InnerProductSearch(bank, backend="torch", precision="fp32").top_k(queries, 10)
    assert torch.equal(rows, exact_rows)
    torch.testing.assert_close(values, exact_values, rtol=1e-6, atol=1e-6)


def float32_output_near_tie() -> tuple[torch.Tensor, torch.Tensor]:
    """A near-tie for a bf16 product returned in float32 (no output rounding; the bound is the two rows' input
    rounding, 0.25 each, plus 0.016 of accumulation): A (row 20, 257.125 in fp32) comes out 256.875 in bf16 and
    B (row 21, 257.0) 257.25, 0.375 ahead, within the 0.53 of their bounds but not within half of it."""
    bank, query = rows_a_and_b(1.875, 2.25, noise_seed=13)
    assert (bank[20:22] @ query.T).flatten().tolist() == [257.125, 257.0]
    assert (bank[20:22].bfloat16().float() @ query.T).flatten().tolist() == [256.875, 257.25]
    return bank, query


@pytest.mark.parametrize(("scale", "row", "value"), [(1.0, 20, 257.125), (0.5, 21, 257.0)])
def test_the_gpu_branch_keeps_a_near_tie_at_its_bound_and_loses_it_with_half(scale, row, value, monkeypatch):
    monkeypatch.setattr(bf16, "BOUND_SCALE", scale)
    values, rows = gpu_branch_top_k(*float32_output_near_tie(), 1, monkeypatch)
    assert rows.item() == row and values.item() == value


def test_auto_uses_bf16_only_for_large_searches_where_it_is_native(monkeypatch):
    bank = torch.randn(1000, 100)
    index = InnerProductSearch(bank)
    monkeypatch.setattr(bf16, "native_bf16", lambda device: True)
    assert not index.uses_bf16(torch.zeros(499_999, 100))  # just under bf16.MIN_FLOPS (1e11)
    assert index.uses_bf16(torch.empty(500_000, 100))
    assert not InnerProductSearch(bank, backend="numpy").uses_bf16(torch.empty(500_000, 100))  # numpy: fp32
    assert not InnerProductSearch(bank, bank_dtype="float16").uses_bf16(torch.empty(500_000, 100))
    assert not InnerProductSearch(bank, precision="fp32").uses_bf16(torch.empty(500_000, 100))
    monkeypatch.setattr(bf16, "native_bf16", lambda device: False)
    assert not index.uses_bf16(torch.empty(500_000, 100))
    assert InnerProductSearch(bank, precision="bf16").uses_bf16(torch.zeros(1, 100))  # asked for: always


@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_detectors_pass_the_precision_to_their_search(name):
    feas = relu_features(600, 64, seed=7)
    bank = {"feas": feas, "logits": torch.randn(600, 5, generator=torch.Generator().manual_seed(8))}
    test = {"feas": relu_features(80, 64, seed=9), "logits": torch.randn(80, 5)}
    detector = create_detector(name, precision="bf16").fit(bank)
    assert detector.index_.uses_bf16(test["feas"])
    fp32 = create_detector(name, precision="fp32").fit(bank).score_samples(test)
    torch.testing.assert_close(detector.score_samples(test), fp32, rtol=1e-6, atol=1e-6)


def test_bad_precision_options_are_clear_errors():
    with pytest.raises(ValueError) as error:
        create_detector("knn", precision="fp8")
    for value in ("knn", "'fp8'", "bf16"):  # the detector, the value, a valid one
        assert value in str(error.value)
    for options in ({"backend": "numpy"}, {"bank_dtype": "float16"}):
        with pytest.raises(ValueError) as error:
            InnerProductSearch(torch.randn(10, 4), precision="bf16", **options)
        assert "'bf16'" in str(error.value) and list(options.values())[0] in str(error.value)
