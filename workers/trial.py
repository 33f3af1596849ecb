"""One trial: train one model on one task point, evaluate on held-out sequences.

Usable standalone (no Ray): ``run_trial(TrialConfig(...))``. It streams metrics through
``on_eval`` at every evaluation, stops as soon as the point is solved (set A, confirmed on
set B: workers/evaluation.py), and tells solved, unsolved, diverged, out-of-memory and
failed trials apart.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from workers.evaluation import EvalSets, build_eval_sets, is_solved, score
from workers.model import QKV_INIT_STD, ModelConfig, Transformer
from workers.tasks import GENERATOR_VERSION, Batch, NTStream, TaskMix, nt_family

log = logging.getLogger(__name__)

STATUSES = ("solved", "unsolved", "diverged", "oom", "failed")
DIVERGENCE_FACTOR = 100.0  # loss above this many times the uniform-guess loss is divergence


@dataclass
class TrialConfig:
    """Everything that decides a trial's outcome; recorded with every trial."""

    attention: str = "dpa"
    task: list[list[int]] = field(default_factory=lambda: [[5, 1]])  # members as [N, T]
    identify_margin: int = 2
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    context_length: int = 16
    eps: float = 1e-6
    qkv_init_std: float = QKV_INIT_STD
    temperature: float = 1.0
    learn_temperature: bool = False
    positional: str = "learned"
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_clip_mode: str = "global"  # a key of CLIP_MODES
    batch_size: int = 64
    max_steps: int = 2000
    eval_interval: int = 100
    eval_sequences: int = 0  # at least this many per member per set; the threshold sizes the sets
    holdout: str = "fresh"  # what the eval sets are held out from (workers/tasks.py HOLDOUTS)
    threshold: float = 0.99
    seed: int = 0
    device: str = "auto"

    def mix(self) -> TaskMix:
        return nt_family([(n, t) for n, t in self.task], self.identify_margin)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.mix().vocab_size,
            context_length=self.context_length,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            attention=self.attention,
            eps=self.eps,
            qkv_init_std=self.qkv_init_std,
            temperature=self.temperature,
            learn_temperature=self.learn_temperature,
            positional=self.positional,
        )


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """The resolved trial config from a Tune config (``cell`` varies, ``fixed`` does not).

    Here, not with the driver's callbacks: a trial worker imports only what training needs
    (the callbacks pull in the report and scipy, about 1 s per worker start).
    """
    cell, fixed = config["cell"], dict(config["fixed"])
    kind = dict(fixed.pop("kinds", {}).get(cell["kind"], {}))  # per-kind settings (spec fairness.kinds)
    scale = kind.pop("lr_scale", 1.0)
    return TrialConfig(
        attention=cell["kind"],
        task=cell["members"],
        d_model=cell["size"]["d_model"],
        n_layers=cell["size"]["n_layers"],
        n_heads=cell["size"]["n_heads"],
        lr=cell["lr"] * scale,
        seed=cell["seed"],
        **fixed,
        **kind,
    )


Reporter = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def lr_at(step: int, cfg: TrialConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _attention_param(name: str) -> bool:
    """Parameters that make the attention scores: the q/k/v projection and a learned temperature."""
    return ".attn.qkv." in name or name.endswith("log_temperature")


def _one_group(name: str) -> str:
    return "all"


def _score_apart(name: str) -> str:
    return "attention" if _attention_param(name) else "rest"


# How gradients are grouped for clipping: each group is scaled to norm <= grad_clip on its own. "split"
# clips the attention-score parameters apart, so a large score gradient shrinks no other update.
CLIP_MODES: dict[str, Callable[[str], str]] = {"global": _one_group, "split": _score_apart}


def clip_groups(names: list[str], mode: str) -> list[list[str]]:
    """Parameter names grouped for clipping under ``mode`` (every trainer clips by these groups)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(CLIP_MODES[mode](n), []).append(n)
    return list(groups.values())


def _masked_loss(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[scored], targets[scored])


EVAL_CHUNK = 2048  # sequences per forward pass at evaluation


@torch.no_grad()
def evaluate(model: Transformer, data: Batch, names: list[str], role: str, device: torch.device) -> dict[str, float]:
    """``workers.evaluation.score`` of the model's logits on one eval set (forward in chunks)."""
    model.eval()
    logits = torch.cat([model(x.to(device)) for x in data.inputs.split(EVAL_CHUNK)])
    model.train()
    return score(logits, data, names, role)


def evaluate_point(
    model: Transformer, sets: EvalSets, mix: TaskMix, cfg: TrialConfig, step: int, device: torch.device, misses: int
) -> dict[str, Any]:
    """One evaluation, as every trainer does it (docs/evaluation.md).

    Set A is scored; set B when A says solved, or at the last step so that every record comes from B.
    ``solved`` needs both; ``confirm_misses`` counts the solves on A that B did not confirm (``misses``
    before this one).
    """
    names = [t.name for t in mix.members]
    out = evaluate(model, sets.search, names, "search", device)
    found = is_solved(out, names, cfg.threshold, "search")
    if found or step == cfg.max_steps:
        out.update(evaluate(model, sets.confirm, names, "eval", device))
    out["solved"] = found and is_solved(out, names, cfg.threshold, "eval")
    out["confirm_misses"] = misses + (found and not out["solved"])
    return out


def run_trial(
    cfg: TrialConfig, on_eval: Reporter | None = None, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one model on one task point and return its final record.

    Args:
        cfg: the trial's full configuration.
        on_eval: called after every evaluation with the metrics and a function that
            returns a resumable state (for checkpoints).
        resume: a state from ``on_eval``'s function; training continues from it exactly.

    Returns:
        The record: status, eval accuracy (overall and per task), losses, steps-to-solve,
        wall/CPU/GPU seconds, parameter count, the resolved config and the generator version.
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    device = pick_device(cfg.device)
    record: dict[str, Any] = {
        "status": "failed",
        "steps": 0,
        "steps_to_solve": None,
        "config": asdict(cfg),
        "generator_version": GENERATOR_VERSION,
        "device": str(device),
        "error": None,
    }
    prior = resume["elapsed"] if resume else {"wall_s": 0.0, "cpu_s": 0.0}

    def elapsed() -> dict[str, float]:
        wall = prior["wall_s"] + time.perf_counter() - wall0
        cpu = prior["cpu_s"] + time.process_time() - cpu0
        return {"wall_s": wall, "cpu_s": cpu, "gpu_s": wall if device.type == "cuda" else 0.0}

    try:
        mix = cfg.mix()
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model_config()).to(device)
        record["n_params"] = model.num_parameters()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        train = NTStream(mix, cfg.context_length, cfg.seed, cfg.holdout)
        sets = build_eval_sets(mix, cfg.context_length, cfg.seed, cfg.threshold, cfg.holdout, cfg.eval_sequences)
        record.update(sets.info())
        limit = DIVERGENCE_FACTOR * math.log(mix.vocab_size)
        named = dict(model.named_parameters())
        clipped = [[named[n] for n in g] for g in clip_groups(list(named), cfg.grad_clip_mode)]
        step = 0
        last: dict[str, Any] = {}
        if resume:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            train.g.set_state(resume["data_rng"])
            step, last = resume["step"], resume["last"]

        def state() -> dict[str, Any]:
            """The resumable state; it references live tensors, so save it before training goes on."""
            return {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "data_rng": train.g.get_state(),
                "step": step,
                "last": last,
                "elapsed": elapsed(),
            }

        status, loss_sum, loss_n = "unsolved", 0.0, 0
        if last.get("solved"):  # resumed from the evaluation that solved it: nothing left to train
            status, record["steps_to_solve"] = "solved", last["step"]
        while status == "unsolved" and step < cfg.max_steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            b = train.batch(cfg.batch_size)
            logits = model(b.inputs.to(device))
            loss = _masked_loss(logits, b.targets.to(device), b.scored.to(device))
            value = float(loss.detach())
            if not math.isfinite(value) or value > limit:
                status = "diverged"
                record["error"] = f"training loss {value} at step {step} (limit {limit:.1f})"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for params in clipped:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            loss_sum, loss_n = loss_sum + value, loss_n + 1
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                misses = int(last.get("confirm_misses", 0))
                last = {"step": step, "train_loss": loss_sum / loss_n, "lr": lr_at(step - 1, cfg)}
                last.update(evaluate_point(model, sets, mix, cfg, step, device, misses))
                last.update(elapsed())
                loss_sum, loss_n = 0.0, 0
                if on_eval is not None:
                    on_eval(last, state)
                if last["solved"]:
                    status = "solved"
                    record["steps_to_solve"] = step
                    break
        record.update(last)
        record["status"], record["steps"] = status, step
    except torch.OutOfMemoryError as e:
        record.update(status="oom", error=f"out of memory: {e}")
    except MemoryError as e:
        record.update(status="oom", error=f"out of memory: {e!r}")
    except Exception as e:  # a failed trial is a record, not a crash of the study
        log.exception("trial failed")
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
    record["solved"] = record["status"] == "solved"
    record.update(elapsed())
    return record
