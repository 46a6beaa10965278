"""The methods of a reproduction: ``methods:`` entries, dispatched through the method registry.

A config's ``methods:`` list holds :class:`MethodSpec` entries; :func:`run_method` looks each ``name``
up in :mod:`untrac_pl.methods` and asks the method for a query-major
:class:`~untrac_pl.scores.ScoreTable` on the trained θ0 (given in a :class:`MethodContext`); the table
is compared with the ground truth at group level. A new method is registered once
(:func:`untrac_pl.methods.register`) and is then available here, in ``untrac-pl attribute`` and in
the Python API alike. A method must leave ``ctx.net`` holding θ0 (the pipeline reloads θ0 after
every method anyway).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import torch

from untrac_pl.config import AttributionConfig
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import run_attribution
from untrac_pl.errors import MethodOptionError
from untrac_pl.methods import DEFAULT_TARGET_UNIT, check_options, get_method
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import UnTracModule

__all__ = ["MethodContext", "MethodData", "MethodOptionError", "MethodSpec", "run_method"]


@dataclass
class MethodData:
    """A method's data options in a reproduction: the fields of ``untrac-pl attribute``'s ``data`` section
    that can differ between methods (:class:`~untrac_pl.data.datamodule.AttributionDataModule`).

    Args:
        samples_per_group: equal-size seeded sample of each training group (paper: 10,000 per corpus for UnTrac).
        query_samples_per_group: the same for the query subsets.
    """

    samples_per_group: Optional[int] = None
    query_samples_per_group: Optional[int] = None


@dataclass
class MethodSpec:
    """One method of a reproduction.

    ``name``: a registered method (aliases and hyphens work). ``label``: the name in tables and score
    files (default: ``name``). ``optimizer``/``unlearning``: the ascent (UnTrac / UnTrac-Inv).
    ``target_unit``: UnTrac-Inv's targets (``group`` = the whole test subset as one target, the
    paper's setting; the default is the project's one default, ``example``, as in ``untrac-pl
    attribute``). ``data``: the method's data options, the same fields as ``untrac-pl attribute``'s
    ``data.samples_per_group`` / ``data.query_samples_per_group`` (an equal-size sample of each
    training group: UnTrac's ascent targets, UnTrac-Inv's evaluation set, a baseline's training side;
    methods differ in the paper). ``options``: the method's
    options (its ``Options`` fields; for UnTrac / UnTrac-Inv ``targets_per_pass`` and
    ``snapshot_device``, for HIF e.g. ``hessian_samples_per_group: N``, the Hessian of a balanced
    N-per-group subset). Options a method does not take are refused when the spec is made
    (:class:`~untrac_pl.errors.MethodOptionError`, naming ``methods[<label>].options.<key>``).
    """

    name: str
    label: Optional[str] = None
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    unlearning: UnlearningSchedule = field(default_factory=UnlearningSchedule)
    target_unit: Literal["example", "group"] = DEFAULT_TARGET_UNIT
    data: MethodData = field(default_factory=lambda: MethodData())
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = MethodData(**self.data)
        self.name = get_method(self.name).name
        check_options(self.name, self.options, where=f"methods[{self.key}].options", runner=True)

    @property
    def key(self) -> str:
        return self.label or self.name


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

    def unlearn(self, spec: MethodSpec) -> ScoreTable:
        """``spec`` (UnTrac / UnTrac-Inv) on θ0 through the run shell, nothing written."""
        module = UnTracModule(model=self.model_spec, optimizer=spec.optimizer, unlearning=spec.unlearning)
        module.attach(self.net, self.tokenizer)
        datamodule = AttributionDataModule.from_records(
            self.train_records, self.query_records, max_length=self.max_length, sample_seed=self.seed,
            eval_batch_size=self.eval_batch_size, **asdict(spec.data),
        )
        try:
            config = AttributionConfig(method=spec.name, target_unit=spec.target_unit, seed=self.seed, **dict(spec.options or {}))
        except ValueError as exc:  # AttributionConfig names attribution.<field>; say where it was written
            raise MethodOptionError(f"methods[{spec.key}].options: {exc}") from exc
        kwargs = {**self.trainer_kwargs, "logger": False}  # the run's bars on stderr (trainer.enable_progress_bar: false: none)
        result = run_attribution(module, datamodule, config, kwargs, write=False)
        if result.failed:
            raise FloatingPointError(f"{spec.key}: targets failed: {result.failed}")
        return result.table


def run_method(spec: MethodSpec, ctx: MethodContext) -> ScoreTable:
    """The method's query-major table on θ0, labelled with the spec's key."""
    table = get_method(spec.name).reproduction_table(spec, ctx)
    table.method = spec.key
    return table
