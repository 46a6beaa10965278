"""UnTrac and UnTrac-Inv: unlearn each target by gradient ascent, measure how the evaluation losses rise.

UnTrac: targets = training groups, evaluation set = the queries (test behaviours).
UnTrac-Inv: targets = queries (each one, or each query subset), evaluation set = the training data.
θ0 losses of the evaluation set are computed once; each target is then unlearned by a fresh
``Trainer.fit`` (RestoreWeights brings θ0 back first) and scored by ``Trainer.predict``. With
``targets_per_pass: k`` k targets are unlearned one after another and scored in one pass
(:mod:`untrac_pl.multiquery`); with ``parallel_targets: K`` K targets are unlearned at once in one
batched computation and then scored in one pass (:mod:`untrac_pl.parallel`). Every finished target is persisted at once (:mod:`untrac_pl.resume`),
so a killed run resumes where it stopped; a target whose ascent loss or scores turn NaN/inf is
marked failed with its step and the run goes on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import lightning.pytorch as pl
import torch

from untrac_pl.data.schedule import (
    UnlearningSchedule,
    num_optimizer_steps,
    plan_micro_batches,
)
from untrac_pl.distributed import merge_across_ranks, shard_loader
from untrac_pl.errors import (
    MethodOptionError,
    NonFiniteBaseLossError,
    NonFiniteLossError,
)
from untrac_pl.methods.base import (
    AttributionMethod,
    AttributionPlan,
    RunContext,
    query_targets,
    target_seed,
)
from untrac_pl.methods.registry import register
from untrac_pl.multiquery import changed_tensors
from untrac_pl.parallel import check_parallel_options, parallel_chunks, stack_trainable, unstack
from untrac_pl.quantization import ScaleConfigError, check_scale_options
from untrac_pl.resume import resume_targets
from untrac_pl.runtime import json_safe
from untrac_pl.unlearning import Target
from untrac_pl.vocabulary import current as vocabulary
from untrac_pl.vocabulary import warn

log = logging.getLogger(__name__)


@dataclass
class UnlearningOptions:
    """Engine options of UnTrac / UnTrac-Inv (the ascent itself is ``model.optimizer`` / ``model.unlearning``).

    Args:
        targets_per_pass: unlearn this many targets one after another and score them together in one
            pass over the evaluation data (``torch.func.functional_call``); scores equal ``1``'s.
        snapshot_device: keep the θ0 snapshot on this device (``cpu``: host memory instead of the
            accelerator; costs a host-to-device copy per target).
        parallel_targets: unlearn this many targets at once, as one batched computation
            (``torch.func.vmap``; :mod:`untrac_pl.parallel`), then score them in one pass; scores equal
            ``1``'s to float rounding (with dropout on: in distribution). Memory: K copies of the
            trainable tensors and their optimizer state.
    """

    targets_per_pass: int = field(default=1, metadata={"doc": "targets unlearned, then scored in one pass"})
    parallel_targets: int = field(default=1, metadata={"doc": "targets unlearned at once (vmap), then scored in one pass"})
    snapshot_device: Optional[str] = field(default=None, metadata={"doc": "where the θ0 snapshot is kept"})


def _assemble(losses: torch.Tensor) -> torch.Tensor:
    """The θ0 losses the writer gathered (NaN where not scored on this rank), merged and checked."""
    losses = merge_across_ranks(losses)  # under DDP each rank scored a shard: merge by index
    if not torch.isfinite(losses).all():
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()[:5]
        raise NonFiniteBaseLossError(
            f"the model's losses before any unlearning (θ0) are NaN/inf or missing for evaluation examples {bad}: "
            "the checkpoint holds non-finite weights or the dtype overflows (try model.dtype: float32 or bfloat16)"
        )
    return losses


class UnlearningMethod(AttributionMethod):
    """Gradient-ascent unlearning of each target, scored as ``loss(θ_T) - loss(θ0)``."""

    kind = "unlearning"
    resumable = True
    Options = UnlearningOptions

    def validate_options(self, options: dict, field_name) -> None:
        for name in ("targets_per_pass", "parallel_targets"):
            value = options.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MethodOptionError(f"{field_name(name)}: must be an integer >= 1, got {value!r}")

    def config_options(self, options: dict) -> dict:
        """``options`` as AttributionConfig fields (UnTrac's options are engine fields)."""
        return dict(options)

    # -- set-up --------------------------------------------------------------------------------------
    def check(self, config, module, trainer_kwargs: dict) -> None:
        ignored = sorted(k for k, v in (config.baseline or {}).items() if v is not None)
        if ignored:
            raise MethodOptionError(f"attribution.baseline.{ignored[0]}: baseline options do nothing for method {config.method}; "
                                    "remove attribution.baseline (or set attribution.method to a baseline such as graddot)")
        check_scale_options(module.model_spec, trainer_kwargs, config.targets_per_pass)
        if config.parallel_targets > 1:
            check_parallel_options(config, module.schedule, trainer_kwargs)

    def warn_about_schedule(self, plan: AttributionPlan, schedule) -> None:
        """UnTrac's scores grow with the number of ascent steps (the ascent is unbounded), so groups
        unlearned for different step counts are ranked largely by step count (paper, Table 3).
        UnTrac-Inv with one step per target is, to first order, GradCos (Adam) or GradDot (SGD)."""
        if schedule.loss_reduction == "token_mean":
            words = vocabulary()  # the caller's names: data.eval_batch_size (CLI), eval_batch_size (Python), ...
            warn(log,
                 f"{words.setting('unlearning.loss_reduction', 'token_mean')} gives every example of an evaluation batch the "
                 "batch's token-mean loss (the authors' convention), so per-example scores are shared within a batch and only "
                 f"group means are meaningful; the authors evaluate in batches of 8 ({words.setting('eval_batch_size', 8)})")

    # -- θ0 ------------------------------------------------------------------------------------------
    def theta0(self, ctx: RunContext) -> None:
        module, plan = ctx.module, ctx.plan
        eval_loader = ctx.datamodule.evaluation_dataloader(plan.eval_corpus, module.schedule.loss_reduction)
        module.set_target(None)
        module.connect(base_losses=None, keep_on_device=True)  # no host<->device round trip per target (UnTracModule.cpu)
        trainer = ctx.new_trainer(ctx.logger)
        ctx.precision, ctx.world_size = str(trainer.precision), trainer.world_size
        if trainer.world_size > 1:
            eval_loader = shard_loader(eval_loader, trainer.global_rank, trainer.world_size)
        ctx.eval_loader = eval_loader
        t0 = time.perf_counter()
        # the writer gathers the losses batch by batch (Lightning's list of every batch's outputs would pin
        # small tensors between the freed activations: glibc then keeps ~1 KB of heap per example)
        trainer.predict(module, eval_loader, return_predictions=False)
        computed = _assemble(ctx.writer.take_theta0())
        base, finished = resume_targets(ctx.state, computed, [t.id for t in plan.targets], len(plan.eval_corpus))
        for target_id, (row, info) in finished.items():
            if row is not None:
                ctx.writer.set_row(target_id, row)
            if info.get("failed"):
                ctx.writer.note_failed(target_id, info["failed"])
            ctx.resumed.add(target_id)
            ctx.target_info[target_id] = info
        module.connect(base_losses=base, keep_on_device=True)
        ctx.timings["base_losses_s"] = time.perf_counter() - t0

    # -- targets -------------------------------------------------------------------------------------
    def score_targets(self, ctx: RunContext) -> None:
        t1 = time.perf_counter()
        todo = [t for t in ctx.plan.targets if t.id not in ctx.resumed]
        per_pass = max(1, int(ctx.config.targets_per_pass))
        parallel = max(1, int(ctx.config.parallel_targets))
        try:
            if parallel > 1:
                if ctx.world_size > 1:
                    raise ScaleConfigError(f"attribution.parallel_targets={parallel} runs in one process; with {ctx.world_size} "
                                           "processes use parallel_targets: 1 (the processes share the scoring instead)")
                schedule = ctx.module.schedule
                plans = {t.id: plan_micro_batches(len(t.indices), schedule, t.seed) for t in todo}
                chunks = parallel_chunks(todo, plans, parallel)
            else:
                chunks = [todo[start : start + per_pass] for start in range(0, len(todo), per_pass)]
            for chunk in chunks:
                if parallel > 1:
                    steps = self._unlearn_and_score_parallel(ctx, chunk)
                elif per_pass == 1:
                    steps = self._unlearn_and_score(ctx, chunk[0])
                else:
                    steps = self._unlearn_and_score_chunk(ctx, chunk)
                self._finish_targets(ctx, chunk, steps)
        finally:
            ctx.restore.restore(ctx.module)
            ctx.module.set_target(None)
            ctx.module.connect(base_losses=ctx.module.base_losses, keep_on_device=False)
        ctx.timings["targets_s"] = time.perf_counter() - t1

    def _fit(self, ctx: RunContext, target: Target) -> Optional[pl.Trainer]:
        """Unlearn ``target`` from θ0; ``None`` if its ascent diverged (the target is marked failed)."""
        module = ctx.module
        pl.seed_everything(target.seed, workers=True, verbose=False)
        module.set_target(target)
        loader = ctx.datamodule.ascent_dataloader(ctx.plan.target_corpus, target.indices, module.schedule, target.seed)
        trainer = ctx.new_trainer(ctx.logger)
        try:
            trainer.fit(module, train_dataloaders=loader)
        except NonFiniteLossError as exc:
            self._mark_diverged(ctx, target.id, exc)
            return None
        finally:
            if ctx.board is not None:  # logged once the target is persisted (_finish_targets)
                ctx.board.hold_curve(target.id, module.ascent_curve)
        return trainer

    def _unlearn_and_score(self, ctx: RunContext, target: Target) -> dict[str, int]:
        trainer = self._fit(ctx, target)
        if trainer is None:
            return {target.id: ctx.failed_steps[target.id]}
        trainer.predict(ctx.module, ctx.eval_loader, return_predictions=False)
        return {target.id: trainer.global_step}

    def _unlearn_and_score_chunk(self, ctx: RunContext, chunk: list[Target]) -> dict[str, int]:
        """Unlearn every target of ``chunk`` and score them all in one predict pass (``targets_per_pass``)."""
        module = ctx.module
        steps: dict[str, int] = {}
        kept: list[tuple] = []
        for position, target in enumerate(chunk):
            trainer = self._fit(ctx, target)
            if trainer is None:
                steps[target.id] = ctx.failed_steps[target.id]
                continue
            steps[target.id] = trainer.global_step
            last = position == len(chunk) - 1
            # the last target's tensors are the live ones: no copy needed
            kept.append((target, changed_tensors(module.net, ctx.restore.snapshot_tensors, clone=not last)))
        self._score_in_one_pass(ctx, kept)
        return steps

    @staticmethod
    def _score_in_one_pass(ctx: RunContext, kept: list[tuple]) -> None:
        """One predict pass scoring every ``(target, parameter set)`` of ``kept`` (nothing if it is empty)."""
        if not kept:
            return
        module = ctx.module
        module.set_target(kept[-1][0])
        module.set_pass([t for t, _ in kept], [p for _, p in kept])
        try:
            ctx.new_trainer(ctx.logger).predict(module, ctx.eval_loader, return_predictions=False)
        finally:
            module.set_pass(None, None)

    @staticmethod
    def _mark_diverged(ctx: RunContext, target_id: str, exc: NonFiniteLossError) -> None:
        log.warning("%s; target marked failed, continuing", exc)
        ctx.writer.mark_failed(target_id, f"non-finite ascent loss ({exc.value})", exc.step)
        ctx.failed_steps[target_id] = exc.step

    def _unlearn_and_score_parallel(self, ctx: RunContext, chunk: list[Target]) -> dict[str, int]:
        """Unlearn the targets of ``chunk`` at once (one batched ascent) and score them in one pass."""
        module = ctx.module
        if len(chunk) == 1:
            return self._unlearn_and_score(ctx, chunk[0])
        ctx.restore.restore(module)  # θ0, whatever ran before: every target's copy starts there
        pl.seed_everything(chunk[0].seed, workers=True, verbose=False)
        stacked = stack_trainable(module.net, len(chunk))
        module.set_parallel(chunk, stacked)
        loader = ctx.datamodule.parallel_ascent_dataloader(ctx.plan.target_corpus, [t.indices for t in chunk], module.schedule,
                                                           [t.seed for t in chunk])
        try:
            trainer = ctx.new_trainer(ctx.logger)
            trainer.fit(module, train_dataloaders=loader)
            failures = module.parallel_failures()
            curve = list(module.ascent_curve)
            # the module keeps its last Trainer, and with it the optimizer state of all K targets (2 copies of the
            # stacked tensors for Adam): released before the scoring pass and the next chunk's fit
            trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = [], []
        finally:
            module.set_parallel(None, None)
        steps: dict[str, int] = {}
        kept: list[tuple] = []
        for i, target in enumerate(chunk):
            if ctx.board is not None:
                ctx.board.hold_curve(target.id, [c[i] for c in curve])
            if target.id in failures:
                self._mark_diverged(ctx, target.id, NonFiniteLossError(target.id, *failures[target.id]))
                steps[target.id] = failures[target.id][0]
                continue
            steps[target.id] = trainer.global_step
            kept.append((target, unstack(stacked, i)))
        self._score_in_one_pass(ctx, kept)
        return steps

    def _finish_targets(self, ctx: RunContext, chunk: list[Target], chunk_steps: dict) -> None:
        """Record each target's outcome and persist it (atomic file + index line) at once."""
        schedule = ctx.module.schedule
        for target in chunk:
            steps = int(chunk_steps.get(target.id, 0))
            failed = ctx.writer.failed.get(target.id)
            if failed is not None and failed.get("step") is None:
                failed["step"] = steps  # non-finite scores: after all the steps taken
            planned = num_optimizer_steps(plan_micro_batches(len(target.indices), schedule, target.seed))
            info = {"status": "failed" if failed else "done", "optimizer_steps": steps, "planned_steps": planned,
                    "stopped_early": bool(failed is None and steps < planned), "failed": failed}
            ctx.target_info[target.id] = info
            if ctx.state is not None:
                ctx.state.record(target.id, ctx.writer.row(target.id), info)
            if ctx.board is not None:  # after the record: a killed run never logs a target its resume redoes
                ctx.board.target_finished(target, ctx.steps, ctx.writer.row(target.id))

    # -- outputs -------------------------------------------------------------------------------------
    def metadata(self, ctx: RunContext) -> tuple[dict, dict]:
        module, plan = ctx.module, ctx.plan
        steps = ctx.steps
        return ({"optimizer": json_safe(module.optimizer_spec), "unlearning": json_safe(module.schedule)},
                {"optimizer_steps": {t.id: steps[t.id] for t in plan.targets if t.id in steps}})

    def summary(self, ctx: RunContext) -> dict:
        failed = ctx.writer.ordered_failed()
        plan, infos = ctx.plan, ctx.target_info
        return {
            "config_hash": ctx.state.hash if ctx.state is not None else None,
            "num_failed": len(failed),
            "num_succeeded": len(plan.targets) - len(failed),
            "stopped_early": [t.id for t in plan.targets if infos.get(t.id, {}).get("stopped_early")],
            "resumed_targets": len(ctx.resumed),
            "max_length_requested": ctx.max_length_requested,
            "world_size": ctx.world_size,
            "targets_per_pass": ctx.config.targets_per_pass,
            "parallel_targets": ctx.config.parallel_targets,
        }

    # -- reproduction ----------------------------------------------------------------------------------
    def reproduction_table(self, spec, ctx):
        """UnTrac / UnTrac-Inv on θ0 through the run shell, which the reproduction hands over (``ctx.unlearn``)."""
        return ctx.unlearn(spec)


@register
class UnTrac(UnlearningMethod):
    """Unlearn each training group; score = the rise of each query's loss."""

    name, display = "untrac", "UnTrac"
    unlearns_training_data = True
    formula = ("score = L({query}; θ_T) - L({query}; θ0) after unlearning the training text (each training "
               "text on its own, from θ0); positive = the training text helped produce it")

    def plan(self, config, datamodule, module) -> AttributionPlan:
        train, queries = datamodule.train_corpus, datamodule.query_corpus
        targets = [Target(g, idx, target_seed(config.seed, g)) for g, idx in train.group_members().items()]
        plan = AttributionPlan("untrac", targets, train, queries, "group", [t.id for t in targets], False, queries)
        self.warn_about_schedule(plan, module.schedule)
        schedule = module.schedule
        if len(plan.targets) >= 2:
            steps = {t.id: num_optimizer_steps(plan_micro_batches(len(t.indices), schedule, t.seed)) for t in plan.targets}
            low, high = min(steps, key=steps.get), max(steps, key=steps.get)
            if steps[low] != steps[high]:
                words = vocabulary()
                warn(log,
                     f"UnTrac: training groups get unequal ascent step counts ({low}: {steps[low]} ... {high}: {steps[high]}); "
                     f"their scores then mostly reflect step counts. Equalise with {words.key('samples_per_group')} (every "
                     f"group at least that large) or a fixed {words.key('unlearning.num_steps')}")
        return plan


@register
class UnTracInv(UnlearningMethod):
    """Unlearn each query (or query subset); score = the rise of each training example's loss."""

    name, display, aliases = "untrac_inv", "UnTrac-Inv", ("untracinv",)
    formula = "score = L(train; θ_T) - L(train; θ0) after unlearning the {query}; positive = the training text helped produce it"

    def default_schedule(self) -> UnlearningSchedule:
        """The paper's UnTrac-Inv: the whole target in one batch, 5 steps."""
        return UnlearningSchedule(num_steps=5, num_epochs=None, batch_size=None)

    def plan(self, config, datamodule, module) -> AttributionPlan:
        plan = query_targets("untrac_inv", datamodule.query_corpus, datamodule.train_corpus, config.target_unit, config.seed)
        self.warn_about_schedule(plan, module.schedule)
        schedule = module.schedule
        steps = {num_optimizer_steps(plan_micro_batches(len(t.indices), schedule, t.seed)) for t in plan.targets}
        if steps == {1}:
            paper = vocabulary().setting("unlearning", {"num_steps": 5, "num_epochs": None, "batch_size": None})
            warn(log,
                 "UnTrac-Inv with a single optimizer step per target is, to first order, GradCos (Adam) or "
                 f"GradDot (SGD); the paper unlearns each target in one batch for 5 steps: {paper}")
        return plan
