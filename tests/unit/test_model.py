"""The transformer: config checks, parameter count, forward shapes and context limit."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from workers.attention import ATTENTION_KINDS, weights_from_scores
from workers.model import CausalSelfAttention, ModelConfig, Transformer, count_parameters, rotate

CONFIGS = [
    ModelConfig(vocab_size=7, context_length=16),
    ModelConfig(vocab_size=97, context_length=40, d_model=48, n_layers=3, n_heads=4, mlp_ratio=2),
    ModelConfig(vocab_size=2, context_length=5, d_model=8, n_layers=1, n_heads=1, mlp_ratio=1),
    ModelConfig(vocab_size=13, context_length=9, d_model=24, n_layers=4, n_heads=3, attention="ea"),
    ModelConfig(vocab_size=61, context_length=20, d_model=16, n_layers=2, n_heads=8, attention="ea_norm"),
    ModelConfig(vocab_size=11, context_length=10, d_model=16, n_layers=2, n_heads=4, learn_temperature=True),
    ModelConfig(vocab_size=11, context_length=10, d_model=16, n_heads=4, positional="rotary"),
    ModelConfig(vocab_size=11, context_length=10, d_model=16, n_heads=2, positional="none", attention="ea"),
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


# --- the score line and the fair-start settings ---------------------------------------------------------------------


def _by_hand(attn: CausalSelfAttention, x: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The attention formula written out: s = q.k / scale, weights of the kind, output projection."""
    c = x.shape[-1]
    q, k, v = attn.qkv(x).split(c, dim=2)
    d = c // heads
    out = []
    for h in range(heads):
        qh, kh, vh = (z[..., h * d : (h + 1) * d] for z in (q, k, v))
        s = qh @ kh.transpose(-2, -1) / scale
        out.append(weights_from_scores(s[:, None], attn.kind, attn.eps)[:, 0] @ vh)
    return attn.proj(torch.cat(out, -1))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_scores_are_scaled_by_sqrt_d_head_times_temperature(kind, temperature):
    cfg = ModelConfig(vocab_size=5, context_length=6, d_model=16, n_heads=4, attention=kind, temperature=temperature)
    attn = CausalSelfAttention(cfg).double()
    torch.nn.init.normal_(attn.qkv.weight, std=0.5)
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = attn(x)
        torch.testing.assert_close(got, _by_hand(attn, x, 4, math.sqrt(4) * temperature))
        assert not torch.allclose(got, _by_hand(attn, x, 4, math.sqrt(16) * temperature))  # not sqrt(d_model)


def test_a_learned_temperature_is_one_parameter_per_head_that_gets_gradients():
    cfg = ModelConfig(vocab_size=5, context_length=6, d_model=16, n_heads=4, temperature=0.5, learn_temperature=True)
    model = Transformer(cfg)
    temps = [p for n, p in model.named_parameters() if n.endswith("log_temperature")]
    assert len(temps) == cfg.n_layers and all(p.numel() == 4 for p in temps)
    assert all(torch.allclose(p.exp(), torch.full_like(p, 0.5)) for p in temps)
    model(torch.randint(5, (2, 6))).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in temps)
    assert not [n for n, _ in Transformer(replace(cfg, learn_temperature=False)).named_parameters() if "temp" in n]


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_qkv_init_std_sets_the_projection_and_nothing_else(std):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=7, context_length=8, d_model=64, n_heads=2, qkv_init_std=std))
    for name, p in model.named_parameters():
        if name.endswith("qkv.weight"):
            assert p.std().item() == pytest.approx(std, rel=0.05)
        elif name.endswith("weight") and p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, 6, 8)  # the same query and key at every position
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, 6, 8)
    s = rotate(q) @ rotate(k).transpose(-2, -1)  # (1, 1, 6, 6)
    for lag in range(6):
        diag = torch.diagonal(s[0, 0], offset=-lag)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag))
    torch.testing.assert_close(rotate(q).norm(dim=-1), q.norm(dim=-1))  # a rotation


@pytest.mark.parametrize("positional", ["rotary", "none"])
def test_without_learned_positions_there_is_no_position_table(positional):
    model = Transformer(ModelConfig(vocab_size=7, context_length=8, d_model=16, positional=positional))
    assert model.pos is None and model(torch.randint(7, (2, 8))).shape == (2, 8, 7)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"positional": "sinusoid"}, "positional"),
        ({"positional": "rotary", "d_model": 6, "n_heads": 2}, "even"),
        ({"temperature": 0.0}, "temperature"),
        ({"qkv_init_std": -1.0}, "qkv_init_std"),
    ],
)
def test_bad_fair_start_settings_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(vocab_size=7, context_length=8, **kw)
