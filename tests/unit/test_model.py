"""The transformer: config checks, parameter count, forward shapes and context limit."""

from __future__ import annotations

import pytest
import torch

from workers.attention import ATTENTION_KINDS
from workers.model import ModelConfig, Transformer, count_parameters

CONFIGS = [
    ModelConfig(vocab_size=7, context_length=16),
    ModelConfig(vocab_size=97, context_length=40, d_model=48, n_layers=3, n_heads=4, mlp_ratio=2),
    ModelConfig(vocab_size=2, context_length=5, d_model=8, n_layers=1, n_heads=1, mlp_ratio=1),
    ModelConfig(vocab_size=13, context_length=9, d_model=24, n_layers=4, n_heads=3, attention="ea"),
    ModelConfig(vocab_size=61, context_length=20, d_model=16, n_layers=2, n_heads=8, attention="ea_norm"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"v{c.vocab_size}-d{c.d_model}-L{c.n_layers}-h{c.n_heads}")
def test_count_parameters_matches_the_built_model(cfg):
    model = Transformer(cfg)
    assert count_parameters(cfg) == model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_count_parameters_hand_computed():
    # d=8, V=2, ctx=5, 1 layer, mlp_ratio 1: embeddings 16 + 40, block 32 + 216 + 72 + 72 + 72, final LN 16, head 18.
    assert count_parameters(CONFIGS[2]) == 16 + 40 + (32 + 216 + 72 + 72 + 72) + 16 + 18


def test_parameter_count_is_the_same_for_every_attention_kind():
    counts = {
        k: Transformer(ModelConfig(vocab_size=11, context_length=8, attention=k)).num_parameters()
        for k in ATTENTION_KINDS
    }
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize(("d_model", "n_heads"), [(32, 3), (10, 4), (8, 16)])
def test_d_model_not_divisible_by_n_heads_raises(d_model, n_heads):
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=7, context_length=8, d_model=d_model, n_heads=n_heads)


@pytest.mark.parametrize("field", ["vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"])
def test_non_positive_sizes_raise_naming_the_field(field):
    kw = {"vocab_size": 7, "context_length": 8, "d_model": 8, "n_layers": 1, "n_heads": 1, "mlp_ratio": 1, field: 0}
    if field == "n_heads":
        kw[field] = -1  # 0 heads would fail the divisibility check first
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_unknown_attention_kind_raises():
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig(vocab_size=7, context_length=8, attention="bogus")


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("t", [1, 5, 12])
def test_forward_shape(kind, t):
    model = Transformer(ModelConfig(vocab_size=9, context_length=12, d_model=16, n_heads=4, attention=kind))
    idx = torch.randint(9, (3, t), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, t, 9)
    assert torch.isfinite(logits).all()


def test_sequence_longer_than_context_raises():
    model = Transformer(ModelConfig(vocab_size=9, context_length=12))
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(2, 13, dtype=torch.long))


def test_prefix_of_a_sequence_gets_the_same_logits():
    # Shorter inputs use the top-left corner of the causal mask: logits of a prefix equal the full run's first rows.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=9, context_length=12, d_model=16)).double().eval()
    idx = torch.randint(9, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx[:, :7]), model(idx)[:, :7], rtol=0, atol=1e-12)


def test_model_trains_on_gradients():
    # Every parameter gets a gradient: nothing is disconnected from the loss.
    model = Transformer(ModelConfig(vocab_size=9, context_length=8, d_model=16))
    idx = torch.randint(9, (4, 8), generator=torch.Generator().manual_seed(0))
    model(idx).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
