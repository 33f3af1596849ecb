"""Contract tests over every registered attention kind, and the model's use of the registry."""

from __future__ import annotations

import math

import pytest
import torch

import workers.attention as attention
from workers.attention import ATTENTION_KINDS, attention_weights
from workers.model import ModelConfig, Transformer


def _softmax(xs: list[float]) -> list[float]:
    es = [math.exp(x) for x in xs]
    return [e / sum(es) for e in es]


def _squared_norm(xs: list[float], eps: float) -> list[float]:
    sq = [x * x for x in xs]
    return [s / (eps + sum(sq)) for s in sq]


# A hand-made example: T=3, d=4 (so scores are q.k / 2). Each row lists the causal scores s_ij, j <= i.
_Q = [[1.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]]
_K = [[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]]
_SCORES = [[1.0], [1.0, -1.0], [1.0, 0.5, 1.5]]
_FORMULAS = {
    "dpa": lambda row, eps: _softmax(row),
    "ea": lambda row, eps: _softmax([s * s for s in row]),
    "ea_norm": _squared_norm,
}


def _expected(kind: str, eps: float) -> torch.Tensor:
    out = torch.zeros(3, 3, dtype=torch.float64)
    for i, row in enumerate(_SCORES):
        out[i, : i + 1] = torch.tensor(_FORMULAS[kind](row, eps), dtype=torch.float64)
    return out


def _qk(b: int = 2, h: int = 3, t: int = 5, d: int = 4, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g, dtype=dtype), torch.randn(b, h, t, d, generator=g, dtype=dtype)


def test_registry_holds_the_kinds_of_the_design():
    assert {"dpa", "ea", "ea_norm"} <= set(ATTENTION_KINDS)
    assert set(_FORMULAS) == set(ATTENTION_KINDS), "a new kind needs its hand-computed formula in this test"


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_output_shape(kind):
    q, k = _qk(b=2, h=3, t=5, d=4)
    w = attention_weights(q, k, kind)
    assert w.shape == (2, 3, 5, 5)
    assert w.dtype == q.dtype


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_exact_formula_on_hand_computed_example(kind, eps):
    q = torch.tensor(_Q, dtype=torch.float64).view(1, 1, 3, 4)
    k = torch.tensor(_K, dtype=torch.float64).view(1, 1, 3, 4)
    w = attention_weights(q, k, kind, eps=eps)[0, 0]
    torch.testing.assert_close(w, _expected(kind, eps), rtol=1e-12, atol=1e-12)


def test_hand_computed_numbers_are_what_the_formulas_say():
    # Spot values written out, so the helper formulas above cannot drift unnoticed.
    assert _expected("dpa", 1e-6)[1, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert _expected("ea", 1e-6)[1].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert _expected("ea_norm", 0.5)[2].tolist() == pytest.approx([1 / 4, 0.25 / 4, 2.25 / 4])


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_rows_sum_to_one(kind):
    q, k = _qk(t=7)
    w = attention_weights(q, k, kind, eps=1e-12)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_causal_no_weight_above_diagonal(kind):
    q, k = _qk(t=6)
    w = attention_weights(q, k, kind)
    upper = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert (w[..., upper] == 0).all()
    assert (w[..., ~upper] > 0).all()  # random scores are never exactly 0, so every allowed key gets weight


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("p", [1, 3, 5])
def test_changing_later_query_or_key_changes_no_earlier_row(kind, p):
    q, k = _qk(t=6)
    q2, k2 = q.clone(), k.clone()
    q2[:, :, p:] += 1.7
    k2[:, :, p:] -= 2.3
    w, w2 = attention_weights(q, k, kind), attention_weights(q2, k2, kind)
    assert torch.equal(w[:, :, :p], w2[:, :, :p])
    assert not torch.allclose(w[:, :, p:], w2[:, :, p:])


def _antiparallel_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Query 2 sees key +k (j=0), key -k (j=1) and an orthogonal key (j=2)."""
    key = torch.tensor([1.5, -0.5], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.1], [0.2, 0.7], [1.2, -0.4]], dtype=torch.float64).view(1, 1, 3, 2)
    k = torch.stack([key, -key, torch.tensor([0.5, 1.5], dtype=torch.float64)]).view(1, 1, 3, 2)
    return q, k


@pytest.mark.parametrize("kind", ["ea", "ea_norm"])
def test_expressive_kinds_weigh_parallel_and_antiparallel_keys_equally(kind):
    q, k = _antiparallel_example()
    w = attention_weights(q, k, kind)[0, 0, 2]
    torch.testing.assert_close(w[0], w[1], rtol=1e-14, atol=0)
    assert w[2] < w[0]  # the orthogonal key gets the least weight
    assert w[2] < 0.2


def test_dpa_tells_parallel_from_antiparallel():
    q, k = _antiparallel_example()
    w = attention_weights(q, k, "dpa")[0, 0, 2]
    assert w[0] > 0.5 > w[1]
    assert w[1] < w[2]  # under DPA the antiparallel key, not the orthogonal one, is suppressed


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_gradcheck(kind):
    q, k = _qk(b=1, h=2, t=4, d=3, seed=1)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k: attention_weights(q, k, kind), (q, k), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_gradgradcheck(kind):
    q, k = _qk(b=1, h=1, t=3, d=2, seed=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda q, k: attention_weights(q, k, kind), (q, k), eps=1e-6, atol=1e-5)


def _reference(q: torch.Tensor, k: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The design's formulas as plain autograd expressions, independent of workers.attention."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    allowed = torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril()
    if kind == "dpa":
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    if kind == "ea":
        return torch.softmax(s.square().masked_fill(~allowed, float("-inf")), dim=-1)
    sq = s.square().masked_fill(~allowed, 0.0)
    return sq / (eps + sq.sum(dim=-1, keepdim=True))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("create_graph", [False, True])
def test_weights_and_gradients_match_the_plain_formulas(kind, create_graph):
    # float32 at a training-like size; create_graph=True takes the double-backward code path.
    q, k = _qk(b=2, h=2, t=17, d=8, seed=5, dtype=torch.float32)
    g = torch.randn(2, 2, 17, 17, generator=torch.Generator().manual_seed(6))
    g_before = g.clone()
    grads = []
    for fn in (lambda q, k: attention_weights(q, k, kind, eps=1e-3), lambda q, k: _reference(q, k, kind, 1e-3)):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        w = fn(qq, kk)
        grads.append((w.detach(), *torch.autograd.grad(w, (qq, kk), g, create_graph=create_graph)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got.detach(), want.detach())
    assert torch.equal(g, g_before), "backward must not modify the incoming gradient"


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_backward_twice_gives_the_same_gradients(kind):
    # A backward that overwrote what it saved would give different gradients the second time.
    q, k = _qk(t=6, seed=7)
    q.requires_grad_(True)
    w = attention_weights(q, k, kind)
    g = torch.randn_like(w)
    (a,) = torch.autograd.grad(w, q, g, retain_graph=True)
    (b,) = torch.autograd.grad(w, q, g)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_vmap_matches_the_batched_call(kind):
    q, k = _qk(b=3, t=5, seed=8)
    torch.testing.assert_close(
        torch.func.vmap(lambda q, k: attention_weights(q, k, kind))(q, k), attention_weights(q, k, kind)
    )


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_seed_reproducibility(kind):
    a = attention_weights(*_qk(seed=3, dtype=torch.float32), kind)
    b = attention_weights(*_qk(seed=3, dtype=torch.float32), kind)
    c = attention_weights(*_qk(seed=4, dtype=torch.float32), kind)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_kind_raises_value_error_naming_it():
    q, k = _qk()
    with pytest.raises(ValueError, match="no_such_kind"):
        attention_weights(q, k, "no_such_kind")


# --- the model's attention uses the registry ------------------------------------------------------------------------


def _model(kind: str, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_layers=2, n_heads=2, attention=kind, **kw)
    return Transformer(cfg).double().eval()


def _tokens(seed: int = 0, b: int = 3, t: int = 8) -> torch.Tensor:
    return torch.randint(11, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_model_runs_every_kind_through_the_registry(kind, monkeypatch):
    calls = []
    original = attention._KINDS[kind]

    def spy(scores, mask, eps):
        calls.append(scores.shape)
        return original(scores, mask, eps)

    monkeypatch.setitem(attention._KINDS, kind, spy)
    model = _model(kind)
    logits = model(_tokens())
    assert logits.shape == (3, 8, 11)
    assert torch.isfinite(logits).all()
    assert calls == [torch.Size([3, 2, 8, 8])] * 2  # one call per layer, (B, H, T, T)


def test_model_output_depends_on_the_kind():
    base = _model("dpa")
    x = _tokens()
    outs = {}
    for kind in ATTENTION_KINDS:
        m = _model(kind)
        m.load_state_dict(base.state_dict())  # same weights: only the kind differs
        outs[kind] = m(x)
    for a in ATTENTION_KINDS:
        for b in ATTENTION_KINDS:
            if a < b:
                assert not torch.allclose(outs[a], outs[b]), (a, b)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("p", [1, 4, 7])
def test_model_is_causal(kind, p):
    model = _model(kind)
    x = _tokens()
    y = x.clone()
    y[:, p] = (y[:, p] + 1) % 11
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :p], b[:, :p], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, p], b[:, p])


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_model_seed_reproducibility(kind):
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(_model(kind, seed=5)(x), _model(kind, seed=5)(x))
        assert not torch.equal(_model(kind, seed=5)(x), _model(kind, seed=6)(x))


def test_model_passes_eps_to_ea_norm():
    x = _tokens()
    with torch.no_grad():
        a = _model("ea_norm", eps=1e-6)(x)
        b = _model("ea_norm", eps=10.0)(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(("fast", "plain"), [("_ea", "_ea_plain"), ("_ea_norm", "_ea_norm_plain")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_ea_paths_equal_the_plain_expressions_bit_for_bit(fast: str, plain: str, dtype: torch.dtype) -> None:
    """The hand-written backward passes must give exactly autograd's weights and gradients."""
    import workers.attention as attn

    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, 2, 9, 9, generator=g, dtype=dtype) * 3
    upstream = torch.randn(3, 2, 9, 9, generator=g, dtype=dtype)
    mask = attn.causal_mask(9)
    outs, grads = [], []
    for name in (fast, plain):
        s = base.clone().requires_grad_(True)
        w = getattr(attn, name)(s, mask, 1e-6)
        w.backward(upstream)
        outs.append(w.detach())
        grads.append(s.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


def test_a_flag_per_member_gives_dpa_or_ea_bit_for_bit_under_vmap() -> None:
    """A pack mixing DPA and EA: each member's weights and gradients are its own kind's plain expression's."""
    import workers.attention as attn

    g = torch.Generator().manual_seed(11)
    scores = torch.randn(4, 3, 2, 9, 9, generator=g) * 3  # (members, B, H, T, T)
    upstream = torch.randn(4, 3, 2, 9, 9, generator=g)
    square = torch.tensor([False, True, True, False])
    mask = attn.causal_mask(9)
    s = scores.clone().requires_grad_(True)
    w = torch.func.vmap(lambda x, f: attn.squared_or_plain_softmax(x, f, mask))(s, square)
    w.backward(upstream)
    for m, sq in enumerate(square.tolist()):
        one = scores[m].clone().requires_grad_(True)
        want = (attn._ea_plain if sq else attn._dpa)(one, mask, 1e-6)
        want.backward(upstream[m])
        assert torch.equal(w[m].detach(), want.detach()), m
        assert torch.equal(s.grad[m], one.grad), m
    assert attn.pack_family("dpa") == attn.pack_family("ea") != attn.pack_family("ea_norm")
