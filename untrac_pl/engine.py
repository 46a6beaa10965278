"""The attribution engine: targets × evaluation set → a query-major score matrix.

UnTrac: targets = training groups, evaluation set = the queries (test behaviours).
UnTrac-Inv: targets = queries (each one, or each query subset), evaluation set = the training data.
θ0 losses of the evaluation set are computed once; each target is then unlearned by a fresh
``Trainer.fit`` (RestoreWeights brings θ0 back first) and scored by ``Trainer.predict``.

Reliability (docs/safety.md): with ``write=True`` every finished target is persisted at once in
``<output_dir>.partial/progress/targets/`` with a manifest and config hash (:mod:`untrac_pl.resume`);
re-running the same command after a crash or kill continues where it stopped and gives the same
bytes as an uninterrupted run. A target whose ascent loss or scores turn NaN/inf is marked failed
with its step and the run goes on. Test hook: the environment variable
``UNTRAC_TEST_KILL_AFTER_TARGETS=N`` makes the process SIGKILL itself right after persisting its
N-th target (used by tests/test_resume.py to simulate a crash; never set it otherwise).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import torch

from untrac_pl.callbacks.memory import MemoryMonitor
from untrac_pl.callbacks.progress import TargetProgressBar
from untrac_pl.callbacks.rankings import RankingWriter
from untrac_pl.callbacks.restore import RestoreWeights
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import num_optimizer_steps, plan_micro_batches
from untrac_pl.data.tokenize import TokenizedCorpus
from untrac_pl.errors import NonFiniteBaseLossError, NonFiniteLossError, OutputWriteError, ResumeConflictError
from untrac_pl.io import StagedDirectory, write_json_atomic, write_text_atomic
from untrac_pl.resume import ResumeState, broadcast_from_rank0, run_fingerprint
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import Target, UnTracModule

log = logging.getLogger(__name__)

# the baselines (untrac_pl.baseline_runner, untrac_pl.baselines) produce the same output files
Method = Literal["untrac", "untrac_inv", "graddot", "gradcos", "tracin", "hif_lissa", "hif_arnoldi", "ekfac"]


@dataclass
class AttributionConfig:
    """What to attribute and where to write it.

    ``target_unit`` (UnTrac-Inv only): ``example`` unlearns each query on its own, ``group`` each
    query subset as one target (the paper's setting). UnTrac always unlearns training groups.
    ``targets_per_pass`` > 1 unlearns that many targets one after another and scores them together
    in one pass over the evaluation data (see :mod:`untrac_pl.multiquery`); scores equal ``1``'s.
    ``snapshot_device: cpu`` keeps the θ0 snapshot in host memory instead of on the accelerator
    (saves one copy of the trainable weights on the GPU; costs a host-to-device copy per target).

    ``resume`` (default on): if ``<output_dir>.partial`` holds finished targets of the same
    configuration (same config hash, see :mod:`untrac_pl.resume`), continue from there; with
    ``resume: false`` such a directory is an error instead. A different configuration is always an
    error unless ``restart: true``, which discards the partial results and starts over.
    """

    method: Method = "untrac_inv"
    target_unit: Literal["example", "group"] = "example"
    output_dir: str = "runs/attribution"
    overwrite: bool = False
    top_k: int = 10
    seed: int = 0
    snippet_chars: int = 200
    targets_per_pass: int = 1
    snapshot_device: Optional[str] = None
    resume: bool = True
    restart: bool = False
    baseline: dict = field(default_factory=dict)  # options of a baseline method (untrac_pl.baseline_runner)

    def __post_init__(self):
        for name, low in (("top_k", 1), ("snippet_chars", 1), ("targets_per_pass", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"attribution.{name} must be an integer >= {low}, got {value!r}")
        if not str(self.output_dir).strip():
            raise ValueError("attribution.output_dir is empty")
        if self.method not in Method.__args__:
            raise ValueError(f"attribution.method '{self.method}' is unknown; choose one of {', '.join(Method.__args__)}")


def target_seed(global_seed: int, target_id: str) -> int:
    """A seed per target from the global seed and the target id, so order never matters."""
    digest = hashlib.sha256(f"{global_seed}:{target_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class AttributionPlan:
    method: str
    targets: list[Target]
    target_corpus: TokenizedCorpus
    eval_corpus: TokenizedCorpus
    target_unit: str
    target_groups: list[str]
    targets_are_rows: bool
    query_corpus: TokenizedCorpus = field(repr=False, default=None)

    def row_texts(self) -> Optional[list[str]]:
        corpus = self.target_corpus if self.targets_are_rows else self.eval_corpus
        if self.targets_are_rows and self.target_unit == "group":
            return None
        if self.targets_are_rows:
            return [corpus.text_of(t.indices[0]) for t in self.targets]
        return [corpus.text_of(i) for i in range(len(corpus))]

    def col_texts(self) -> Optional[list[str]]:
        if self.targets_are_rows:
            return [self.eval_corpus.text_of(i) for i in range(len(self.eval_corpus))]
        return None


def build_plan(config: AttributionConfig, datamodule: AttributionDataModule) -> AttributionPlan:
    train, queries = datamodule.train_corpus, datamodule.query_corpus
    if config.method == "untrac":
        members = train.group_members()
        targets = [Target(g, idx, target_seed(config.seed, g)) for g, idx in members.items()]
        plan = AttributionPlan("untrac", targets, train, queries, "group", [t.id for t in targets], False, queries)
    elif config.method == "untrac_inv":
        if config.target_unit == "group":
            members = queries.group_members()
            targets = [Target(g, idx, target_seed(config.seed, g)) for g, idx in members.items()]
            groups = [t.id for t in targets]
        else:
            targets = [Target(rid, [i], target_seed(config.seed, rid)) for i, rid in enumerate(queries.ids)]
            groups = [r["group"] for r in queries.records]
        plan = AttributionPlan("untrac_inv", targets, queries, train, config.target_unit, groups, True, queries)
    else:
        raise ValueError(f"unknown method '{config.method}' (use untrac or untrac_inv)")
    for position, target in enumerate(plan.targets):
        target.position, target.total = position, len(plan.targets)
    return plan


def _jsonable(value):
    if is_dataclass(value):
        return asdict(value)
    return value


def _versions() -> dict:
    import lightning
    import transformers

    return {"torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class AttributionResult:
    table: ScoreTable
    output_dir: Optional[Path]
    failed: dict
    memory: dict
    timings: dict


class AttributionRunner:
    """Runs one attribution: loads data and model, unlearns each target, writes the outputs.

    ``trainer_kwargs`` are passed to every per-target ``Trainer`` (accelerator, devices,
    precision, logger, callbacks, ...). The run's own callbacks (RestoreWeights, MemoryMonitor,
    RankingWriter, progress bar) are added and shared across targets.
    """

    def __init__(self, module: UnTracModule, datamodule: AttributionDataModule, config: AttributionConfig, trainer_kwargs: Optional[dict] = None):
        self.module, self.datamodule, self.config = module, datamodule, config
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.restore = RestoreWeights(offload_device=config.snapshot_device)
        self.memory = MemoryMonitor()
        self.writer = RankingWriter(top_k=config.top_k, snippet_chars=config.snippet_chars)

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self) -> AttributionPlan:
        from untrac_pl.quantization import check_scale_options

        check_scale_options(self.module.model_spec, self.trainer_kwargs, self.config.targets_per_pass)
        self.datamodule.load_records()
        self.module.load_model(self.datamodule.all_texts())
        self._clamp_max_length()
        self.datamodule.tokenize(self.module.tokenizer)
        plan = build_plan(self.config, self.datamodule)
        self._warn_about_schedule(plan)
        return plan

    def _warn_about_schedule(self, plan: AttributionPlan) -> None:
        """UnTrac's scores grow with the number of ascent steps (the ascent is unbounded), so groups
        unlearned for different step counts are ranked largely by step count (paper, Table 3).
        UnTrac-Inv with one step per target is, to first order, GradCos (Adam) or GradDot (SGD)."""
        schedule = self.module.schedule
        if schedule.loss_reduction == "token_mean":
            log.warning(
                "model.unlearning.loss_reduction: token_mean gives every example of an evaluation batch the batch's token-mean "
                "loss (the authors' convention), so per-example scores are shared within a batch and only group means are "
                "meaningful; the authors evaluate in batches of 8 (data.eval_batch_size: 8)")
        if plan.method == "untrac_inv":
            steps = {num_optimizer_steps(plan_micro_batches(len(t.indices), schedule, t.seed)) for t in plan.targets}
            if steps == {1}:
                log.warning(
                    "UnTrac-Inv with a single optimizer step per target is, to first order, GradCos (Adam) or "
                    "GradDot (SGD); the paper unlearns each target in one batch for 5 steps: "
                    "model.unlearning: {num_steps: 5, num_epochs: null, batch_size: null}")
            return
        if plan.method != "untrac" or len(plan.targets) < 2:
            return
        steps = {t.id: num_optimizer_steps(plan_micro_batches(len(t.indices), schedule, t.seed)) for t in plan.targets}
        low, high = min(steps, key=steps.get), max(steps, key=steps.get)
        if steps[low] != steps[high]:
            log.warning(
                "UnTrac: training groups get unequal ascent step counts (%s: %d ... %s: %d); their scores then "
                "mostly reflect step counts. Equalise with data.samples_per_group (every group at least that large) "
                "or a fixed model.unlearning.num_steps", low, steps[low], high, steps[high])

    def _clamp_max_length(self) -> None:
        """A ``max_length`` beyond the model's context is clamped to it, with a warning.

        Positions past the context do not exist (GPT-2: an index error on CPU, a device-side assert
        on CUDA); texts longer than the clamped length are truncated and counted like any other.
        """
        from untrac_pl.models import context_length

        limit = context_length(self.module.net)
        requested = self.datamodule.max_length
        self.max_length_requested = requested
        if limit is not None and requested > limit:
            log.warning("data.max_length=%d exceeds the model's context of %d tokens: clamped to %d "
                        "(longer texts are truncated and counted in summary.json 'truncated')", requested, limit, limit)
            self.datamodule.max_length = limit

    def _trainer(self, logger) -> pl.Trainer:
        kwargs = dict(self.trainer_kwargs)
        user_callbacks = [c for c in (kwargs.pop("callbacks", None) or []) if not isinstance(c, (RestoreWeights, MemoryMonitor, RankingWriter))]
        kwargs.pop("logger", None)
        has_bar = any(isinstance(c, pl.callbacks.ProgressBar) for c in user_callbacks)
        callbacks = [self.restore, self.memory, self.writer, *user_callbacks]
        if kwargs.get("enable_progress_bar", True) and not has_bar:
            callbacks.append(TargetProgressBar())
        kwargs.setdefault("enable_checkpointing", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("max_epochs", 1)
        kwargs.setdefault("log_every_n_steps", 1)
        # the engine shards evaluation itself (untrac_pl.distributed) and ascent data is never sharded:
        # forced off, since the CLI passes Lightning's default (True) explicitly
        kwargs["use_distributed_sampler"] = False
        return pl.Trainer(logger=logger if logger is not None else False, callbacks=callbacks, **kwargs)

    def _logger(self, run_dir: Path):
        logger = self.trainer_kwargs.get("logger", True)
        if logger is True or logger is None:
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
        return logger or None

    # -- run -------------------------------------------------------------------------------------
    def run(self, write: bool = True, extra_files: Optional[dict] = None) -> AttributionResult:
        """``extra_files`` (``{name: text}``, e.g. the CLI's resolved config) are written into the
        run directory before it is renamed into place, so a finished run is complete at once."""
        started = time.perf_counter()
        self.extra_files = dict(extra_files or {})
        if write:
            from untrac_pl.distributed import global_rank, may_be_distributed

            if may_be_distributed(self.trainer_kwargs):
                write = global_rank(self.trainer_kwargs) == 0  # under DDP only rank 0 writes
        staged = StagedDirectory(Path(self.config.output_dir), overwrite=self.config.overwrite) if write else None
        plan = self.prepare()  # all validation happens before any output exists
        self.state = None
        if staged:  # opens (or resumes) <output_dir>.partial; refuses to mix configurations
            fingerprint = run_fingerprint(self.config, self.module, self.datamodule, plan, self.trainer_kwargs)
            self.state = ResumeState.open(staged.partial, fingerprint, resume=self.config.resume, restart=self.config.restart, versions=_versions())
        run_dir = staged.partial if staged else None
        self.module.keep_on_device = True  # no host<->device round trip per target (see UnTracModule.cpu)
        try:
            result = self._run(plan, run_dir, started, write)
        except BaseException as exc:
            self.restore.restore(self.module)
            if self.state is None:
                raise
            self.state.close()
            kept = f"{self.state.num_finished()} finished targets are kept in '{staged.partial}'"
            if isinstance(exc, OutputWriteError):
                raise OutputWriteError(f"{exc}; {kept}: free space and re-run the same command to resume") from exc
            log.warning("run stopped (%s); %s: re-run the same command to resume", type(exc).__name__, kept)
            raise
        finally:
            self.module.keep_on_device = False
        if staged:
            try:  # rename while still holding the lock, so no second run can open the half-renamed .partial
                result.output_dir = staged.commit()
            finally:
                self.state.close()
            ResumeState.cleanup(result.output_dir)
        return result

    def _run(self, plan: AttributionPlan, run_dir: Path, started: float, write: bool) -> AttributionResult:
        logger = self._logger(run_dir) if write else None
        self.writer.begin(plan, run_dir)
        with _quiet_lightning():
            eval_loader = self.datamodule.evaluation_dataloader(plan.eval_corpus, self.module.schedule.loss_reduction)
            self.module.target = None
            self.module.base_losses = None
            base_trainer = self._trainer(logger)
            self._precision, self._world_size = str(base_trainer.precision), base_trainer.world_size
            if base_trainer.world_size > 1:
                from untrac_pl.distributed import shard_loader

                eval_loader = shard_loader(eval_loader, base_trainer.global_rank, base_trainer.world_size)
            t0 = time.perf_counter()
            base = base_trainer.predict(self.module, eval_loader, return_predictions=True)
            base_losses, finished = self._resume(plan, _assemble(base, len(plan.eval_corpus)))
            self.module.base_losses = base_losses
            base_seconds = time.perf_counter() - t0
            schedule = self.module.schedule
            steps = {target_id: info["optimizer_steps"] for target_id, info in finished.items()}
            todo = [t for t in plan.targets if t.id not in finished]
            t1 = time.perf_counter()
            per_pass = max(1, int(self.config.targets_per_pass))
            for start in range(0, len(todo), per_pass):
                chunk = todo[start : start + per_pass]
                if per_pass == 1:
                    chunk_steps = {chunk[0].id: self._unlearn_and_score(plan, chunk[0], eval_loader, logger, schedule)}
                else:
                    from untrac_pl.multiquery import unlearn_and_score_chunk

                    chunk_steps = unlearn_and_score_chunk(self, plan, chunk, eval_loader, logger, schedule)
                steps.update(chunk_steps)
                self._finish_targets(chunk, chunk_steps, schedule)
            target_seconds = time.perf_counter() - t1
        self.restore.restore(self.module)
        self.module.target = None
        timings = {"base_losses_s": base_seconds, "targets_s": target_seconds, "total_s": time.perf_counter() - started, "num_targets": len(plan.targets)}
        metadata = self._metadata(plan, steps, timings)
        memory = self.memory.report()
        if write:
            table = self.writer.write_outputs(metadata, logger)
            write_json_atomic(run_dir / "memory.json", memory)
            for name, text in getattr(self, "extra_files", {}).items():
                write_text_atomic(run_dir / name, text)
            write_json_atomic(run_dir / "summary.json", {**metadata, **self._run_info(plan, finished, timings), "memory": memory, "completed": True})
            if logger is not None:
                logger.finalize("success")
        else:
            table = self.writer.table(metadata)
        return AttributionResult(table, run_dir if write else None, self.writer.ordered_failed(), memory, timings)

    def _unlearn_and_score(self, plan, target: Target, eval_loader, logger, schedule) -> int:
        pl.seed_everything(target.seed, workers=True, verbose=False)
        self.module.target = target
        loader = self.datamodule.ascent_dataloader(plan.target_corpus, target.indices, schedule, target.seed)
        trainer = self._trainer(logger)
        try:
            trainer.fit(self.module, train_dataloaders=loader)
        except NonFiniteLossError as exc:
            log.warning("%s; target marked failed, continuing", exc)
            self.writer.mark_failed(target.id, f"non-finite ascent loss ({exc.value})", exc.step)
            return exc.step
        trainer.predict(self.module, eval_loader, return_predictions=False)
        return trainer.global_step

    # -- resume and per-target persistence ---------------------------------------------------------
    def _resume(self, plan: AttributionPlan, computed: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """θ0 losses to score against and ``{target_id: info}`` of the targets already finished.

        On resume the stored θ0 losses are compared with the freshly computed ones: a mismatch
        means the model or data changed behind an unchanged configuration (refused); a tiny
        difference (other hardware) is accepted with a warning and the stored baseline is kept so
        every row shares one. Under DDP rank 0 decides and every rank gets the same answer.
        """
        state = self.state
        finished: dict = {}
        base = computed
        refusal: Optional[BaseException] = None
        if state is not None:
            try:
                base = self._reconcile_base_losses(state, computed)
                finished = self._load_finished(state, plan)
            except ResumeConflictError as exc:  # told to every rank below, so none waits on a collective
                refusal = exc
        base, (finished_ids, message) = broadcast_from_rank0(base, (sorted(finished), str(refusal) if refusal else None))
        if refusal is not None:
            raise refusal
        if message is not None:
            raise ResumeConflictError(f"rank 0 refused to resume: {message}")
        self.target_info = dict(finished)
        self.num_resumed = len(finished_ids)
        return base, finished if state is not None else {i: {"optimizer_steps": 0} for i in finished_ids}

    def _reconcile_base_losses(self, state: ResumeState, computed: torch.Tensor) -> torch.Tensor:
        stored = state.base_losses()
        if stored is None:
            state.save_base_losses(computed)
            return computed
        if not torch.equal(stored, computed):
            diff = float((stored - computed).abs().max())
            if not torch.allclose(stored, computed, rtol=1e-4, atol=1e-5):
                raise ResumeConflictError(
                    f"the θ0 losses differ from those of the interrupted run in '{state.run_dir}' (max |Δ| = {diff:.3g}): "
                    "the model weights or numerics changed behind an unchanged configuration; set attribution.restart: true"
                )
            log.warning("θ0 losses differ slightly (max |Δ| = %.3g) from the interrupted run's; keeping the stored ones", diff)
        return stored

    def _load_finished(self, state: ResumeState, plan: AttributionPlan) -> dict:
        finished = {}
        loaded = state.load_finished([t.id for t in plan.targets], len(plan.eval_corpus)) if state.resumed else {}
        for target_id, (row, info) in loaded.items():
            self.writer.set_row(target_id, row)
            if info.get("failed"):
                self.writer.failed[target_id] = info["failed"]
            finished[target_id] = info
        if loaded:
            log.info("resuming: %d of %d targets already finished", len(loaded), len(plan.targets))
        return finished

    def _finish_targets(self, chunk, chunk_steps: dict, schedule) -> None:
        """Record each target's outcome and persist it (atomic file + index line) at once."""
        for target in chunk:
            steps = int(chunk_steps.get(target.id, 0))
            failed = self.writer.failed.get(target.id)
            if failed is not None and failed.get("step") is None:
                failed["step"] = steps  # non-finite scores: after all the steps taken
            planned = num_optimizer_steps(plan_micro_batches(len(target.indices), schedule, target.seed))
            info = {"status": "failed" if failed else "done", "optimizer_steps": steps, "planned_steps": planned,
                    "stopped_early": bool(failed is None and steps < planned), "failed": failed}
            self.target_info[target.id] = info
            if self.state is not None:
                self.state.record(target.id, self.writer.row(target.id), info)
                self._persisted = getattr(self, "_persisted", 0) + 1
                kill_after = os.environ.get("UNTRAC_TEST_KILL_AFTER_TARGETS")
                if kill_after and self._persisted >= int(kill_after):
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: simulate a crash (see module docstring)

    def _run_info(self, plan: AttributionPlan, finished: dict, timings: dict) -> dict:
        """What summary.json adds to the score file's metadata: how this run went, not what it computed."""
        failed = self.writer.ordered_failed()
        infos = getattr(self, "target_info", {})
        return {
            "config_hash": self.state.hash if self.state is not None else None,
            "num_failed": len(failed),
            "num_succeeded": len(plan.targets) - len(failed),
            "stopped_early": [t.id for t in plan.targets if infos.get(t.id, {}).get("stopped_early")],
            "resumed_targets": getattr(self, "num_resumed", 0),
            "max_length_requested": getattr(self, "max_length_requested", self.datamodule.max_length),
            "world_size": getattr(self, "_world_size", 1),
            "targets_per_pass": self.config.targets_per_pass,
            "timings": timings,
        }

    def _metadata(self, plan: AttributionPlan, steps: dict, timings: dict) -> dict:
        """The score file's metadata: only what determines the scores, so it is byte-identical for
        the same configuration whatever the order, resumption, ranks or speed (timings: summary.json)."""
        module = self.module
        return {
            "method": plan.method,
            "target_unit": plan.target_unit,
            "num_targets": len(plan.targets),
            "num_eval_examples": len(plan.eval_corpus),
            "optimizer": _jsonable(module.optimizer_spec),
            "unlearning": _jsonable(module.schedule),
            "model": _jsonable(module.model_spec),
            "optimizer_steps": {t.id: steps[t.id] for t in plan.targets if t.id in steps},
            "seed": self.config.seed,
            "max_length": self.datamodule.max_length,
            "truncated": {"training data": self.datamodule.train_corpus.num_truncated, "queries": self.datamodule.query_corpus.num_truncated},
            "precision": getattr(self, "_precision", str(self.trainer_kwargs.get("precision", "32-true"))),
            "versions": _versions(),
            "failed_targets": self.writer.ordered_failed(),
        }


def _assemble(predictions: list[dict], size: int) -> torch.Tensor:
    losses = torch.full((size,), float("nan"))
    for batch in predictions:
        losses[batch["index"].cpu()] = batch["losses"].cpu().float()
    from untrac_pl.distributed import merge_across_ranks

    losses = merge_across_ranks(losses)  # under DDP each rank scored a shard: merge by index
    if not torch.isfinite(losses).all():
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()[:5]
        raise NonFiniteBaseLossError(
            f"the model's losses before any unlearning (θ0) are NaN/inf or missing for evaluation examples {bad}: "
            "the checkpoint holds non-finite weights or the dtype overflows (try model.dtype: float32 or bfloat16)"
        )
    return losses


class _quiet_lightning:
    """Silence, inside the engine's loops, Lightning's per-Trainer banners ("GPU available...", tips)
    and the warnings that are known to be harmless here (one Trainer per target repeats them all)."""

    NAMES = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
    HARMLESS = (
        ".*does not have many workers.*",  # tiny per-target loaders; workers would cost more than they save
        ".*The number of training batches.*",
        ".*smaller than the logging interval.*",
        ".*Total length of `DataLoader` across ranks is zero.*",
        r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a deprecated torch API
        ".*custom batch sampler `(LengthSortedBatchSampler|GroupBatchSampler)`.*",  # both return every index by construction (tested)
    )

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        for message in self.HARMLESS:
            warnings.filterwarnings("ignore", message=message)
        self.levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)


def run_attribution(module: UnTracModule, datamodule: AttributionDataModule, config: AttributionConfig, trainer_kwargs: Optional[dict] = None, write: bool = True, extra_files: Optional[dict] = None) -> AttributionResult:
    from untrac_pl.baseline_runner import BaselineRunner, is_baseline

    if not is_baseline(config.method):
        ignored = sorted(k for k, v in (config.baseline or {}).items() if v is not None)
        if ignored:
            from untrac_pl.baselines.options import BaselineOptionError

            raise BaselineOptionError(f"attribution.baseline.{ignored[0]}: baseline options do nothing for method {config.method}; "
                                      "remove attribution.baseline (or set attribution.method to a baseline such as graddot)")
    runner_cls = BaselineRunner if is_baseline(config.method) else AttributionRunner
    return runner_cls(module, datamodule, config, trainer_kwargs).run(write=write, extra_files=extra_files)
