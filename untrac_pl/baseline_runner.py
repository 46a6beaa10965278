"""Gradient/Hessian baselines (GradDot, GradCos, TracIn, HIF LiSSA/Arnoldi, EK-FAC) behind ``untrac-pl attribute``.

``attribution.method: graddot | gradcos | tracin | hif_lissa | hif_arnoldi | ekfac`` runs
:func:`untrac_pl.baselines.compute_baseline_scores` on the model of the ``model:`` section with the
data of the ``data:`` section (same tokenised corpora and collator as UnTrac), and writes the same
outputs as UnTrac / UnTrac-Inv through the same :class:`~untrac_pl.callbacks.rankings.RankingWriter`:
``scores.safetensors`` (query-major ScoreTable, positive = the training unit helped the query),
``rankings.json``, ``group_scores.csv``/``.md``, ``summary.json``, ``memory.json`` (+ ``config.yaml``).

Units (``attribution.target_unit``): ``example`` -> rows = queries, columns = training examples;
``group`` -> rows = query subsets (the subset's gradient = the mean of its examples' gradients),
columns = training examples. The group tables average the example scores over training groups
(exact for the bilinear GradDot/HIF/TracIn-query side); the baseline's own group x group matrix, with
GradCos/TracIn normalising each training GROUP's mean gradient (docs/baselines.md), is saved as
``baseline_group_scores.safetensors``.

Options (``attribution.baseline``, passed to ``compute_baseline_scores``): e.g. ``params`` (name
filter), ``projection_dim``, ``batch_size``, ``iterations``, ``top_k``, ``damping``,
``checkpoints: [{path: .../model.safetensors, lr: 0.001}, ...]`` (TracIn), plus
``hessian_samples_per_group: N`` (HIF: the Hessian of a balanced N-per-group subset of the training
data instead of all of it). An option the method does not take is refused up front
(:class:`~untrac_pl.baselines.options.BaselineOptionError`, naming ``attribution.baseline.<key>`` and
listing the method's options). Models are built with ``attn_implementation: eager`` (needed by ``vmap``)
unless the config says otherwise.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from untrac_pl.callbacks.memory import MemoryMonitor
from untrac_pl.callbacks.rankings import RankingWriter
from untrac_pl.io import StagedDirectory, write_json_atomic, write_text_atomic
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import Target

log = logging.getLogger(__name__)

BASELINE_METHODS = ("graddot", "gradcos", "tracin", "hif_lissa", "hif_arnoldi", "ekfac")

# options handled here (not by compute_baseline_scores)
_LOCAL_OPTIONS = ("hessian_samples_per_group",)


class BaselineRankingWriter(RankingWriter):
    """The engine's writer; only the sign note in ``rankings.json`` speaks of gradients, not unlearning."""

    def rankings(self, table: ScoreTable) -> dict:
        out = super().rankings(table)
        out["sign"] = ("positive = the training unit helped produce the query (its gradient is aligned with the "
                       "query's: a descent step on it lowers the query loss)")
        return out


def is_baseline(method: str) -> bool:
    return method in BASELINE_METHODS


def _checkpoints(value) -> list:
    """``[{path, lr}]`` / ``[[path, lr]]`` -> ``[(path, lr)]`` for TracIn."""
    out = []
    for item in value or []:
        if isinstance(item, dict):
            if "path" not in item or "lr" not in item:
                raise ValueError(f"attribution.baseline.checkpoints entries need 'path' and 'lr', got {item}")
            path, lr = item["path"], item["lr"]
        else:
            path, lr = item
        if not Path(str(path)).exists():
            raise FileNotFoundError(f"TracIn checkpoint '{path}' does not exist")
        out.append((str(path), float(lr)))
    return out


def _device(trainer_kwargs: dict) -> torch.device:
    accelerator = str(trainer_kwargs.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class BaselineRunner:
    """One baseline attribution: data + model as for UnTrac, scores from ``compute_baseline_scores``."""

    def __init__(self, module, datamodule, config, trainer_kwargs: Optional[dict] = None):
        if not is_baseline(config.method):
            raise ValueError(f"'{config.method}' is not a baseline method ({', '.join(BASELINE_METHODS)})")
        self.module, self.datamodule, self.config = module, datamodule, config
        self.trainer_kwargs = dict(trainer_kwargs or {})
        from untrac_pl.baselines.options import check_options

        # a typo or another method's option fails here, before any data or model is loaded, naming the field
        self.options = check_options(config.method, config.baseline, where="attribution.baseline", runner=True)
        self.writer = BaselineRankingWriter(top_k=config.top_k, snippet_chars=config.snippet_chars)
        self.memory = MemoryMonitor()
        spec = module.model_spec
        if getattr(spec, "attn_implementation", None) is None and module.net is None:
            module.model_spec = replace(spec, attn_implementation="eager")  # vmap per-example gradients

    # -- set-up (shared with the engine: clamping, tokenisation) -----------------------------------
    def prepare(self):
        from untrac_pl.engine import AttributionPlan, AttributionRunner, target_seed

        self.datamodule.load_records()
        self.module.load_model(self.datamodule.all_texts())
        AttributionRunner._clamp_max_length(self)  # same clamping and warning as UnTrac
        self.datamodule.tokenize(self.module.tokenizer)
        train, queries = self.datamodule.train_corpus, self.datamodule.query_corpus
        if self.config.target_unit == "group":
            members = queries.group_members()
            targets = [Target(g, idx, target_seed(self.config.seed, g)) for g, idx in members.items()]
            groups = [t.id for t in targets]
        else:
            targets = [Target(rid, [i], target_seed(self.config.seed, rid)) for i, rid in enumerate(queries.ids)]
            groups = [r["group"] for r in queries.records]
        for position, target in enumerate(targets):
            target.position, target.total = position, len(targets)
        # rows = queries (or query subsets), columns = training examples: the UnTrac-Inv layout
        return AttributionPlan(self.config.method, targets, queries, train, self.config.target_unit, groups, True, queries)

    def _options(self) -> dict:
        from untrac_pl.data.tokenize import sample_per_group, tokenize_records

        opts = {k: v for k, v in self.options.items() if k not in _LOCAL_OPTIONS}
        if self.config.method == "tracin":
            opts["checkpoints"] = _checkpoints(opts.get("checkpoints"))
            if not opts["checkpoints"]:
                raise ValueError("method tracin needs attribution.baseline.checkpoints: [{path: <weights .safetensors>, lr: <float>}, ...]")
        hessian_n = self.options.get("hessian_samples_per_group")
        if hessian_n is not None and "hessian_batches" not in opts:
            records = sample_per_group(self.datamodule.train_corpus.records, int(hessian_n), self.config.seed + 1)
            opts["hessian_batches"] = tokenize_records(records, self.module.tokenizer, self.datamodule.max_length, "Hessian data").examples
        opts.setdefault("pad_token_id", self.module.tokenizer.pad_token_id)
        return opts

    # -- run ---------------------------------------------------------------------------------------
    def run(self, write: bool = True, extra_files: Optional[dict] = None):
        from untrac_pl.baselines import compute_baseline_scores
        from untrac_pl.engine import AttributionResult, _versions
        from untrac_pl.experiments.methods import eager_attention

        started = time.perf_counter()
        staged = StagedDirectory(Path(self.config.output_dir), overwrite=self.config.overwrite) if write else None
        plan = self.prepare()  # all validation before any output exists
        opts = self._options()
        run_dir = staged.open() if staged else None
        self.writer.begin(plan, run_dir)
        net = self.module.net
        device = _device(self.trainer_kwargs)
        net.to(device)
        self.memory.model = MemoryMonitor.footprint(net)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train, queries = self.datamodule.train_corpus, self.datamodule.query_corpus
        train_groups = [r["group"] for r in train.records]
        query_groups = [r["group"] for r in queries.records]
        t0 = time.perf_counter()
        with eager_attention(net):
            out = compute_baseline_scores(
                self.config.method, net, train.examples, queries.examples,
                train_groups=train_groups if self.config.target_unit == "example" else None,
                query_groups=query_groups, **opts,
            )
        seconds = time.perf_counter() - t0
        if self.config.target_unit == "group":
            matrix = out["group_scores"]  # [query subsets, training examples]
        else:
            matrix = out["example_scores"]
            if matrix is None:
                raise ValueError(f"{self.config.method} returned no example-level scores with these options "
                                 "(e.g. query_ihvp: group); use attribution.target_unit: group")
        self.writer.matrix = matrix.detach().float().cpu().clone()
        bad = ~torch.isfinite(self.writer.matrix)
        for position in torch.nonzero(bad.any(dim=1)).flatten().tolist():
            self.writer.failed[plan.targets[position].id] = {"reason": "non-finite baseline scores", "step": None}
        self.memory.device_kind = device.type
        self.memory.peaks["baseline"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes())
        memory = self.memory.report()
        if device.type == "cpu":
            memory["baseline"]["measure"] = "process peak RSS (getrusage)"
        info = _jsonable(out.get("info", {}))
        metadata = {
            "method": plan.method,
            "target_unit": plan.target_unit,
            "num_targets": len(plan.targets),
            "num_eval_examples": len(plan.eval_corpus),
            "baseline": _jsonable({k: v for k, v in self.options.items()}),
            "baseline_info": {k: v for k, v in info.items() if k not in ("seconds", "param_names")},
            "model": _jsonable(self.module.model_spec),
            "seed": self.config.seed,
            "max_length": self.datamodule.max_length,
            "truncated": {"training data": train.num_truncated, "queries": queries.num_truncated},
            "precision": str(self.trainer_kwargs.get("precision", "32-true")),
            "versions": _versions(),
            "failed_targets": self.writer.ordered_failed(),
        }
        timings = {"baseline_s": seconds, "total_s": time.perf_counter() - started, "num_targets": len(plan.targets)}
        if not write:
            return AttributionResult(self.writer.table(metadata), None, self.writer.ordered_failed(), memory, timings)
        try:
            table = self.writer.write_outputs(metadata, None)
            if self.config.target_unit == "example" and out.get("group_scores") is not None:
                rows = [str(g) for g in out["query_groups"]]
                cols = [str(g) for g in out["train_groups"]]
                native = ScoreTable(out["group_scores"].float(), rows, rows, cols, cols, "group", "group", plan.method,
                                    {"note": "the baseline's own group rule (docs/baselines.md)", "method": plan.method})
                native.save(run_dir / "baseline_group_scores.safetensors")
            write_json_atomic(run_dir / "memory.json", memory)
            for name, text in dict(extra_files or {}).items():
                write_text_atomic(run_dir / name, text)
            timings["total_s"] = time.perf_counter() - started
            write_json_atomic(run_dir / "summary.json", {**metadata, "num_failed": len(self.writer.failed),
                                                         "num_succeeded": len(plan.targets) - len(self.writer.failed),
                                                         "param_names": info.get("param_names"), "timings": timings,
                                                         "memory": memory, "completed": True})
        except BaseException:
            staged.discard()
            raise
        return AttributionResult(table, staged.commit(), self.writer.ordered_failed(), memory, timings)


def _jsonable(value):
    import math
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    return str(value)
