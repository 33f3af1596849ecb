"""A pack: many trials of one shape trained as one vectorised model, each member still its own trial.

Members share the model shape, context, batch size, step budget and evaluation schedule
(``pack_key``); they differ in seed, learning rate and task point (a smaller vocabulary is
padded, and the logits it may not use are masked), and DPA and EA members may share a pack (a
flag per member squares its scores: ``workers.attention.squared_or_plain_softmax``), so a
cell's twins, which share their seed's data stream, train together. The stacked
parameters of the members' own ``Transformer`` modules run through ``torch.func``:
``vmap(grad_and_value(loss))`` gives each member the gradient of its own loss (no shared
sum, so a NaN in one member cannot reach another), then per-member clipping and one
vectorised AdamW with a learning rate per member (``lr_at``, as a solo trial).

Each member keeps what makes it the trial it stands for: its init (built from its seed
exactly as ``run_trial`` builds it), its data stream (members with the same task point and
seed share one stream: the batches are the ones a solo trial draws), its evaluation with
the solo trial's functions, divergence check and stop-when-solved. A finished member
leaves the stacked model: no gradient, no weight decay, no Adam moment touches it again,
and its record is final. The pack's state (per member, in solo form) resumes exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from workers.attention import SQUARES_SCORES, pack_family
from workers.evaluation import EvalSets, build_eval_sets
from workers.model import Transformer
from workers.tasks import GENERATOR_VERSION, NTStream
from workers.trial import DIVERGENCE_FACTOR, TrialConfig, clip_groups, evaluate_point, lr_at, pick_device

log = logging.getLogger(__name__)

# TrialConfig fields that members of one pack may differ in; everything else must agree, except that
# the attention kind must only agree in its ``pack_family`` (DPA and EA mix).
MEMBER_FIELDS = ("seed", "lr", "task")
# torch.optim.AdamW's defaults, which run_trial uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon

Indexed = list[tuple[int, dict[str, Any]]]  # (member index, metrics or record)
PackReporter = Callable[[Indexed, Indexed, Callable[[], dict[str, Any]]], None]


def pack_key(cfg: TrialConfig) -> tuple[tuple[str, Any], ...]:
    """What members of one pack share: every config field except seed, lr and task point; of the kind, its family."""
    fields = asdict(cfg) | {"attention": pack_family(cfg.attention)}
    return tuple((k, v) for k, v in sorted(fields.items()) if k not in MEMBER_FIELDS)


def check_pack(cfgs: list[TrialConfig]) -> None:
    """Raises ValueError if the configs cannot train as one pack."""
    if not cfgs:
        raise ValueError("a pack needs at least one member")
    keys = {pack_key(c) for c in cfgs}
    if len(keys) > 1:
        diff = sorted({k for key in keys for k, v in key if v != dict(pack_key(cfgs[0]))[k]})
        raise ValueError(f"pack members must agree on everything but {MEMBER_FIELDS}; they differ in {diff}")


@dataclass
class _Member:
    cfg: TrialConfig
    record: dict[str, Any]
    last: dict[str, Any]
    model: Transformer  # the member's own model (own vocabulary): evaluation runs on it
    stream_key: tuple[Any, ...]
    cpu_s: float = 0.0  # this member's share of the pack's CPU time
    gpu_s: float = 0.0  # this member's share of the pack's wall time on a GPU
    done: bool = False


def _stream_key(cfg: TrialConfig) -> tuple[Any, ...]:
    return (tuple(tuple(m) for m in cfg.task), cfg.identify_margin, cfg.seed)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended along dim 0 up to ``rows`` (vocabulary padding)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class _Stack:
    """The active members' parameters and AdamW state, stacked along a leading member dim."""

    def __init__(self, names: list[str], vocab: int) -> None:
        self.names, self.vocab = names, vocab
        self.params: dict[str, Tensor] = {}
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}

    def load(self, states: list[dict[str, Any]]) -> None:
        """Stack per-member states (solo form: own vocabulary) into padded member tensors."""
        for dst, field in ((self.params, "model"), (self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
            for n in self.names:
                dst[n] = torch.stack([self._pad(n, s[field][n]) for s in states])
        for p in self.params.values():
            p.requires_grad_()  # leaves of the autograd form; the vmap(grad) form ignores it

    def _pad(self, name: str, t: Tensor) -> Tensor:
        return _pad_rows(t, self.vocab) if name in _VOCAB_PARAMS else t

    def member_state(self, j: int, vocab: int) -> dict[str, dict[str, Tensor]]:
        """Member ``j``'s slice in solo form (cloned, unpadded)."""

        def cut(n: str, t: Tensor) -> Tensor:
            return (t[j, :vocab] if n in _VOCAB_PARAMS else t[j]).detach().clone()

        return {
            field: {n: cut(n, src[n]) for n in self.names}
            for field, src in (("model", self.params), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))
        }


_VOCAB_PARAMS = frozenset({"tok.weight", "head.weight", "head.bias"})  # the parameters with a vocabulary dim


def _member_loss(
    base: Transformer,
    params: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    scored: Tensor,
    vocab_ok: Tensor,
    square: Tensor | None = None,
) -> Tensor:
    """One member's mean cross-entropy over its scored positions (as ``run_trial``'s loss).

    ``square``: the member's EA flag in a pack that mixes DPA and EA (``base``'s own kind otherwise).
    """
    logits = functional_call(base, params, (inputs,), {} if square is None else {"square": square})  # (B, L, V)
    logits = torch.where(vocab_ok, logits, float("-inf"))  # a padded vocabulary entry is never predicted
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*L,)
    w = scored.flatten().to(ce.dtype)
    return (ce * w).sum() / w.sum()


Grads = Callable[[list[int] | None], dict[str, Tensor]]


def _vmap_grad(base: Transformer, params: dict[str, Tensor], *batch: Tensor) -> tuple[list[float], Grads]:
    """Per-member losses and gradients from ``vmap(grad_and_value(loss))`` over the stacked parameters."""
    grads, losses = vmap(grad_and_value(lambda p, *a: _member_loss(base, p, *a)))(params, *batch)
    return losses.tolist(), lambda keep: grads if keep is None else _select(grads, keep)


def _vmap_autograd(base: Transformer, params: dict[str, Tensor], *batch: Tensor) -> tuple[list[float], Grads]:
    """Per-member losses from a vmapped forward; gradients by one backward through the members kept.

    No operation mixes members, so member i's gradient depends on its own loss only; a member
    that diverged is left out of the summed loss before the backward pass.
    """
    if next(iter(params.values())).shape[0] == 1:  # one member: the same loss without vmap's batching
        losses = _member_loss(base, {n: p[0] for n, p in params.items()}, *(a[0] for a in batch)).unsqueeze(0)
    else:
        losses = vmap(lambda p, *a: _member_loss(base, p, *a))(params, *batch)

    def grads(keep: list[int] | None) -> dict[str, Tensor]:
        total = (losses if keep is None else losses[keep]).sum()
        g = dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))
        return g if keep is None else _select(g, keep)

    return losses.tolist(), grads


def _select(tensors: dict[str, Tensor], keep: list[int]) -> dict[str, Tensor]:
    index = torch.tensor(keep, device=next(iter(tensors.values())).device)
    return {n: t.index_select(0, index) for n, t in tensors.items()}


# How a pack gets its gradients (both measured in benchmarks/bench_packing.py; the default is the faster on CPU).
GRADIENT_FORMS: dict[str, Callable[..., tuple[list[float], Grads]]] = {
    "vmap_grad": _vmap_grad,
    "vmap_autograd": _vmap_autograd,
}


def _unsqueeze_to(x: Tensor, like: Tensor) -> Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


def _clip_(grads: dict[str, Tensor], max_norm: float) -> None:
    """Per-member ``clip_grad_norm_``: each member's gradient scaled to total norm <= ``max_norm``."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)  # (M,)
    coef = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(_unsqueeze_to(coef, g))


@torch.no_grad()
def _adamw_(stack: _Stack, grads: dict[str, Tensor], lr: Tensor, step: int, weight_decay: float) -> None:
    """torch.optim.AdamW's update (defaults, single-tensor form) with a learning rate per member."""
    b1, b2 = ADAM_BETAS
    bc1, bc2_sqrt = 1 - b1**step, math.sqrt(1 - b2**step)
    for n in stack.names:
        p, g, m, v = stack.params[n], grads[n], stack.exp_avg[n], stack.exp_avg_sq[n]
        lr_p = _unsqueeze_to(lr, p)
        if weight_decay:
            p.mul_(1 - lr_p * weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / bc2_sqrt).add_(ADAM_EPS)
        p.addcmul_(m / denom, -lr_p / bc1)


def run_pack(
    cfgs: list[TrialConfig],
    on_eval: PackReporter | None = None,
    resume: dict[str, Any] | None = None,
    form: str = "vmap_autograd",  # 2-4x faster than vmap_grad on CPU (benchmarks/bench_packing.py)
) -> list[dict[str, Any]]:
    """Train the trials ``cfgs`` as one pack; returns one record per member, as ``run_trial`` would.

    Args:
        cfgs: the members' configurations (``check_pack`` must accept them).
        on_eval: called after every evaluation with the (member index, metrics) pairs evaluated, the
            (member index, final record) pairs of members finished since the last call (solved,
            unsolved at the budget, diverged), and a function that returns the pack's resumable state.
        form: how gradients are computed, a key of ``GRADIENT_FORMS``.
        resume: a state from ``on_eval``'s function; training continues from it exactly.

    Returns:
        One record per member (status, metrics, steps-to-solve, times, config, generator version).
        ``cpu_s`` (``gpu_s``) is the member's share of the pack's CPU (GPU wall) time (each step split evenly among the
        members it trained); ``wall_s`` the pack's wall time until the member finished.
    """
    check_pack(cfgs)
    if form not in GRADIENT_FORMS:
        raise ValueError(f"unknown gradient form {form=}; registered: {list(GRADIENT_FORMS)}")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    shared = cfgs[0]
    device = pick_device(shared.device)
    prior = resume["elapsed"] if resume else {"wall_s": 0.0, "cpu_s": 0.0}

    def elapsed() -> dict[str, float]:
        wall = prior["wall_s"] + time.perf_counter() - wall0
        cpu = prior["cpu_s"] + time.process_time() - cpu0
        return {"wall_s": wall, "cpu_s": cpu, "gpu_s": wall if device.type == "cuda" else 0.0}

    members: list[_Member] = []
    for cfg in cfgs:
        record = {"status": "failed", "steps": 0, "steps_to_solve": None, "config": asdict(cfg)}
        record |= {"generator_version": GENERATOR_VERSION, "device": str(device), "error": None}
        record |= {"pack_size": len(cfgs)}
        members.append(_Member(cfg, record, {}, None, _stream_key(cfg)))  # type: ignore[arg-type]
    try:
        return _train(members, shared, device, elapsed, on_eval, resume, GRADIENT_FORMS[form])
    except (torch.OutOfMemoryError, MemoryError) as e:
        status, error = "oom", f"out of memory: {e!r}"
    except Exception as e:  # a failed pack is a record per member, not a crash of the study
        log.exception("pack failed")
        status, error = "failed", f"{type(e).__name__}: {e}"
    out = []
    for m in members:
        if not m.done:
            m.record.update(m.last)
            m.record.update(status=status, error=error, solved=False, **elapsed())
            m.record.update(cpu_s=m.cpu_s, gpu_s=m.gpu_s)
        out.append(m.record)
    return out


def _train(
    members: list[_Member],
    shared: TrialConfig,
    device: torch.device,
    elapsed: Callable[[], dict[str, float]],
    on_eval: PackReporter | None,
    resume: dict[str, Any] | None,
    gradients: Callable[..., tuple[list[float], Grads]],
) -> list[dict[str, Any]]:
    # Each member's model exactly as run_trial builds it: same seed, same init, own vocabulary.
    for m in members:
        torch.manual_seed(m.cfg.seed)
        m.model = Transformer(m.cfg.model_config()).to(device)
        m.record["n_params"] = m.model.num_parameters()
    vocab = max(m.model.cfg.vocab_size for m in members)
    # shape and buffers only, one per kind: a step whose members share a kind runs that kind's own code
    bases = {
        kind: Transformer(replace(members[0].model.cfg, vocab_size=vocab, attention=kind)).to(device)
        for kind in dict.fromkeys(m.cfg.attention for m in members)
    }
    names = [n for n, _ in next(iter(bases.values())).named_parameters()]
    square = torch.tensor([SQUARES_SCORES.get(m.cfg.attention, False) for m in members], device=device)
    vocab_ok = torch.stack([torch.arange(vocab, device=device) < m.model.cfg.vocab_size for m in members])  # (M, V)

    mixes = [m.cfg.mix() for m in members]
    streams: dict[tuple[Any, ...], NTStream] = {}
    evals: dict[tuple[Any, ...], EvalSets] = {}
    for m, mix in zip(members, mixes, strict=True):
        if m.stream_key not in streams:
            streams[m.stream_key] = NTStream(mix, shared.context_length, m.cfg.seed, shared.holdout)
            evals[m.stream_key] = build_eval_sets(
                mix, shared.context_length, m.cfg.seed, shared.threshold, shared.holdout, shared.eval_sequences
            )
        m.record.update(evals[m.stream_key].info())
    limits = [DIVERGENCE_FACTOR * math.log(mix.vocab_size) for mix in mixes]

    step = 0
    states: list[dict[str, Any]] = []
    if resume:
        step = resume["step"]
        for m, saved in zip(members, resume["members"], strict=True):
            m.record, m.last, m.done = saved["record"], saved["last"], saved["done"]
            m.cpu_s, m.gpu_s = saved["cpu_s"], saved["gpu_s"]
            states.append(saved["state"])
        for key, rng in resume["data_rng"].items():
            streams[key].g.set_state(rng)
    else:
        for m in members:
            params = {n: p.detach().clone() for n, p in m.model.named_parameters()}
            states.append({"model": params, "exp_avg": _zeros(params), "exp_avg_sq": _zeros(params)})

    active = [i for i, m in enumerate(members) if not m.done]
    stack = _Stack(names, vocab)
    loss_sums = {i: 0.0 for i in active}  # zero at every evaluation, so never part of the state
    last_eval = step

    base = next(iter(bases.values()))  # the step's module and its members' flags, set with the active members
    mixed: tuple[Tensor, ...] = ()

    def restack(keep: list[int]) -> None:
        """Rebuild the stack from the members ``keep`` (their solo-form states), and pick the step's kind."""
        nonlocal base, mixed
        if keep:
            stack.load([states[i] for i in keep])
            kinds = {members[i].cfg.attention for i in keep}
            base = bases[min(kinds)]
            mixed = (square[keep],) if len(kinds) > 1 else ()  # DPA and EA in one step: a flag per member

    def save_states() -> None:
        for j, i in enumerate(active):
            states[i] = stack.member_state(j, members[i].model.cfg.vocab_size)

    def state() -> dict[str, Any]:
        """The resumable pack state (copies: training may go on after it is taken)."""
        save_states()
        return {
            "step": step,
            "members": [
                {
                    "record": dict(m.record),
                    "last": dict(m.last),
                    "cpu_s": m.cpu_s,
                    "gpu_s": m.gpu_s,
                    "done": m.done,
                    "state": states[i],
                }
                for i, m in enumerate(members)
            ],
            "data_rng": {k: s.g.get_state() for k, s in streams.items()},
            "elapsed": elapsed(),
        }

    newly_final: list[int] = []

    def finish(i: int, status: str) -> None:
        newly_final.append(i)
        m = members[i]
        m.record.update(m.last)
        m.record.update(status=status, steps=step, solved=status == "solved", **elapsed())
        m.record.update(cpu_s=m.cpu_s, gpu_s=m.gpu_s)
        m.done = True

    for i in active:  # resumed from the evaluation that solved it: nothing left to train
        if members[i].last.get("solved"):
            members[i].record["steps_to_solve"] = members[i].last["step"]
            finish(i, "solved")
    active = [i for i in active if not members[i].done]
    restack(active)
    cpu_mark, wall_mark = time.process_time(), time.perf_counter()

    while active and step < shared.max_steps:
        batches = {k: streams[k].batch(shared.batch_size) for k in {members[i].stream_key for i in active}}
        rows = [batches[members[i].stream_key] for i in active]
        inputs = torch.stack([b.inputs for b in rows]).to(device)  # (M, B, L)
        targets = torch.stack([b.targets for b in rows]).to(device)
        scored = torch.stack([b.scored for b in rows]).to(device)
        values, grads_of = gradients(
            base, stack.params, inputs, targets, scored, vocab_ok[active][:, None, None, :], *mixed
        )
        bad = [j for j, i in enumerate(active) if not math.isfinite(values[j]) or values[j] > limits[i]]
        if bad:  # diverged members leave before the update: their gradients never touch the others
            save_states()
            for j in bad:
                i = active[j]
                members[i].record["error"] = f"training loss {values[j]} at step {step} (limit {limits[i]:.1f})"
                finish(i, "diverged")
            keep = [j for j in range(len(active)) if j not in bad]
            active = [active[j] for j in keep]
            if not active:
                break
            grads = grads_of(keep)
            values = [values[j] for j in keep]
            restack(active)
        else:
            grads = grads_of(None)
        for group in clip_groups(list(grads), shared.grad_clip_mode):
            _clip_({n: grads[n] for n in group}, shared.grad_clip)
        lr = torch.tensor([lr_at(step, members[i].cfg) for i in active], device=device)
        step += 1
        _adamw_(stack, grads, lr, step, shared.weight_decay)
        now, wall_now = time.process_time(), time.perf_counter()
        for j, i in enumerate(active):
            loss_sums[i] += values[j]
            members[i].cpu_s += (now - cpu_mark) / len(active)
            members[i].gpu_s += (wall_now - wall_mark) / len(active) if device.type == "cuda" else 0.0
        cpu_mark, wall_mark = now, wall_now
        if step % shared.eval_interval == 0 or step == shared.max_steps:
            save_states()
            evaluated, finished = [], []
            n_since, last_eval = step - last_eval, step
            for i in active:
                m = members[i]
                m.model.load_state_dict(states[i]["model"])
                last = {"step": step, "train_loss": loss_sums[i] / n_since, "lr": lr_at(step - 1, m.cfg)}
                misses = int(m.last.get("confirm_misses", 0)) if m.last else 0
                last.update(evaluate_point(m.model, evals[m.stream_key], mixes[i], m.cfg, step, device, misses))
                last.update(elapsed())
                last["pack_cpu_s"] = last["cpu_s"]  # the pack's; the member's own share below
                last.update(cpu_s=m.cpu_s, gpu_s=m.gpu_s)
                m.last, loss_sums[i] = last, 0.0
                evaluated.append((i, last))
                if last["solved"]:
                    m.record["steps_to_solve"] = step
                    finish(i, "solved")
                    finished.append(i)
                elif step == shared.max_steps:
                    finish(i, "unsolved")
                    finished.append(i)
            if on_eval is not None:
                on_eval(evaluated, [(i, dict(members[i].record)) for i in newly_final], state)
            newly_final.clear()
            if finished:
                active = [i for i in active if not members[i].done]
                restack(active)
            cpu_mark, wall_mark = time.process_time(), time.perf_counter()
    for i in active:  # the budget ran out between evaluations (max_steps is always evaluated)
        finish(i, "unsolved")
    return [m.record for m in members]


def _zeros(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p) for n, p in params.items()}
