"""The run's TensorBoard: one event file per run, charts that compare targets, results in the Text tab.

``untrac-pl attribute`` writes ``<run>/tensorboard/`` (``tensorboard --logdir <run>``); every method
logs, the gradient baselines included. Tags:

Scalars (custom-scalars layout: ``Unlearning`` and ``Scores`` charts)
    ``unlearning/ascent_loss``   the ascent loss of every target in one series; x = the run's unlearning
                                 step (each target starts after the steps of the targets before it in
                                 plan order, so a resumed run writes the same steps)
    ``target/own_loss_first``, ``target/own_loss_last``  the target's own (ascent) loss at its first and
                                 last unlearning step; x = the target's position in the plan
    ``target/optimizer_steps``   steps the target took (x: target position)
    ``target/group_score/<g>``   the target's mean score over the evaluation examples of group ``g``
                                 (UnTrac-Inv and the baselines: training groups; UnTrac: query groups)
    ``memory/<phase>_peak_gb``   peak memory of each phase (memory.json), once
    ``metrics/*``                the HParams metrics, once
Histograms
    ``scores/all``               every query's scores, and ``scores_by_group/<query group>`` that query
                                 group's, one step per training group (step i: the scores of training
                                 group i; the Text tab's ``run/summary`` names them), so Distributions
                                 shows one band per training group
Text
    ``run/summary``, ``rankings/group_scores`` (the group table), ``rankings/queries`` (query texts),
    ``rankings/top_k`` (each query's text and its top training units)
HParams
    method, target unit, optimizer, lr, steps (these five listed and ticked first), data, model, seed,
    precision, the unlearning schedule (baselines: their options, ``baseline``); one schema for every
    method (:data:`HPARAMS_SCHEMA`); metrics ``metrics/mean_top1_margin``, ``metrics/top1_group_match``,
    ``metrics/failed_targets`` (Lightning's ``hp_metric`` −1 placeholder is off)

Tags per group are capped at :data:`MAX_GROUP_TAGS` groups (1,000 one-query groups would be 1,000 cards;
``group_scores.csv`` has them all). Not logged: UnTrac-Inv's group scores after every unlearning step,
which would need a scoring pass over the whole training set after each step (5x the scoring cost in
the paper's setting, and extra forward passes that would shift the seeded dropout streams of later
steps); each target's group scores are logged once it is finished (``target/group_score/<g>``).

Lightning finalizes a Trainer's logger after every ``fit``/``predict`` and ``TensorBoardLogger.finalize``
closes the ``SummaryWriter`` (the next write then opens a new event file); the engine builds a Trainer
per fit and predict, so :class:`RunLogger` only flushes there and the run closes it once. Each
target's curve is logged when the target is finished and persisted, never step by step: a target
interrupted by a kill is logged only by the run that finishes it, and a resumed run copies the
killed run's event file into its own (:meth:`RunBoard.open`), so no step appears twice and the run
keeps one event file. Score files are unaffected by any of this.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from untrac_pl.outputs import TENSORBOARD

log = logging.getLogger(__name__)

CUSTOM_SCALARS_TAG = "custom_scalars__config__"
MAX_TEXT_QUERIES = 50  # queries whose top-k table goes to the Text tab (all of them: rankings.json)
MAX_GROUP_TAGS = 50  # groups with their own tag (target/group_score/<g>, scores_by_group/<g>): no card per query
MAX_QUERY_ROWS = 200  # rows of the query-text table


class RunLogger(TensorBoardLogger):
    """The run's ``TensorBoardLogger`` (``<run>/tensorboard``, no version folder, no ``hp_metric`` −1),
    shared by every Trainer of the run; a Trainer's ``finalize`` only flushes, :meth:`close_run` closes."""

    def __init__(self, run_dir: Path):
        super().__init__(save_dir=str(run_dir), name=TENSORBOARD, version="", default_hp_metric=False)
        self._closing = False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.flush()

    @rank_zero_only
    def save(self) -> None:
        # hparams.yaml once, by close_run, with the run's HParams (Lightning saves after every fit: an empty file)
        if self._closing:
            super().save()

    def close_run(self, status: str = "success") -> None:
        self._closing = True
        TensorBoardLogger.finalize(self, status)


def _writer(logger):
    """The logger's ``SummaryWriter`` (``None`` for loggers without histograms and text)."""
    if logger is None:
        return None
    experiment = getattr(logger, "experiment", None)
    return experiment if hasattr(experiment, "add_histogram") and hasattr(experiment, "add_text") else None


def _members(groups) -> dict:
    """``{group: index tensor of its members}``, groups in order of first appearance (one pass)."""
    members: dict = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    return {group: torch.tensor(index) for group, index in members.items()}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _plain(value) -> Optional[Any]:
    """An HParams value: bool/int/float/str; ``None`` is left out; anything else as compact JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return text if len(text) <= 200 else text[:199] + "…"


def _source(sources) -> Optional[str]:
    """A data side's sources as one short string: file paths, dataset ids (``<id>:<split>``) or
    ``generated:<generator>:<split>``; ``sources``: DataSource objects, dicts or paths."""
    parts = []
    for source in sources or []:
        if isinstance(source, (str, Path)):
            parts.append(str(source))
            continue
        get = source.get if isinstance(source, dict) else (lambda key, s=source: getattr(s, key, None))
        if get("generator") is not None or get("format") == "generated":
            parts.append(":".join(str(x) for x in ("generated", get("generator"), get("split")) if x is not None))
        elif get("path") is not None:
            split = get("split") if get("format") == "hf" else None  # a file has no split
            parts.append(str(get("path")) + (f":{split}" if split else ""))
        else:
            parts.append(str(_plain(source)))
    return ", ".join(parts) or None


# The HParams columns, the same for every method (a run's values fill those it has), so that whichever
# run's schema TensorBoard picks, every run's columns exist. str: text; float: a number.
HPARAMS_SCHEMA = {
    "method": str, "target_unit": str, "optimizer": str, "lr": float, "steps": float,
    "data.train": str, "data.queries": str, "data.train_examples": float, "data.query_examples": float,
    "data.samples_per_group": float, "data.max_length": float,
    "model": str, "model.dtype": str, "model.quantization": str, "model.lora": str,
    "num_targets": float, "seed": float, "precision": str, "baseline": str, "weight_decay": float,
    "unlearning.num_steps": float, "unlearning.num_epochs": float, "unlearning.batch_size": str,
    "unlearning.loss_reduction": str, "unlearning.lr_schedule": str, "unlearning.max_grad_norm": float,
    "unlearning.max_loss": float, "targets_per_pass": float, "parallel_targets": float,
}
# shown first and ticked in the HParams tab (it ticks the first five; ``steps``: mean optimizer steps per target)
HPARAMS_HEADLINE = ("method", "target_unit", "optimizer", "lr", "steps")


def _typed(value, kind):
    if kind is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return _plain(value) if isinstance(value, str) or value is None else str(_plain(value))


def run_hparams(ctx, method) -> dict:
    """What distinguishes runs in the HParams tab (:data:`HPARAMS_SCHEMA`): method, target unit,
    optimizer, lr, steps, data, model, seed, ...; ``None`` (not set, or not this method's) is left out."""
    module, datamodule, config, plan = ctx.module, ctx.datamodule, ctx.config, ctx.plan
    spec = module.model_spec
    model = spec.name_or_path
    if model is None and spec.config:
        model = " ".join(f"{k}={v}" for k, v in spec.config.items() if not str(k).endswith("pdrop"))
    params = {
        "method": plan.method,
        "target_unit": plan.target_unit,
        "model": model,
        "model.dtype": spec.dtype,
        "model.quantization": _plain(spec.quantization),
        "model.lora": _plain(spec.lora),
        "data.train": _source(getattr(datamodule, "train_sources", None)),
        "data.queries": _source(getattr(datamodule, "query_sources", None)),
        "data.train_examples": len(datamodule.train_corpus),
        "data.query_examples": len(datamodule.query_corpus),
        "data.samples_per_group": getattr(datamodule, "samples_per_group", None),
        "data.max_length": datamodule.max_length,
        "num_targets": len(plan.targets),
        "seed": config.seed,
        "precision": ctx.precision,
    }
    if method.kind == "unlearning":
        optimizer, schedule = module.optimizer_spec, module.schedule
        steps = [ctx.steps[t.id] for t in plan.targets if t.id in ctx.steps]
        params.update({
            "optimizer": optimizer.name,
            "lr": optimizer.lr,
            "steps": sum(steps) / len(steps) if steps else None,
            "weight_decay": optimizer.weight_decay,
            "unlearning.num_steps": schedule.num_steps,
            "unlearning.num_epochs": schedule.num_epochs,
            "unlearning.batch_size": schedule.batch_size if schedule.batch_size is not None else "whole target",
            "unlearning.loss_reduction": schedule.loss_reduction,
            "unlearning.lr_schedule": schedule.lr_schedule,
            "unlearning.max_grad_norm": schedule.max_grad_norm,
            "unlearning.max_loss": schedule.max_loss,
            "targets_per_pass": config.targets_per_pass,
            "parallel_targets": getattr(config, "parallel_targets", 1),
        })
    else:
        options = getattr(ctx, "options", None) or {}
        params["baseline"] = _plain(dict(sorted(options.items()))) if options else None
    typed = {k: _typed(v, HPARAMS_SCHEMA[k]) for k, v in params.items()}
    return {k: v for k, v in typed.items() if v is not None}


def hparams_summaries(params: dict, metrics: dict) -> list:
    """The HParams plugin's three summaries: the experiment (the whole :data:`HPARAMS_SCHEMA`, the
    headline marked so that TensorBoard lists and ticks it first), this run's values, its end."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    placeholder = {k: ("" if kind is str else 0.0) for k, kind in HPARAMS_SCHEMA.items()}
    experiment, _, _ = hparams(placeholder, metrics)
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in HPARAMS_HEADLINE
    value.metadata.plugin_data.content = data.SerializeToString()
    _, start, end = hparams(params, metrics)
    return [experiment, start, end]


def run_metrics(table, failed: int) -> dict:
    """The HParams metrics, from the group table (query group x training group).

    ``metrics/mean_top1_margin``: mean over query groups of (best - second best training-group score);
    ``metrics/top1_group_match``: of the query groups that share a name with a training group, the
    share whose best training group is their own (only where names are shared);
    ``metrics/failed_targets``: targets that failed.
    """
    group = table.group_level()
    margins, matches = [], []
    for r, name in enumerate(group.row_ids):
        row = group.scores[r].double()
        finite = torch.isfinite(row)
        if int(finite.sum()) >= 2:
            top = torch.topk(row[finite], 2).values
            margins.append(float(top[0] - top[1]))
        if name in group.col_ids and bool(finite.any()):
            best = int(torch.argmax(torch.where(finite, row, torch.tensor(-math.inf, dtype=row.dtype))))
            matches.append(float(group.col_ids[best] == name))
    metrics = {"metrics/failed_targets": float(failed)}
    if margins:
        metrics["metrics/mean_top1_margin"] = sum(margins) / len(margins)
    if matches:
        metrics["metrics/top1_group_match"] = sum(matches) / len(matches)
    return metrics


class RunBoard:
    """What one run writes to TensorBoard besides Lightning (see the module docstring for the tags)."""

    def __init__(self, logger, plan, kind: str = "unlearning", formula: str = "", log_every_n_steps: int = 1):
        self.logger, self.plan, self.kind, self.formula = logger, plan, kind, formula
        # the ascent curve is written at run-level steps that are multiples of this, and at each target's last step
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        self.tb = None
        self._curves: dict[str, list] = {}
        self._seen: set = set()  # (tag, step) of the events an interrupted run left (open)
        self._next = (0, 0)  # (position, run-level step) where the next target's curve starts
        self._group_index = _members(plan.eval_corpus.group_column())

    # -- opening ---------------------------------------------------------------------------------------
    def open(self) -> "RunBoard":
        """Create the run's event file; a resumed run first copies the killed run's events into it (so the
        run keeps one event file) and drops the old files. Then the custom-scalars layout (once)."""
        log_dir = Path(self.logger.log_dir) if isinstance(self.logger, RunLogger) else None
        old = sorted(log_dir.glob("events.out.tfevents*")) if log_dir is not None and log_dir.is_dir() else []
        self.tb = _writer(self.logger)
        if self.tb is None:
            return self
        self._seen = seen = self._merge(old) if old else set()
        if CUSTOM_SCALARS_TAG not in {tag for tag, _ in seen}:
            self.tb.add_custom_scalars(self.layout())
        self.tb.flush()
        return self

    def _merge(self, files: list[Path]) -> set:
        """Copy the events of ``files`` (an interrupted run's) into the new event file, each (tag, step)
        once, then delete them."""
        try:  # raw records: EventFileLoader would turn the scalars into tensor summaries
            from tensorboard.backend.event_processing.event_file_loader import (
                RawEventFileLoader,
            )
            from tensorboard.compat.proto.event_pb2 import Event
        except ImportError:  # tensorboardX only: the old files stay next to the new one
            return set()
        file_writer = self.tb._get_file_writer()
        seen: set = set()
        for path in files:
            try:
                for record in RawEventFileLoader(str(path)).Load():
                    event = Event.FromString(record)
                    if event.HasField("file_version") or not event.HasField("summary"):
                        continue
                    keys = {(value.tag, event.step) for value in event.summary.value}
                    if keys <= seen:
                        continue
                    seen |= keys
                    file_writer.add_event(event)
            except Exception as exc:  # noqa: BLE001 - a torn last record of a killed run: keep what was read
                log.debug("reading %s stopped: %s", path, exc)
        file_writer.flush()
        for path in files:
            path.unlink(missing_ok=True)
        return seen

    def layout(self) -> dict:
        scores = {"mean score per evaluation group, by target (x: target position)": ["Multiline", [r"target/group_score/.*"]]}
        if self.kind != "unlearning":
            return {"Scores": scores}
        return {
            "Unlearning": {
                "ascent loss, all targets (x: the run's unlearning step)": ["Multiline", ["unlearning/ascent_loss"]],
                "target's own loss at its first and last step (x: target position)": ["Multiline", [r"target/own_loss_.*"]],
                "optimizer steps per target": ["Multiline", ["target/optimizer_steps"]],
            },
            "Scores": scores,
        }

    # -- targets -----------------------------------------------------------------------------------------
    def hold_curve(self, target_id: str, curve: list) -> None:
        """The target's per-step ascent losses (tensors), logged once the target is finished."""
        self._curves[target_id] = list(curve)

    def target_finished(self, target, steps: dict, row: Optional[torch.Tensor]) -> None:
        """Log a finished (persisted) target: its curve at the run's steps, its own loss, its group scores.

        ``steps``: the optimizer steps of the targets so far (every target before this one in plan
        order is finished, in this run or the one it resumes)."""
        curve = self._curves.pop(target.id, [])
        if self.logger is None or ("target/optimizer_steps", target.position) in self._seen:
            return  # no logger, or already in the interrupted run's events (merged by open)
        taken = int(steps.get(target.id, len(curve)))
        values = torch.stack(curve).double().cpu().tolist()[:taken] if curve else []  # one host sync per target
        if self._next[0] == target.position:  # the usual case, targets in plan order: no sum over all before
            offset = self._next[1]
        else:
            offset = sum(int(steps.get(t.id, 0)) for t in self.plan.targets[: target.position])
        self._next = (target.position + 1, offset + taken)
        every = self.log_every_n_steps
        for i, value in enumerate(values):
            if (offset + i) % every == 0 or i == len(values) - 1:
                self.logger.log_metrics({"unlearning/ascent_loss": value}, step=offset + i)
        metrics = {"target/optimizer_steps": float(taken)}
        if values:
            metrics.update({"target/own_loss_first": values[0], "target/own_loss_last": values[-1]})
        metrics.update(self._group_scores(row))
        self.logger.log_metrics(metrics, step=target.position)
        if self.tb is not None:
            self.tb.flush()

    def _group_scores(self, row: Optional[torch.Tensor]) -> dict:
        if row is None or not bool(torch.isfinite(row).all()):
            return {}
        row = row.double()
        groups = list(self._group_index.items())[:MAX_GROUP_TAGS]
        return {f"target/group_score/{g}": float(row[index].mean()) for g, index in groups}

    def all_targets(self, matrix: torch.Tensor) -> None:
        """Group scores of every target at once (the baselines score all targets in one pass)."""
        if self.logger is None:
            return
        for target in self.plan.targets:
            metrics = self._group_scores(matrix[target.position])
            if metrics:
                self.logger.log_metrics(metrics, step=target.position)

    # -- results -----------------------------------------------------------------------------------------
    def results(self, table, rankings: dict, group_md: str) -> None:
        """Histograms and the Text tab: the run summary, the group table, the queries, the top-k."""
        tb = self.tb if self.tb is not None else _writer(self.logger)
        if tb is None:
            return
        columns = _members(table.col_groups)
        col_groups = list(columns)
        row_sets = list(_members(table.row_groups).items())[:MAX_GROUP_TAGS]
        for step, cols in enumerate(columns.values()):  # step i = training group i: one band per group in Distributions
            block = table.scores[:, cols]
            for tag, values in [("scores/all", block)] + [(f"scores_by_group/{name}", block[rows]) for name, rows in row_sets]:
                values = values[torch.isfinite(values)]
                if values.numel():
                    tb.add_histogram(tag, values, step)
        failed = rankings.get("failed_targets") or {}
        summary = [
            f"**{table.method}**: {table.scores.shape[0]} {table.row_unit} rows × {table.scores.shape[1]} {table.col_unit} columns, "
            f"{len(self.plan.targets)} targets ({self.plan.target_unit}), {len(failed)} failed.",
            "",
        ]
        if self.formula:
            unit = "query subset" if self.plan.targets_are_rows and self.plan.target_unit == "group" else "query"
            summary += [self.formula.replace("{query}", unit), ""]
        summary += [f"Sign: {rankings.get('sign', '')}.", "",
                    "Histograms `scores/all` and `scores_by_group/<query group>`: step i = training group i: "
                    + ", ".join(f"{i} = {g}" for i, g in enumerate(col_groups)) + "."]
        if failed:
            summary += ["", "Failed targets: " + ", ".join(f"{k} ({v.get('reason')})" for k, v in failed.items())]
        tb.add_text("run/summary", "\n".join(summary), 0)
        tb.add_text("rankings/group_scores", group_md, 0)
        tb.add_text("rankings/queries", self._queries(), 0)
        tb.add_text("rankings/top_k", self._top_k(rankings), 0)
        tb.flush()

    def _queries(self) -> str:
        corpus = self.plan.query_corpus
        if corpus is None:
            return "(no query texts)"
        lines = ["| query | group | text |", "|---|---|---|"]
        for i, record in enumerate(corpus.records[:MAX_QUERY_ROWS]):
            lines.append(f"| {_cell(record['id'])} | {_cell(record['group'])} | {_cell(corpus.text_of(i))} |")
        if len(corpus.records) > MAX_QUERY_ROWS:
            lines.append(f"\n… and {len(corpus.records) - MAX_QUERY_ROWS} more queries (rankings.json)")
        return "\n".join(lines)

    @staticmethod
    def _top_k(rankings: dict) -> str:
        queries = rankings.get("queries", [])
        blocks = []
        for query in queries[:MAX_TEXT_QUERIES]:
            head = f"**{_cell(query['query_id'])}** ({_cell(query['query_group'])})"
            if query.get("query_text"):
                head += f": {_cell(query['query_text'])}"
            if query.get("failed"):
                head += " — failed"
            lines = [head, "", "| rank | training unit | group | score | text |", "|---|---|---|---|---|"]
            for item in query["top"]:
                lines.append(f"| {item['rank']} | {_cell(item['id'])} | {_cell(item['group'])} | {item['score']:.4g} | {_cell(item.get('text', ''))} |")
            blocks.append("\n".join(lines))
        if len(queries) > MAX_TEXT_QUERIES:
            blocks.append(f"… and {len(queries) - MAX_TEXT_QUERIES} more queries (rankings.json)")
        return "\n\n".join(blocks) or "(no queries)"

    # -- the end -----------------------------------------------------------------------------------------
    def finish(self, ctx, method, table, memory: dict) -> None:
        """Memory, the baselines' per-target group scores, HParams with the run's metrics; then close."""
        if self.logger is None:
            return
        peaks = {f"memory/{phase}_peak_gb": float(v["peak_gb"]) for phase, v in memory.items() if isinstance(v, dict) and "peak_gb" in v}
        if peaks:
            self.logger.log_metrics(peaks, step=0)
        if method.kind != "unlearning":
            self.all_targets(ctx.writer.matrix)
        metrics = run_metrics(table, len(ctx.writer.failed))
        params = run_hparams(ctx, method)
        self.logger.log_metrics(metrics, step=0)
        tb = self.tb if self.tb is not None else _writer(self.logger)
        if tb is not None and hasattr(tb, "_get_file_writer"):
            file_writer = tb._get_file_writer()
            for summary in hparams_summaries(params, metrics):
                file_writer.add_summary(summary, 0)
            if isinstance(getattr(self.logger, "hparams", None), dict):
                self.logger.hparams.update(params)  # hparams.yaml
        else:  # another logger (CSV, W&B, ...): its own hyperparameter record
            self.logger.log_hyperparams(params)

    def close(self, status: str = "success") -> None:
        if isinstance(self.logger, RunLogger):
            self.logger.close_run(status)
        elif self.logger is not None:
            self.logger.finalize(status)
