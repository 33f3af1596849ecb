"""The study specification: one pydantic model for the CLI, the API and the driver.

A spec names what to compare (attention kinds), where (task points: an ordered ladder
of rungs or an N x T grid, with multi-task mixtures), at which model sizes, with what
budget and search. Every invalid value is rejected with the field and the rule.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from workers.attention import ATTENTION_KINDS
from workers.evaluation import ceiling_problem, pool_problem, sequences_per_member
from workers.model import POSITIONAL, QKV_INIT_STD
from workers.tasks import HOLDOUTS, TASK_FAMILIES, TaskMix

SPEC_VERSION = 1
# libyaml when present: fast, and it caps nesting depth (the pure-Python parser is slow and recursive)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Upper bounds on every size a spec can ask for, checked before anything is expanded: a spec of
# a few bytes must not make the service (or a driver) build millions of points or sizes.
MAX_N = 100_000  # modulus (vocabulary size)
MAX_T = 512  # look-back
MAX_D_MODEL = 8192
MAX_LAYERS = 128
MAX_HEADS = 128
MAX_BATCH = 8192
MAX_STEPS = 10_000_000  # training steps (and eval interval, warm-up, ASHA grace period)
MAX_EVAL_SEQUENCES = 1_000_000
MAX_AXIS = 64  # entries in one axis: sizes, d_model/n_layers/n_heads, ladder rungs, grid N and T, lr values, seeds
MAX_MEMBERS = 16  # members of one multi-task point
MAX_SIZES = 256  # model sizes after the product of the axes
MAX_POINTS = 1024  # task points after the product of grid N and T
MAX_GRID = 100_000  # sizes x points x lr values: what a search chooses from
MAX_TRIALS = 100_000  # caps.max_trials and search.n_trials

PosInt = Annotated[int, Field(ge=1)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
NValue = Annotated[int, Field(ge=2, le=MAX_N, description=f"N, the modulus (2..{MAX_N})")]
TValue = Annotated[int, Field(ge=1, le=MAX_T, description=f"T, the look-back (1..{MAX_T})")]
Member = tuple[NValue, TValue]


def _axis(**kw: Any) -> Any:
    return Field(max_length=MAX_AXIS, **kw)


def _field_error(loc: tuple[str, ...], value: Any, msg: str) -> ValidationError:
    """A cross-field error reported at the field it is about (pydantic keeps this loc)."""
    detail = InitErrorDetails(type=PydanticCustomError("value_error", msg), loc=loc, input=value)
    return ValidationError.from_exception_data("StudySpec", [detail])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSize(_Strict):
    """One model size."""

    d_model: Annotated[int, Field(ge=1, le=MAX_D_MODEL)]
    n_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    n_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSize:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads (d_model={self.d_model}, n_heads={self.n_heads})")
        return self

    @property
    def name(self) -> str:
        return f"d{self.d_model}_l{self.n_layers}_h{self.n_heads}"


class ModelAxes(_Strict):
    """Model sizes as explicit ``sizes`` or as the product of the three axes."""

    sizes: list[ModelSize] | None = _axis(default=None)
    d_model: list[Annotated[int, Field(ge=1, le=MAX_D_MODEL)]] | None = _axis(default=None)
    n_layers: list[Annotated[int, Field(ge=1, le=MAX_LAYERS)]] | None = _axis(default=None)
    n_heads: list[Annotated[int, Field(ge=1, le=MAX_HEADS)]] | None = _axis(default=None)
    monotone_in_size: bool = Field(
        default=False,
        description="a bigger model should not solve less: the report fits P(solved) monotone in size too "
        "(violations are findings either way)",
    )

    @model_validator(mode="after")
    def _one_form(self) -> ModelAxes:
        axes = (self.d_model, self.n_layers, self.n_heads)
        if self.sizes is not None and any(a is not None for a in axes):
            raise ValueError("give either sizes or the d_model/n_layers/n_heads axes, not both")
        if self.sizes is None and any(a is None for a in axes):
            raise ValueError("give sizes, or all three axes d_model, n_layers and n_heads")
        if self.sizes is not None and not self.sizes:
            raise ValueError("sizes must not be empty")
        for name in ("d_model", "n_layers", "n_heads"):
            vals = getattr(self, name)
            if vals is not None and not vals:
                raise ValueError(f"{name} axis must not be empty")
        if self.count() > MAX_SIZES:  # counted, not built
            raise ValueError(f"the axes give {self.count()} model sizes, more than {MAX_SIZES}")
        names = [s.name for s in self.all_sizes()]  # every combination must be valid
        if len(set(names)) != len(names):
            raise ValueError(f"model sizes must be distinct, got {names}")
        return self

    def count(self) -> int:
        """How many sizes (without building them)."""
        if self.sizes is not None:
            return len(self.sizes)
        return len(self.d_model or []) * len(self.n_layers or []) * len(self.n_heads or [])

    def all_sizes(self) -> list[ModelSize]:
        if self.sizes is not None:
            return list(self.sizes)
        assert self.d_model and self.n_layers and self.n_heads  # checked by the validator
        return [ModelSize(d_model=d, n_layers=n, n_heads=h) for d, n, h in itertools.product(*self._axes())]

    def _axes(self) -> tuple[list[int], list[int], list[int]]:
        return list(self.d_model or []), list(self.n_layers or []), list(self.n_heads or [])


class Grid(_Strict):
    """An N x T grid; a T entry that is a list is a multi-task set of look-backs."""

    N: list[NValue] = _axis(min_length=1)
    T: list[TValue | Annotated[list[TValue], Field(max_length=MAX_MEMBERS)]] = _axis(min_length=1)


class TaskAxes(_Strict):
    family: Literal["nt"] = "nt"
    ladder: list[Annotated[list[Member], Field(max_length=MAX_MEMBERS)]] | None = _axis(
        default=None, description="ordered rungs, easiest first; a rung with several [N, T] members is multi-task"
    )
    grid: Grid | None = None
    identify_margin: Annotated[int, Field(ge=0)] = 2
    context_margin: PosInt = Field(default=4, description="scored positions required beyond each point's prefix")

    @model_validator(mode="after")
    def _one_form(self) -> TaskAxes:
        if (self.ladder is None) == (self.grid is None):
            raise ValueError("give exactly one of ladder or grid")
        if self.ladder is not None and not self.ladder:
            raise ValueError("ladder must not be empty")
        for i, rung in enumerate(self.ladder or []):
            if not rung:
                raise ValueError(f"ladder[{i}] must have at least one [N, T] member")
            if len(set(rung)) != len(rung):
                raise ValueError(f"ladder[{i}] repeats a member: {rung}")
        for t in self.grid.T if self.grid else []:
            if isinstance(t, list) and (not t or len(set(t)) != len(t)):
                raise ValueError(f"grid.T set {t} must be non-empty with distinct values")
        if self.count() > MAX_POINTS:  # counted, not built
            raise ValueError(f"the grid gives {self.count()} task points, more than {MAX_POINTS}")
        points = self.points()
        keys = [frozenset(p.members) for p in points]  # a mixture is a set: member order does not matter
        if len(set(keys)) != len(keys):
            raise ValueError(f"task points must be distinct, got {[p.name for p in points]}")
        return self

    def count(self) -> int:
        """How many task points (without building them)."""
        if self.ladder is not None:
            return len(self.ladder)
        return len(self.grid.N) * len(self.grid.T) if self.grid else 0

    def points(self) -> list[Point]:
        """Every task point with its coordinates (ladder: rung index; grid: axis indices)."""
        if self.ladder is not None:
            return [Point(members=[(n, t) for n, t in rung], coords=(i,)) for i, rung in enumerate(self.ladder)]
        assert self.grid is not None
        out = []
        for i, n in enumerate(self.grid.N):
            for j, t in enumerate(self.grid.T):
                ts = t if isinstance(t, list) else [t]
                out.append(Point(members=[(n, x) for x in ts], coords=(i, j)))
        return out

    @property
    def axes(self) -> list[str]:
        return ["rung"] if self.ladder is not None else ["N", "T"]


class Point(_Strict):
    """A task point: its members and its coordinates on the study's complexity axes."""

    members: list[tuple[int, int]]
    coords: tuple[int, ...]

    @property
    def name(self) -> str:
        return "+".join(f"N{n}_T{t}" for n, t in self.members)

    def mix(self, identify_margin: int) -> TaskMix:
        return TASK_FAMILIES["nt"](self.members, identify_margin)


class FloatParam(_Strict):
    """A float hyper-parameter: fixed ``values`` (grid) or a ``low``..``high`` range (searched)."""

    values: list[Annotated[float, Field(gt=0)]] | None = _axis(default=None)
    low: Annotated[float, Field(gt=0)] | None = None
    high: Annotated[float, Field(gt=0)] | None = None
    log: bool = True

    @model_validator(mode="after")
    def _one_form(self) -> FloatParam:
        has_range = self.low is not None or self.high is not None
        if (self.values is not None and has_range) or (self.values is None and (self.low is None or self.high is None)):
            raise ValueError("give either values or both low and high")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError(f"values must be distinct, got {self.values}")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low must be < high (low={self.low}, high={self.high})")
        return self

    def grid_values(self) -> list[float]:
        """The grid's values; a range gives its geometric (or arithmetic) midpoint."""
        if self.values is not None:
            return list(self.values)
        assert self.low is not None and self.high is not None
        return [(self.low * self.high) ** 0.5 if self.log else (self.low + self.high) / 2]


class HyperParams(_Strict):
    lr: FloatParam = FloatParam(values=[3e-3])
    selection_seeds: PosInt = Field(
        default=1,
        description="with several lr values, the first this-many seeds choose each cell's lr and the other seeds "
        "score it, so the choice never inflates the success rate (too few seeds: the first lr is used)",
    )


class Training(_Strict):
    max_steps: Steps = 1000
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 64
    eval_interval: Steps = 100
    eval_sequences: Annotated[int, Field(ge=1, le=MAX_EVAL_SEQUENCES)] | None = Field(
        default=None,
        description="at least this many eval sequences per member in each of sets A and B; by default (and "
        "at least) as many as the threshold's resolution needs (docs/evaluation.md)",
    )
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 50
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    context_length: Annotated[int, Field(ge=2, le=4096)] = 16

    @model_validator(mode="after")
    def _eval_fits(self) -> Training:
        if self.eval_interval > self.max_steps:
            raise ValueError(f"eval_interval must be <= max_steps ({self.eval_interval} > {self.max_steps})")
        return self


class Evaluation(_Strict):
    """How trials are evaluated (docs/evaluation.md)."""

    holdout: str = Field(
        default="fresh",
        description="fresh: eval sets drawn from the task's whole distribution; orbit: whole orbits of the "
        "step map held out of training (single-member points with an enumerable state space)",
    )

    @field_validator("holdout")
    @classmethod
    def _known_holdout(cls, v: str) -> str:
        if v not in HOLDOUTS:
            raise ValueError(f"unknown holdout {v!r}; known: {list(HOLDOUTS)}")
        return v


class KindSettings(_Strict):
    """Settings of one attention kind that decide its start (docs/evaluation.md, "Fair start")."""

    lr_scale: Annotated[float, Field(gt=0, le=1000)] = Field(
        default=1.0, description="this kind's learning rates are hparams.lr times this (its own lr space)"
    )
    qkv_init_std: Annotated[float, Field(gt=0, le=1)] = Field(
        default=QKV_INIT_STD, description="init std of the q/k/v projection: the size of the scores at init"
    )
    temperature: Annotated[float, Field(gt=0, le=1000)] = Field(
        default=1.0, description="scores are q.k / (sqrt(d_head) * temperature)"
    )
    learn_temperature: bool = Field(default=False, description="one learned temperature per head, from the above")


class Fairness(_Strict):
    """Settings that decide whether the kinds start on an equal footing; recorded with every trial."""

    kinds: dict[str, KindSettings] = Field(default_factory=dict, description="per attention kind; absent: defaults")
    positional: str = Field(default="learned", description=f"positional encoding: one of {list(POSITIONAL)}")
    grad_clip_mode: Literal["global", "split"] = Field(
        default="global",
        description="global: one norm over all gradients; split: the q/k/v projections clipped apart from the rest",
    )

    @field_validator("positional")
    @classmethod
    def _known_positional(cls, v: str) -> str:
        if v not in POSITIONAL:
            raise ValueError(f"unknown positional encoding {v!r}; known: {list(POSITIONAL)}")
        return v

    def kind(self, name: str) -> KindSettings:
        return self.kinds.get(name, KindSettings())


class Search(_Strict):
    method: Literal["grid", "optuna", "frontier"] = "grid"
    n_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = Field(
        default=None, description="optuna: configurations sampled (each run per kind)"
    )
    sampler_seed: int = 0
    objective: Literal["frontier", "margin"] = Field(
        default="frontier",
        description="optuna: 'frontier' maximises, per kind, the highest rung solved at a pick (its rung when at "
        "least half its seeds solve it, else accuracy - 1), with fewer parameters preferred, so the Pareto front is "
        "the highest rung per kind and size; 'margin' maximises the second kind's paired success over the first's",
    )

    @model_validator(mode="after")
    def _optuna_needs_trials(self) -> Search:
        if self.method == "optuna" and self.n_trials is None:
            raise ValueError("n_trials is required when method is 'optuna'")
        return self


class EarlyStopping(_Strict):
    asha: bool = False
    grace_period: Steps = 200
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0


class Resources(_Strict):
    cpu: Annotated[float, Field(gt=0, le=256)] = 1.0
    gpu: Annotated[float, Field(ge=0, le=8)] = 0.0


class Caps(_Strict):
    max_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 500
    max_cpu_hours: Annotated[float, Field(gt=0)] | None = None


class Execution(_Strict):
    """How trials run: packed (many trials of one shape as one vectorised model per worker) or one per worker."""

    pack: Literal["auto", "off"] | PosInt = Field(
        default="auto",
        description="auto: pack trials of one kind and model size (a searcher's DPA and EA twins may share a pack; "
        "grid and frontier: at most 32 a pack, a grid "
        "in at least max_concurrent packs; optuna: small enough for 4 rounds of picks); off: one trial per "
        "worker; a number: at most that many trials a pack",
    )
    checkpoint_every: PosInt = Field(
        default=1, description="packs: checkpoint every this many evaluations (and whenever a member finishes)"
    )


class StudySpec(_Strict):
    """A Ladder study: DPA vs EA (or any kinds) across model sizes and task complexity."""

    spec_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = Field(default="", max_length=2000)
    attention: list[str] = _axis(default_factory=lambda: ["dpa", "ea"], min_length=1)
    eps: Annotated[float, Field(gt=0, lt=1)] = Field(default=1e-6, description="ea_norm's eps")
    task: TaskAxes
    model: ModelAxes
    training: Training = Training()
    hparams: HyperParams = HyperParams()
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = _axis(default_factory=lambda: [0], min_length=1)
    search: Search = Search()
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.99
    evaluation: Evaluation = Evaluation()
    fairness: Fairness = Fairness()
    resources: Resources = Resources()
    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = 2
    early_stopping: EarlyStopping = EarlyStopping()
    caps: Caps = Caps()
    execution: Execution = Execution()

    @field_validator("attention")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        unknown = [k for k in v if k not in ATTENTION_KINDS]
        if unknown:
            raise ValueError(f"unknown attention kind(s) {unknown}; registered kinds: {list(ATTENTION_KINDS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"attention kinds must be distinct, got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        grid = self.model.count() * self.task.count() * len(self.hparams.lr.grid_values())
        if grid > MAX_GRID:  # what grid search runs and what optuna and frontier search choose from
            raise _field_error(
                ("task",),
                self.task.count(),
                f"{self.model.count()} sizes x {self.task.count()} task points x "
                f"{len(self.hparams.lr.grid_values())} lr values = {grid} configurations, more than {MAX_GRID}",
            )
        n = self.planned_trials()
        if n > self.caps.max_trials:
            raise _field_error(
                ("caps", "max_trials"),
                self.caps.max_trials,
                f"the study plans {n} trials, more than caps.max_trials={self.caps.max_trials}; "
                "shrink the axes or raise the cap",
            )
        ctx = self.training.context_length
        for p in self.task.points():
            need = p.mix(self.task.identify_margin).score_start + self.task.context_margin
            if ctx < need:
                raise _field_error(
                    ("training", "context_length"),
                    ctx,
                    f"training.context_length={ctx} is too short for task point {p.name}: it needs >= {need} "
                    f"(prefix plus context_margin={self.task.context_margin} scored positions)",
                )
        self._check_evaluation()
        self._check_fairness()
        if self.early_stopping.asha:
            self._check_asha()
        if isinstance(self.execution.pack, int) and self.execution.pack > 1 and self.early_stopping.asha:
            raise _field_error(
                ("execution", "pack"),
                self.execution.pack,
                "execution.pack cannot pack trials that early_stopping.asha cuts one by one; "
                "use pack: off (or auto, which runs ASHA studies unpacked)",
            )
        if self.early_stopping.asha and self.early_stopping.grace_period > self.training.max_steps:
            raise _field_error(
                ("early_stopping", "grace_period"),
                self.early_stopping.grace_period,
                "early_stopping.grace_period must be <= training.max_steps",
            )
        return self

    def _check_evaluation(self) -> None:
        """Refuse points whose held-out pool cannot give the threshold's resolution, and mixtures whose
        members are too often indistinguishable to ever reach the threshold."""
        ctx, holdout, minimum = self.training.context_length, self.evaluation.holdout, self.training.eval_sequences
        for p in self.task.points():
            mix = p.mix(self.task.identify_margin)
            problem = pool_problem(mix, ctx, self.threshold, holdout, minimum or 0)
            if problem:
                at = (
                    ("training", "eval_sequences")
                    if minimum and minimum > sequences_per_member(mix, ctx, self.threshold)
                    else ("evaluation", "holdout")
                )
                raise _field_error(at, minimum if at[0] == "training" else holdout, problem)
            problem = ceiling_problem(mix, ctx, self.threshold)
            if problem:
                raise _field_error(("threshold",), self.threshold, problem)

    def _check_asha(self) -> None:
        """ASHA ranks every trial at a rung against all others: sound only within one cell.

        Across kinds it would cut one twin of a pair and not the other; across sizes or points it
        would rank accuracies that measure different things. So a study with ASHA holds one kind,
        one size and one point (it then chooses among learning rates and seeds); a stopped trial
        is censored, never unsolved (studies/records.py).
        """
        cells = {
            "attention kinds": len(self.attention),
            "model sizes": len(self.model.all_sizes()),
            "task points": len(self.task.points()),
        }
        many = {k: v for k, v in cells.items() if v > 1}
        if many:
            found = ", ".join(f"{v} {k}" for k, v in many.items())
            raise _field_error(
                ("early_stopping", "asha"),
                True,
                f"early_stopping.asha ranks trials against each other, so it is allowed only within one cell "
                f"(one attention kind, one model size, one task point); this study has {found}. Turn ASHA off "
                "(trials still stop when solved) or run one study per cell",
            )

    def _check_fairness(self) -> None:
        extra = sorted(set(self.fairness.kinds) - set(self.attention))
        if extra:
            raise _field_error(
                ("fairness", "kinds"),
                extra,
                f"fairness.kinds names kinds the study does not run: {extra}; attention is {self.attention}",
            )
        if self.fairness.positional == "rotary":
            odd = [s.name for s in self.model.all_sizes() if (s.d_model // s.n_heads) % 2]
            if odd:
                raise _field_error(
                    ("fairness", "positional"),
                    "rotary",
                    f"rotary positions need an even head size (d_model / n_heads); odd in {odd}",
                )

    def planned_trials(self) -> int:
        """Trials the study runs at most (grid and frontier: the full grid; optuna: n_trials per kind)."""
        per_kind = len(self.seeds) * (
            self.search.n_trials
            if self.search.method == "optuna" and self.search.n_trials
            else self.model.count() * self.task.count() * len(self.hparams.lr.grid_values())
        )
        return per_kind * len(self.attention)

    # --- I/O ---------------------------------------------------------------------------

    @staticmethod
    def parse_text(text: str) -> Any:
        """Plain data from YAML or JSON text; anchors and aliases are refused (no expansion bombs)."""
        try:
            return json.loads(text)  # JSON first: not all JSON is YAML (tab indentation)
        except (ValueError, RecursionError):  # too deep for json: libyaml refuses it with a YAMLError
            pass
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise ValueError("YAML aliases are not allowed in a study spec")
        return yaml.load(text, Loader=_YAML_LOADER)  # a safe loader (C or Python)

    @classmethod
    def from_text(cls, text: str) -> StudySpec:
        """Parse and validate YAML or JSON text (JSON is YAML)."""
        try:
            data = cls.parse_text(text)
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML or JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("a study spec must be a mapping (YAML or JSON object)")
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> StudySpec:
        return cls.from_text(Path(path).read_text())

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of the study spec."""
    schema = StudySpec.model_json_schema()
    schema["$id"] = f"https://ladder.dev/schema/study/v{SPEC_VERSION}.json"
    return schema
