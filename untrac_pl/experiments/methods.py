"""Registry of attribution methods that a reproduction runs by name.

A config's ``methods:`` list holds :class:`MethodSpec` entries; each is dispatched by ``name`` to a
function registered here, which gets the trained θ0 in a :class:`MethodContext` and returns a
query-major :class:`~untrac_pl.scores.ScoreTable` (any units; it is compared at group level). Built in:
``untrac`` and ``untrac_inv`` (through :func:`untrac_pl.engine.run_attribution`). Names of
:mod:`untrac_pl.baselines` (``graddot``, ``gradcos``, ``tracin``, ``hif_lissa``, ``hif_arnoldi``,
``ekfac``) are dispatched to ``compute_baseline_scores`` unless something registers them itself::

    from untrac_pl.experiments.methods import register_method

    @register_method("my_method")
    def my_method(spec, ctx):        # -> ScoreTable
        ...

The function must leave ``ctx.net`` holding θ0 (the pipeline reloads θ0 after every method anyway).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.errors import UnTracError
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable


@dataclass
class MethodSpec:
    """One method of a reproduction.

    ``name``: registry key. ``label``: the name in tables and score files (default: ``name``).
    ``optimizer``/``unlearning``: the ascent (UnTrac / UnTrac-Inv). ``target_unit``: UnTrac-Inv's
    targets (``group`` = the whole test subset as one target, the paper's setting).
    ``samples_per_group``: equal-size sample of each training group (UnTrac's ascent targets,
    UnTrac-Inv's evaluation set, a baseline's training side). ``options``: extra keyword arguments
    for the method (e.g. a baseline's ``projection_dim``); for HIF, ``hessian_samples_per_group: N``
    takes the Hessian of a balanced N-per-group subset of that training side (cheaper). Baselines run
    with the model switched to eager attention (:class:`eager_attention`) and back. For ``untrac`` /
    ``untrac_inv``, ``options`` may set the engine's ``targets_per_pass`` and ``snapshot_device``
    (:class:`~untrac_pl.engine.AttributionConfig` fields). Options a built-in method does not take are
    refused when the spec is made (:class:`MethodOptionError` / ``BaselineOptionError``, naming
    ``methods[<label>].options.<key>``), never ignored.
    """

    name: str
    label: Optional[str] = None
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    unlearning: UnlearningSchedule = field(default_factory=UnlearningSchedule)
    target_unit: Literal["example", "group"] = "group"
    samples_per_group: Optional[int] = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_method_options(self)

    @property
    def key(self) -> str:
        return self.label or self.name


class MethodOptionError(UnTracError, ValueError):
    """``methods[<label>].options`` holds an option the method does not take (or a bad value)."""


# options of untrac / untrac_inv: the AttributionConfig fields that still mean something inside a
# reproduction (method, target_unit and seed come from the spec and the run; nothing is written)
UNLEARNING_OPTIONS = ("targets_per_pass", "snapshot_device")


def _options_field(spec: "MethodSpec") -> str:
    return f"methods[{spec.key}].options"


def _attribution_config(spec: "MethodSpec", seed: int, output_dir: str = "unused"):
    """The engine config of an ``untrac`` / ``untrac_inv`` spec, with its ``options`` applied."""
    from untrac_pl.engine import AttributionConfig

    options = dict(spec.options or {})
    unknown = [k for k in options if k not in UNLEARNING_OPTIONS]
    if unknown:
        raise MethodOptionError(f"{_options_field(spec)}.{unknown[0]}: {spec.name} does not take option '{unknown[0]}'; "
                                f"{spec.name} accepts: {', '.join(UNLEARNING_OPTIONS)} (the unlearning itself is set by "
                                "the spec's optimizer / unlearning / target_unit / samples_per_group)")
    try:
        return AttributionConfig(method=spec.name, target_unit=spec.target_unit, seed=seed, output_dir=output_dir, **options)
    except ValueError as exc:  # AttributionConfig names attribution.<field>; say where it was written
        raise MethodOptionError(f"{_options_field(spec)}: {exc}") from exc


def check_method_options(spec: "MethodSpec") -> None:
    """Refuse options a built-in method would not use (a registered function checks its own)."""
    if spec.name in METHOD_REGISTRY and METHOD_REGISTRY[spec.name] is not _unlearning:
        return  # a user-registered function gets spec.options as it is
    if spec.name in ("untrac", "untrac_inv"):
        _attribution_config(spec, seed=0)
        return
    try:
        from untrac_pl.baselines import METHODS as BASELINES
        from untrac_pl.baselines.options import check_options
    except ImportError:  # baselines not installed
        return
    if spec.name in BASELINES and spec.name not in METHOD_REGISTRY:
        check_options(spec.name, spec.options, where=_options_field(spec), runner=True)


@dataclass
class MethodContext:
    """What a method gets: θ0 (``net`` + ``tokenizer``), the data and the run's settings."""

    net: torch.nn.Module
    tokenizer: object
    model_spec: ModelSpec
    train_records: list[dict]
    query_records: list[dict]
    seed: int
    max_length: int
    eval_batch_size: int = 32
    trainer_kwargs: dict = field(default_factory=dict)
    checkpoints: list = field(default_factory=list)  # [(weights path, lr), ...] of θ0's training run


MethodFn = Callable[[MethodSpec, MethodContext], ScoreTable]
METHOD_REGISTRY: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    def decorate(fn: MethodFn) -> MethodFn:
        METHOD_REGISTRY[name] = fn
        return fn

    return decorate


def run_method(spec: MethodSpec, ctx: MethodContext) -> ScoreTable:
    fn = METHOD_REGISTRY.get(spec.name)
    if fn is None:
        try:
            from untrac_pl.baselines import METHODS as BASELINES
        except ImportError:  # baselines not installed
            BASELINES = ()
        if spec.name in BASELINES:
            fn = _baseline
        else:
            raise ValueError(f"unknown method '{spec.name}'; registered: {sorted(METHOD_REGISTRY)} (+ baselines)")
    table = fn(spec, ctx)
    table.method = spec.key
    return table


def _unlearning(spec: MethodSpec, ctx: MethodContext) -> ScoreTable:
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.engine import run_attribution
    from untrac_pl.unlearning import UnTracModule

    module = UnTracModule(model=ctx.model_spec, optimizer=spec.optimizer, unlearning=spec.unlearning)
    module.attach(ctx.net, ctx.tokenizer)
    datamodule = AttributionDataModule.from_records(
        ctx.train_records,
        ctx.query_records,
        max_length=ctx.max_length,
        samples_per_group=spec.samples_per_group,
        sample_seed=ctx.seed,
        eval_batch_size=ctx.eval_batch_size,
    )
    config = _attribution_config(spec, seed=ctx.seed)  # spec.options: targets_per_pass, snapshot_device
    kwargs = {**ctx.trainer_kwargs, "logger": False, "enable_progress_bar": False}
    result = run_attribution(module, datamodule, config, kwargs, write=False)
    if result.failed:
        raise FloatingPointError(f"{spec.key}: targets failed: {result.failed}")
    return result.table


register_method("untrac")(_unlearning)
register_method("untrac_inv")(_unlearning)


def _baseline(spec: MethodSpec, ctx: MethodContext) -> ScoreTable:
    """Any :mod:`untrac_pl.baselines` method on θ0, scored at group level (training group × test subset)."""
    from untrac_pl.baselines import compute_baseline_scores
    from untrac_pl.data.tokenize import sample_per_group, tokenize_records

    train = sample_per_group(ctx.train_records, spec.samples_per_group, ctx.seed)
    train_corpus = tokenize_records(train, ctx.tokenizer, ctx.max_length, "training data")
    query_corpus = tokenize_records(ctx.query_records, ctx.tokenizer, ctx.max_length, "queries")
    from untrac_pl.baselines.options import check_options

    options = check_options(spec.name, spec.options, where=_options_field(spec), runner=True)
    options.setdefault("pad_token_id", ctx.tokenizer.pad_token_id)
    if spec.name == "tracin":
        options.setdefault("checkpoints", list(ctx.checkpoints))
    hessian_n = options.pop("hessian_samples_per_group", None)
    if hessian_n is not None and "hessian_batches" not in options:
        # a balanced subset of the training side defines the Hessian (HIF): keeps LiSSA/Arnoldi cheap
        hess = sample_per_group(train, int(hessian_n), ctx.seed + 1)
        options["hessian_batches"] = tokenize_records(hess, ctx.tokenizer, ctx.max_length, "Hessian data").examples
    with eager_attention(ctx.net):
        out = compute_baseline_scores(
            spec.name, ctx.net, train_corpus.examples, query_corpus.examples,
            train_groups=[r["group"] for r in train], query_groups=[r["group"] for r in ctx.query_records],
            **options,
        )
    rows = [str(r) for r in out["query_groups"]]  # out["group_rows"]/["group_cols"] name the units, not the groups
    cols = [str(c) for c in out["train_groups"]]
    return ScoreTable(out["group_scores"].float().cpu(), rows, rows, cols, cols, "group", "group", spec.key, {"info": out.get("info", {})})


class eager_attention:
    """Switch a Hugging Face model to ``eager`` attention for the block (``vmap`` per-example gradients
    need it; SDPA's mask helpers branch on data) and back afterwards. Numerically the same function."""

    def __init__(self, net):
        self.net, self.previous = net, None

    def __enter__(self):
        config = getattr(self.net, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if config is not None and current not in (None, "eager") and hasattr(self.net, "set_attn_implementation"):
            try:
                self.net.set_attn_implementation("eager")
                self.previous = current
            except Exception:  # noqa: BLE001 - keep the model as it is; the baselines fall back to a loop
                self.previous = None
        return self.net

    def __exit__(self, *exc):
        if self.previous is not None:
            self.net.set_attn_implementation(self.previous)
