"""The run shell: stage → prepare → θ0 → targets → write, the same for every method.

:func:`run_attribution` looks the method up in the registry (:mod:`untrac_pl.methods`) and runs its
hooks inside one shell: all validation happens before any output exists; the outputs are built in
``<output_dir>.partial/`` and renamed into place when complete (:class:`untrac_pl.io.StagedDirectory`);
resumable methods (UnTrac, UnTrac-Inv) persist every finished target at once, so re-running the same
command after a crash or kill continues where it stopped and gives the same bytes as an
uninterrupted run (:mod:`untrac_pl.resume`, docs/safety.md). The files are named in :mod:`untrac_pl.outputs`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl

from untrac_pl.board import RunBoard, RunLogger
from untrac_pl.callbacks.memory import MemoryMonitor
from untrac_pl.callbacks.progress import TargetProgressBar
from untrac_pl.callbacks.rankings import RankingWriter
from untrac_pl.callbacks.restore import RestoreWeights
from untrac_pl.config import AttributionConfig
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.distributed import global_rank, may_be_distributed
from untrac_pl.errors import (
    NonFiniteBaseLossError,
    OutputWriteError,
    ResumeConflictError,
)
from untrac_pl.io import StagedDirectory, write_json_atomic, write_text_atomic
from untrac_pl.methods import (
    AttributionMethod,
    AttributionPlan,
    RunContext,
    check_options,
    get_method,
    target_seed,
)
from untrac_pl.outputs import MEMORY, SUMMARY
from untrac_pl.resume import ResumeState, run_fingerprint
from untrac_pl.runtime import (
    context_length,
    interrupted,
    json_safe,
    quiet_lightning,
    reenable_ctrl_c,
    versions,
)
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import UnTracModule
from untrac_pl.vocabulary import current as vocabulary
from untrac_pl.vocabulary import warn

log = logging.getLogger(__name__)

__all__ = ["AttributionConfig", "AttributionPlan", "AttributionResult", "AttributionRunner", "run_attribution", "target_seed"]


@dataclass
class AttributionResult:
    table: ScoreTable
    output_dir: Optional[Path]
    failed: dict
    memory: dict
    timings: dict


class AttributionRunner:
    """Runs one attribution with any registered method and writes the shared outputs.

    ``trainer_kwargs`` are passed to every per-target ``Trainer`` (accelerator, devices, precision,
    logger, callbacks, ...); the run's own callbacks (RestoreWeights, MemoryMonitor, RankingWriter,
    progress bar) are added and shared across targets.
    """

    def __init__(self, module: UnTracModule, datamodule: AttributionDataModule, config: AttributionConfig, trainer_kwargs: Optional[dict] = None):
        self.module, self.datamodule, self.config = module, datamodule, config
        self.trainer_kwargs = dict(trainer_kwargs or {})
        # Lightning's default (50): the ascent curve in TensorBoard every 50 run-level steps and at each target's last
        self.log_every_n_steps = int(self.trainer_kwargs.get("log_every_n_steps") or 50)
        self.method: AttributionMethod = get_method(config.method)
        self.restore = RestoreWeights(offload_device=config.snapshot_device)
        self.memory = MemoryMonitor()
        self.writer = RankingWriter(top_k=config.top_k, snippet_chars=config.snippet_chars, sign=self.method.sign, display=self.method.display)
        self.progress = TargetProgressBar()  # one bar per phase across the run's Trainers (on stderr)
        self.max_length_requested: Optional[int] = None  # data.max_length before clamping (set by prepare)

    # -- prepare -----------------------------------------------------------------------------------
    def prepare(self) -> AttributionPlan:
        """Records, model, tokens and the method's plan."""
        self.datamodule.load_records()
        self.module.load_model(self.datamodule.all_texts())
        self.max_length_requested = self.datamodule.max_length
        self.datamodule.connect(self.module.tokenizer, max_length=self._clamped_max_length(self.max_length_requested))
        return self.method.plan(self.config, self.datamodule, self.module)

    def _clamped_max_length(self, requested: int) -> int:
        """A ``max_length`` beyond the model's context is clamped to it, with a warning.

        Positions past the context do not exist (GPT-2: an index error on CPU, a device-side assert
        on CUDA); texts longer than the clamped length are truncated and counted like any other.
        """
        limit = context_length(self.module.net)
        if limit is not None and requested > limit:
            warn(log, f"{vocabulary().key('max_length')}={requested} exceeds the model's context of {limit} tokens: clamped "
                      f"to {limit} (longer texts are truncated and counted in summary.json 'truncated')")
            return limit
        return requested

    def new_trainer(self, logger) -> pl.Trainer:
        """A Trainer for one fit or predict, with the run's callbacks."""
        kwargs = dict(self.trainer_kwargs)
        user_callbacks = [c for c in (kwargs.pop("callbacks", None) or []) if not isinstance(c, (RestoreWeights, MemoryMonitor, RankingWriter))]
        kwargs.pop("logger", None)
        has_bar = any(isinstance(c, pl.callbacks.ProgressBar) for c in user_callbacks)
        callbacks = [self.restore, self.memory, self.writer, *user_callbacks]
        if kwargs.get("enable_progress_bar", True) and not has_bar:
            callbacks.append(self.progress)
        kwargs.setdefault("enable_checkpointing", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("max_epochs", 1)
        kwargs.setdefault("log_every_n_steps", self.log_every_n_steps)
        # the engine shards evaluation itself (untrac_pl.distributed) and ascent data is never sharded:
        # forced off, since the CLI passes Lightning's default (True) explicitly
        kwargs["use_distributed_sampler"] = False
        return pl.Trainer(logger=logger if logger is not None else False, callbacks=callbacks, **kwargs)

    def _logger(self, run_dir: Path):
        logger = self.trainer_kwargs.get("logger", True)
        if logger is True or logger is None:
            return RunLogger(run_dir)  # one event file for all the run's Trainers (untrac_pl.board)
        return logger or None

    # -- run ---------------------------------------------------------------------------------------
    def run(self, write: bool = True, extra_files: Optional[dict] = None, command: Optional[str] = None) -> AttributionResult:
        """``extra_files`` (``{name: text}``, e.g. the CLI's resolved config) are written into the
        run directory before it is renamed into place, so a finished run is complete at once.
        ``command`` (the command line, or how the API was called) is recorded in ``summary.json``."""
        started = time.perf_counter()
        method = self.method
        method.check(self.config, self.module, self.trainer_kwargs)  # before any data, model or output
        # the method's options (attribution.baseline) by its Options fields: a typo fails here, naming the field
        options = check_options(method.name, self.config.baseline, where="attribution.baseline", runner=True)
        method.configure_model(self.module)
        if write and may_be_distributed(self.trainer_kwargs):
            write = global_rank(self.trainer_kwargs) == 0  # under DDP only rank 0 writes
        staged = StagedDirectory(Path(self.config.output_dir), overwrite=self.config.overwrite) if write else None
        plan = self.prepare()  # all validation happens before any output exists
        state = None
        if staged and method.resumable:  # opens (or resumes) <output_dir>.partial; refuses to mix configurations
            fingerprint = run_fingerprint(self.config, self.module, self.datamodule, plan, self.trainer_kwargs)
            state = ResumeState.open(staged.partial, fingerprint, resume=self.config.resume, restart=self.config.restart, versions=versions())
            run_dir = staged.partial
        else:
            run_dir = staged.open() if staged else None
        ctx = RunContext(self.module, self.datamodule, self.config, self.trainer_kwargs, plan, self.writer, self.memory,
                         self.restore, self.new_trainer, run_dir=run_dir, state=state,
                         precision=str(self.trainer_kwargs.get("precision", "32-true")), max_length_requested=self.max_length_requested, options=options)
        try:
            self.writer.begin(plan, run_dir)
            ctx.logger = self._logger(run_dir) if write else None  # every method logs, the baselines too
            if ctx.logger is not None:
                ctx.board = RunBoard(ctx.logger, plan, method.kind, method.formula, self.log_every_n_steps).open()
            with quiet_lightning():
                method.theta0(ctx)
                if method.kind == "unlearning":  # one bar over the targets, counting those a resumed run has
                    self.progress.begin_targets(len(plan.targets), len(ctx.resumed))
                method.score_targets(ctx)
            result = self._write(ctx, started, write, extra_files or {}, command)
        except BaseException as exc:
            if ctx.board is not None:
                ctx.board.close("failed")  # flushed: a resumed run copies these events into its own file
            self.restore.restore(self.module)
            self.module.connect(self.module.base_losses, keep_on_device=False)
            self.progress.close()
            self._stopped(ctx, staged, exc)
            if interrupted(exc) and not isinstance(exc, KeyboardInterrupt):
                reenable_ctrl_c()  # Lightning turns Ctrl-C inside a Trainer into sys.exit(1), ignoring further ones
                raise KeyboardInterrupt from exc
            raise
        if staged:
            try:  # rename while still holding the lock, so no second run can open the half-renamed .partial
                result.output_dir = staged.commit()
            finally:
                if state is not None:
                    state.close()
            if state is not None:
                ResumeState.cleanup(result.output_dir)
        return result

    @staticmethod
    def _stopped(ctx: RunContext, staged: Optional[StagedDirectory], exc: BaseException) -> None:
        """What a stopped run leaves: finished targets for a resume, or nothing at all."""
        if staged is None:
            return
        if ctx.state is None:
            staged.discard()  # nothing resumable: no half-written output
            if interrupted(exc):
                log.warning("interrupted; %s scores in one pass and keeps nothing of a stopped run: nothing was written", ctx.plan.method)
            return
        ctx.state.close()
        kept = f"{ctx.state.num_finished()} finished targets are kept in '{staged.partial}'"
        if isinstance(exc, OutputWriteError):
            raise OutputWriteError(f"{exc}; {kept}: free space and re-run the same command to resume") from exc
        what = "interrupted" if interrupted(exc) else f"stopped by {type(exc).__name__}"
        # a re-run meets these again until their cause is fixed (a changed model behind the config, NaN weights)
        advice = ("fix the cause first: re-running the same command meets it again"
                  if isinstance(exc, (ResumeConflictError, NonFiniteBaseLossError)) else "re-run the same command to resume")
        log.warning("%s; %d of %d targets finished and kept in '%s': %s",
                    what, ctx.state.num_finished(), len(ctx.plan.targets), staged.partial, advice)

    def _metadata(self, ctx: RunContext) -> dict:
        """The score file's metadata: only what determines the scores, so it is byte-identical for
        the same configuration whatever the order, resumption, ranks or speed (timings: summary.json)."""
        plan, datamodule = ctx.plan, ctx.datamodule
        before_model, after_model = self.method.metadata(ctx)
        return {
            "method": plan.method,
            "target_unit": plan.target_unit,
            "num_targets": len(plan.targets),
            "num_eval_examples": len(plan.eval_corpus),
            **before_model,
            "model": json_safe(ctx.module.model_spec),
            **after_model,
            "seed": ctx.config.seed,
            "max_length": datamodule.max_length,
            "truncated": {"training data": datamodule.train_corpus.num_truncated, "queries": datamodule.query_corpus.num_truncated},
            "precision": ctx.precision,
            "versions": versions(),
            "failed_targets": self.writer.ordered_failed(),
        }

    def _write(self, ctx: RunContext, started: float, write: bool, extra_files: dict, command: Optional[str] = None) -> AttributionResult:
        timings = {**ctx.timings, "total_s": time.perf_counter() - started, "num_targets": len(ctx.plan.targets)}
        metadata = self._metadata(ctx)
        memory = self.memory.report()
        if not write:
            return AttributionResult(self.writer.table(metadata), None, self.writer.ordered_failed(), memory, timings)
        run_dir = ctx.run_dir
        table = self.writer.write_outputs(metadata, ctx.board)
        self.method.extra_outputs(ctx)
        write_json_atomic(run_dir / MEMORY, memory)
        for name, text in extra_files.items():
            write_text_atomic(run_dir / name, text)
        timings["total_s"] = time.perf_counter() - started
        write_json_atomic(run_dir / SUMMARY, {"command": command, **metadata, **self.method.summary(ctx), "timings": timings, "memory": memory, "completed": True})
        if ctx.board is not None:
            ctx.board.finish(ctx, self.method, table, memory)
            ctx.board.close()
        return AttributionResult(table, run_dir, self.writer.ordered_failed(), memory, timings)


def run_attribution(module: UnTracModule, datamodule: AttributionDataModule, config: AttributionConfig, trainer_kwargs: Optional[dict] = None, write: bool = True, extra_files: Optional[dict] = None, command: Optional[str] = None) -> AttributionResult:
    """Run ``config.method`` on the module's model and the datamodule's data; see :class:`AttributionRunner`."""
    return AttributionRunner(module, datamodule, config, trainer_kwargs).run(write=write, extra_files=extra_files, command=command)
