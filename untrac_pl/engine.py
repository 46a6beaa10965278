"""The attribution engine: targets × evaluation set → a query-major score matrix.

UnTrac: targets = training groups, evaluation set = the queries (test behaviours).
UnTrac-Inv: targets = queries (each one, or each query subset), evaluation set = the training data.
θ0 losses of the evaluation set are computed once; each target is then unlearned by a fresh
``Trainer.fit`` (RestoreWeights brings θ0 back first) and scored by ``Trainer.predict``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
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
from untrac_pl.errors import NonFiniteLossError
from untrac_pl.io import StagedDirectory, write_json_atomic
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import Target, UnTracModule

log = logging.getLogger(__name__)

Method = Literal["untrac", "untrac_inv"]


@dataclass
class AttributionConfig:
    """What to attribute and where to write it.

    ``target_unit`` (UnTrac-Inv only): ``example`` unlearns each query on its own, ``group`` each
    query subset as one target (the paper's setting). UnTrac always unlearns training groups.
    """

    method: Method = "untrac_inv"
    target_unit: Literal["example", "group"] = "example"
    output_dir: str = "runs/attribution"
    overwrite: bool = False
    top_k: int = 10
    seed: int = 0
    snippet_chars: int = 200


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
        self.restore = RestoreWeights()
        self.memory = MemoryMonitor()
        self.writer = RankingWriter(top_k=config.top_k, snippet_chars=config.snippet_chars)

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self) -> AttributionPlan:
        self.datamodule.load_records()
        self.module.load_model(self.datamodule.all_texts())
        self.datamodule.tokenize(self.module.tokenizer)
        return build_plan(self.config, self.datamodule)

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
        return pl.Trainer(logger=logger if logger is not None else False, callbacks=callbacks, **kwargs)

    def _logger(self, run_dir: Path):
        logger = self.trainer_kwargs.get("logger", True)
        if logger is True or logger is None:
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
        return logger or None

    # -- run -------------------------------------------------------------------------------------
    def run(self, write: bool = True) -> AttributionResult:
        started = time.perf_counter()
        staged = StagedDirectory(Path(self.config.output_dir), overwrite=self.config.overwrite) if write else None
        plan = self.prepare()  # all validation happens before any output exists
        run_dir = staged.open() if staged else None
        try:
            result = self._run(plan, run_dir, started, write)
        except BaseException:
            if staged:
                staged.discard()
            self.restore.restore(self.module)
            raise
        if staged:
            result.output_dir = staged.commit()
        return result

    def _run(self, plan: AttributionPlan, run_dir: Path, started: float, write: bool) -> AttributionResult:
        logger = self._logger(run_dir) if write else None
        self.writer.begin(plan, run_dir)
        with warnings.catch_warnings(), _quiet_lightning():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*The number of training batches.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            eval_loader = self.datamodule.evaluation_dataloader(plan.eval_corpus)
            self.module.target = None
            self.module.base_losses = None
            base_trainer = self._trainer(logger)
            t0 = time.perf_counter()
            base = base_trainer.predict(self.module, eval_loader, return_predictions=True)
            self.module.base_losses = _assemble(base, len(plan.eval_corpus))
            base_seconds = time.perf_counter() - t0
            schedule = self.module.schedule
            steps = {}
            t1 = time.perf_counter()
            for target in plan.targets:
                steps[target.id] = self._unlearn_and_score(plan, target, eval_loader, logger, schedule)
            target_seconds = time.perf_counter() - t1
        self.restore.restore(self.module)
        self.module.target = None
        timings = {"base_losses_s": base_seconds, "targets_s": target_seconds, "total_s": time.perf_counter() - started, "num_targets": len(plan.targets)}
        metadata = self._metadata(plan, steps, timings)
        memory = self.memory.report()
        if write:
            table = self.writer.write_outputs(metadata, logger)
            write_json_atomic(run_dir / "memory.json", memory)
            write_json_atomic(run_dir / "summary.json", {**metadata, "memory": memory, "completed": True})
            if logger is not None:
                logger.finalize("success")
        else:
            table = self.writer.table(metadata)
        return AttributionResult(table, run_dir if write else None, dict(self.writer.failed), memory, timings)

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

    def _metadata(self, plan: AttributionPlan, steps: dict, timings: dict) -> dict:
        module = self.module
        return {
            "method": plan.method,
            "target_unit": plan.target_unit,
            "num_targets": len(plan.targets),
            "num_eval_examples": len(plan.eval_corpus),
            "optimizer": _jsonable(module.optimizer_spec),
            "unlearning": _jsonable(module.schedule),
            "model": _jsonable(module.model_spec),
            "optimizer_steps": steps,
            "seed": self.config.seed,
            "truncated": {"training data": self.datamodule.train_corpus.num_truncated, "queries": self.datamodule.query_corpus.num_truncated},
            "precision": str(self.trainer_kwargs.get("precision", "32-true")),
            "timings": timings,
            "versions": _versions(),
            "failed_targets": dict(self.writer.failed),
        }


def _assemble(predictions: list[dict], size: int) -> torch.Tensor:
    losses = torch.full((size,), float("nan"))
    for batch in predictions:
        losses[batch["index"].cpu()] = batch["losses"].cpu().float()
    if not torch.isfinite(losses).all():
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()[:5]
        raise FloatingPointError(f"θ0 losses are non-finite or missing for evaluation examples {bad}")
    return losses


class _quiet_lightning:
    """Silence Lightning's per-Trainer banners ("GPU available...") inside the target loop."""

    NAMES = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def run_attribution(module: UnTracModule, datamodule: AttributionDataModule, config: AttributionConfig, trainer_kwargs: Optional[dict] = None, write: bool = True) -> AttributionResult:
    return AttributionRunner(module, datamodule, config, trainer_kwargs).run(write=write)
