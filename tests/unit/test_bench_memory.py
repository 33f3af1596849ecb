"""The activation-memory count is exact: EA saves one (B, H, T, T) scores tensor per layer more than DPA."""

from __future__ import annotations

from benchmarks.bench_memory import measure


def test_ea_saves_exactly_one_scores_tensor_more_per_layer() -> None:
    d, layers, heads, context, batch = 16, 2, 2, 8, 4
    got = measure({"tiny": (d, layers, heads, context, batch)})["tiny"]
    scores = batch * heads * context * context * 4  # float32
    assert got["ea"] - got["dpa"] == layers * scores
    assert got["ea_norm"] >= got["ea"]  # plus its (B, H, T, 1) normaliser
    assert got["dpa"] > layers * scores  # the count sees the softmax weights, not only the extra
