"""Geometry diagnostics measure what they say: hand-made tensors, hand-built models, a trained model."""

from __future__ import annotations

import math

import pytest
import torch

import workers.model as model_module
from workers.attention import ATTENTION_KINDS, weights_from_scores
from workers.geometry import attention_geometry, captured_attention, head_geometry, trained_geometry
from workers.model import ModelConfig, Transformer
from workers.trial import TrialConfig


def test_head_geometry_on_hand_made_tensors() -> None:
    # One sequence, one head, L=4, T=2: queries 2 and 3 are scored; their keys t-T are 0 and 1.
    scores = torch.zeros(1, 1, 4, 4)
    weights = torch.zeros(1, 1, 4, 4)
    weights[0, 0, 2, 0], weights[0, 0, 2, 2] = 0.75, 0.25  # query 2: 0.75 on t-T, 0.25 on t
    weights[0, 0, 3, 1], weights[0, 0, 3, 0] = 0.5, 0.5  # query 3: 0.5 on t-T, 0.5 elsewhere
    scores[0, 0, 2, 0], scores[0, 0, 2, 2] = -2.0, 1.0
    scores[0, 0, 3, 1], scores[0, 0, 3, 0], scores[0, 0, 3, 3] = 4.0, -1.0, -3.0
    scored = torch.tensor([[False, False, True, True]])
    (g,) = head_geometry(scores, weights, torch.tensor([2]), scored, layer=0)
    assert g.queries == 2
    assert g.mass_t == pytest.approx((0.25 + 0.0) / 2)
    assert g.mass_t_minus_T == pytest.approx((0.75 + 0.5) / 2)
    assert g.score_t == pytest.approx((1.0 - 3.0) / 2)
    assert g.score_t_minus_T == pytest.approx((-2.0 + 4.0) / 2)
    assert g.neg_share_t == 0.0  # query 3's negative score at t carries no weight
    assert g.neg_share_t_minus_T == pytest.approx(0.75 / 1.25)
    assert g.neg_mass == pytest.approx((0.75 + 0.5) / 2.0)  # weight on negative keys over all weight


def test_head_geometry_refuses_a_scored_query_without_its_key() -> None:
    z = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match="i - T"):
        head_geometry(z, z, torch.tensor([2]), torch.tensor([[False, True, True]]), layer=0)


def _hand_built(kind: str, sign: float, c: float = 3.0) -> Transformer:
    """One layer, one head, q = c*x and k = sign*c*x: the self-key is the most aligned (sign +1) or the
    most anti-aligned (sign -1) key of every row, since all LayerNorm outputs have the same norm."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=11, context_length=12, d_model=16, n_layers=1, n_heads=1, attention=kind)
    )
    with torch.no_grad():
        model.tok.weight.normal_(0, 1.0)
        model.pos.weight.normal_(0, 1.0)
        qkv = model.blocks[0].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        eye = torch.eye(16)
        qkv.weight[:16] = c * eye
        qkv.weight[16:32] = sign * c * eye
    return model


def _geometry(model: Transformer, t: int = 2):
    torch.manual_seed(1)
    inputs = torch.randint(11, (32, 12))
    scored = torch.arange(12)[None, :].expand(32, 12) >= t
    (g,) = attention_geometry(model, inputs, torch.full((32,), t), scored)
    return g


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_sign_of_the_self_score_is_measured(kind: str) -> None:
    anti, aligned = _geometry(_hand_built(kind, -1.0)), _geometry(_hand_built(kind, +1.0))
    assert anti.score_t < 0 and anti.neg_share_t == 1.0
    assert aligned.score_t > 0 and aligned.neg_share_t == 0.0


def test_ea_attends_to_anti_aligned_keys_and_dpa_does_not() -> None:
    """The question the diagnostics answer: with the self-key anti-aligned, EA's squared score makes it
    the heaviest key, DPA's softmax the lightest; aligned, both make it the heaviest."""
    assert _geometry(_hand_built("ea", -1.0)).mass_t > 0.95
    assert _geometry(_hand_built("dpa", -1.0)).mass_t < 0.05
    assert _geometry(_hand_built("ea", -1.0)).neg_mass > 0.95
    for kind in ("dpa", "ea"):
        assert _geometry(_hand_built(kind, +1.0)).mass_t > 0.95
    # ea_norm: the self-key has the largest squared score, so more than the uniform share
    g = _geometry(_hand_built("ea_norm", -1.0))
    assert g.mass_t > 2 * (1 / 3 + 1 / 12) / 2


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_captured_scores_are_the_models_scores(kind: str) -> None:
    """The capture sees q.k/sqrt(d_head), recomputed here from the weights, and the kind's weights."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=7, context_length=8, d_model=16, n_layers=2, n_heads=2, attention=kind))
    x = torch.randint(7, (3, 8))
    with captured_attention() as calls:
        model(x)
    assert len(calls) == 2
    assert model_module.weights_from_scores.__name__ == "weights_from_scores"  # restored
    h = model.tok(x) + model.pos(torch.arange(8))
    attn = model.blocks[0].attn
    q, k, _ = attn.qkv(model.blocks[0].ln1(h)).split(16, dim=2)
    q, k = (z.view(3, 8, 2, 8).transpose(1, 2) for z in (q, k))
    torch.testing.assert_close(calls[0][0], q @ k.transpose(-2, -1) / math.sqrt(8))
    torch.testing.assert_close(calls[0][1], weights_from_scores(calls[0][0], kind, model.cfg.eps))


def test_trained_geometry_of_a_real_trial() -> None:
    cfg = TrialConfig(
        task=[[7, 1], [7, 2]], d_model=16, n_layers=2, n_heads=2, context_length=12, batch_size=32,
        max_steps=40, warmup_steps=5, eval_interval=20, eval_sequences=64, device="cpu",
    )  # fmt: skip
    record, heads = trained_geometry(cfg)
    assert record["steps"] == 40
    assert [(g.layer, g.head) for g in heads] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for g in heads:
        assert 0 <= g.mass_t <= 1 and 0 <= g.mass_t_minus_T <= 1
        assert g.mass_t + g.mass_t_minus_T <= 1 + 1e-6
        assert 0 <= g.neg_mass <= 1
        assert g.queries > 0
