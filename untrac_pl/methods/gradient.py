"""The gradient and Hessian baselines (GradDot, GradCos, TracIn, HIF LiSSA/Arnoldi, EK-FAC) as methods.

Each baseline is a :class:`GradientMethod`: a scoring function of :mod:`untrac_pl.baselines` (the
math, on ``torch.func``) plus its options. Behind ``untrac-pl attribute`` (``attribution.method:
graddot | ...``) the run shell hands it the same tokenised corpora as UnTrac and writes the same
files: rows = queries (``target_unit: example``) or query subsets (``group``: the subset's gradient is
the mean of its examples'), columns = training examples; group tables average example scores over
training groups (exact for the bilinear GradDot/HIF/TracIn-query side). The baseline's own group ×
group matrix, with GradCos/TracIn normalising each training GROUP's mean gradient
(docs/baselines.md), is saved as ``baseline_group_scores.safetensors``; a reproduction compares that
native group table with the ground truth.

Options (``attribution.baseline``, or ``methods[<label>].options`` in a reproduction) are the fields
of each method's ``Options`` dataclass, checked up front (:mod:`untrac_pl.methods.options`).
Models are built with ``attn_implementation: eager`` (needed by ``vmap``) unless the config says otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, field, make_dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Optional, Sequence

import torch

from untrac_pl.baselines.ekfac import ekfac_scores
from untrac_pl.baselines.scores import gradcos, graddot, hif_arnoldi, hif_lissa, tracin
from untrac_pl.console import Progress
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.tokenize import sample_per_group, tokenize_records
from untrac_pl.errors import MethodOptionError
from untrac_pl.methods.base import AttributionMethod, RunContext, query_targets
from untrac_pl.methods.options import check_options
from untrac_pl.methods.registry import (
    canonical_name,
    get_method,
    method_names,
    register,
)
from untrac_pl.outputs import BASELINE_GROUP_SCORES
from untrac_pl.runtime import json_safe, peak_rss_bytes, resolve_device
from untrac_pl.scores import ScoreTable
from untrac_pl.vocabulary import option

log = logging.getLogger(__name__)

# -- options -----------------------------------------------------------------------------------------
_SETUP = [  # every per-example-gradient method (untrac_pl.baselines.scores._Setup)
    ("params", Any, None, "parameters to take gradients of: null (every trainable one; LoRA: the adapters), a regex, "
                          "or a list of module-name prefixes"),
    ("projection_dim", Optional[int], None, "random projection of the gradients to this many dimensions (null: none)"),
    ("projection_kind", str, "rademacher", "rademacher or gaussian"),
    ("projection_seed", int, 0, "seed of the projection"),
    ("batch_size", int, 8, "examples per gradient batch (memory: batch_size x parameters floats)"),
    ("pad_token_id", int, 0, "padding id (set from the tokenizer)"),
    ("use_vmap", bool, True, "per-example gradients with torch.func.vmap (a loop is the fallback)"),
    ("vmap_chunk_size", Optional[int], None, "vmap chunk size (null: the whole batch)"),
    ("group_normalize", str, "group", "GradCos/TracIn group rule: group (normalise the group's mean gradient) or example"),
]
_DAMPING = [
    ("damping", Optional[float], None, "Hessian damping λ (null: from the extreme eigenvalues, untrac_pl.baselines.hessian)"),
    ("damping_floor", float, 1e-3, "smallest automatic damping"),
    ("damping_margin", float, 0.01, "automatic damping = margin above the most negative curvature"),
]
_HESSIAN_SUBSET = [
    ("hessian_samples_per_group", Optional[int], None,
     "the Hessian of a balanced N-per-group subset of the training data instead of all of it (cheaper)"),
]


def _options_class(method: str, own: list, shared: bool = True, runner: list = ()) -> type:
    specs = list(own) + (_SETUP if shared else []) + list(runner)
    runner_names = {name for name, *_ in runner}
    cls = make_dataclass(
        f"{method.title().replace('_', '')}Options",
        [(name, kind, field(default=default, metadata={"doc": doc, "runner": name in runner_names})) for name, kind, default, doc in specs],
    )
    cls.__doc__ = f"Options of {method}.\n\nArgs:\n" + "\n".join(f"    {name}: {doc}" for name, _, _, doc in specs)
    return cls


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


def _checkpoints(value) -> list:
    """``[{path, lr}]`` / ``[[path, lr]]`` -> ``[(path, lr)]`` for TracIn."""
    out = []
    for item in value or []:
        if isinstance(item, dict):
            if "path" not in item or "lr" not in item:
                raise ValueError(f"{option('options.checkpoints')} entries need 'path' and 'lr', got {item}")
            path, lr = item["path"], item["lr"]
        else:
            path, lr = item
        if not Path(str(path)).exists():
            raise FileNotFoundError(f"TracIn checkpoint '{path}' does not exist")
        out.append((str(path), float(lr)))
    return out


# the sign note of rankings.json for methods that take gradients instead of unlearning
GRADIENT_SIGN = ("positive = the training unit helped produce the query (its gradient is aligned with the "
                 "query's: a descent step on it lowers the query loss)")


class _TrainingPasses:
    """The baseline's progress bar over its training-gradient batches (``progress`` of
    :class:`untrac_pl.baselines.scores._Setup`), ``passes`` passes (TracIn: one per checkpoint)."""

    def __init__(self, display: str, passes: int, enabled: bool = True):
        self.display, self.passes, self.enabled = display, max(1, int(passes)), bool(enabled)
        self.bar: Optional[Progress] = None
        self.done_passes = 0

    def __call__(self, done: int, per_pass: Optional[int]) -> None:
        if self.bar is None:
            total = per_pass * self.passes if per_pass else None
            self.bar = Progress(f"{self.display} training gradients", total=total, unit="batch", lines=4, enabled=self.enabled)
        elif done == 1:
            self.done_passes += 1
        self.bar.update((self.done_passes * (per_pass or 0) + done) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _HessianStages:
    """HIF's Hessian work as progress bars, one per stage (eigenvalue estimate, LiSSA or Arnoldi iterations)."""

    def __init__(self, display: str, enabled: bool = True):
        self.display, self.enabled = display, bool(enabled)
        self.stage: Optional[str] = None
        self.bar: Optional[Progress] = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = Progress(f"{self.display} {stage}", total=total, unit="hvp", lines=4, enabled=self.enabled)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GradientMethod(AttributionMethod):
    """A baseline scored in one pass at θ0: ``fn(model, train, queries, train_groups=, query_groups=, **options)``."""

    kind = "gradient"
    sign = GRADIENT_SIGN
    fn: Callable = None

    # fn streams the training gradients through baselines.scores._Setup and takes its progress hooks
    # (``progress``; HIF also ``hessian_progress``) and ``example_scores``: the built-in per-example-gradient methods set these
    streams_training: ClassVar[bool] = False
    iterates_hessian: ClassVar[bool] = False

    def passes(self, options: dict) -> int:
        """How many passes over the training batches ``fn`` makes (TracIn: one per checkpoint)."""
        return 1

    def compute(self, model, train, queries, *, train_groups=None, query_groups=None, **options) -> dict:
        return type(self).fn(model, train, queries, train_groups=train_groups, query_groups=query_groups, **options)

    # -- options the method's own code resolves -----------------------------------------------------
    def scoring_options(self, options: dict, tokenizer, train_records: list[dict], max_length: int, seed: int) -> dict:
        """The options as the scoring function takes them (runner options resolved, padding id set)."""
        opts = dict(options)
        hessian_n = opts.pop("hessian_samples_per_group", None)
        if hessian_n is not None and "hessian_batches" not in opts:
            # a balanced subset of the training side defines the Hessian (HIF): keeps LiSSA/Arnoldi cheap
            records = sample_per_group(train_records, int(hessian_n), seed + 1)
            opts["hessian_batches"] = tokenize_records(records, tokenizer, max_length, "Hessian data").examples
        opts.setdefault("pad_token_id", tokenizer.pad_token_id)
        return opts

    @contextlib.contextmanager
    def _progress(self, options: dict, enabled: bool):
        """``options`` with the progress hooks the scoring function takes; the bars close afterwards."""
        bar = _TrainingPasses(self.display, self.passes(options), enabled=enabled)
        hessian = _HessianStages(self.display, enabled=enabled)
        options = dict(options)
        if self.streams_training:
            options["progress"] = bar
        if self.iterates_hessian:
            options["hessian_progress"] = hessian
        try:
            yield options
        finally:
            hessian.close()
            bar.close()

    # -- the run shell's hooks ------------------------------------------------------------------------
    def configure_model(self, module) -> None:
        spec = module.model_spec
        if getattr(spec, "attn_implementation", None) is None and module.net is None:
            module.model_spec = replace(spec, attn_implementation="eager")  # vmap per-example gradients

    def plan(self, config, datamodule, module):
        # rows = queries (or query subsets), columns = training examples: the UnTrac-Inv layout
        return query_targets(self.name, datamodule.query_corpus, datamodule.train_corpus, config.target_unit, config.seed)

    def theta0(self, ctx: RunContext) -> None:
        net = ctx.module.net
        device = torch.device(resolve_device(str(ctx.trainer_kwargs.get("accelerator", "auto")).lower()))
        net.to(device)
        ctx.memory.set_model(net)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ctx.device = device

    def score_targets(self, ctx: RunContext) -> None:
        module, datamodule, config = ctx.module, ctx.datamodule, ctx.config
        train, queries = datamodule.train_corpus, datamodule.query_corpus
        opts = self.scoring_options(ctx.options, module.tokenizer, train.records, datamodule.max_length, config.seed)
        t0 = time.perf_counter()
        with self._progress(opts, ctx.trainer_kwargs.get("enable_progress_bar", True)) as opts, eager_attention(module.net):
            out = self.compute(
                module.net, train.examples, queries.examples,
                train_groups=train.group_column() if config.target_unit == "example" else None,
                query_groups=queries.group_column(), **opts,
            )
        ctx.timings["baseline_s"] = time.perf_counter() - t0
        if config.target_unit == "group":
            matrix = out["group_scores"]  # [query subsets, training examples]
        else:
            matrix = out["example_scores"]
            if matrix is None:
                raise ValueError(f"{self.name} returned no example-level scores with these options "
                                 "(e.g. query_ihvp: group); use attribution.target_unit: group")
        ctx.writer.set_matrix(matrix)
        bad = ~torch.isfinite(ctx.writer.matrix)
        for position in torch.nonzero(bad.any(dim=1)).flatten().tolist():
            ctx.writer.note_failed(ctx.plan.targets[position].id, {"reason": "non-finite baseline scores", "step": None})
        device = ctx.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
        ctx.memory.record_peak("baseline", peak, device.type, None if device.type == "cuda" else "process peak RSS (getrusage)")
        ctx.output = out
        if config.target_unit == "example" and out.get("group_scores") is not None:
            rows = [str(g) for g in out["query_groups"]]
            cols = [str(g) for g in out["train_groups"]]
            ctx.native = ScoreTable(out["group_scores"].float(), rows, rows, cols, cols, "group", "group", self.name,
                                    {"note": "the baseline's own group rule (docs/baselines.md)", "method": self.name})

    def metadata(self, ctx: RunContext) -> tuple[dict, dict]:
        info = json_safe(ctx.output.get("info", {}))
        return ({"baseline": json_safe(dict(ctx.options)),
                 "baseline_info": {k: v for k, v in info.items() if k not in ("seconds", "param_names")}}, {})

    def summary(self, ctx: RunContext) -> dict:
        failed = ctx.writer.failed
        return {"num_failed": len(failed), "num_succeeded": len(ctx.plan.targets) - len(failed),
                "param_names": json_safe(ctx.output.get("info", {})).get("param_names")}

    def extra_outputs(self, ctx: RunContext) -> None:
        if ctx.native is not None:
            ctx.native.save(ctx.run_dir / BASELINE_GROUP_SCORES)

    # -- reproduction ----------------------------------------------------------------------------------
    def reproduction_options(self, options: dict, ctx) -> dict:
        """Options a reproduction supplies itself (TracIn: θ0's training checkpoints)."""
        return options

    def reproduction_table(self, spec, ctx) -> ScoreTable:
        """The method on θ0 at group level (training group × test subset), by its own group rule."""
        # the same sampling and tokenisation as every other front end (data.samples_per_group of untrac-pl attribute)
        datamodule = AttributionDataModule.from_records(ctx.train_records, ctx.query_records, max_length=ctx.max_length,
                                                        sample_seed=ctx.seed, **asdict(spec.data))
        datamodule.load_records()
        datamodule.connect(ctx.tokenizer)
        train, train_corpus, query_corpus = datamodule.train_records, datamodule.train_corpus, datamodule.query_corpus
        options = self.reproduction_options(check_options(self.name, spec.options, where=f"methods[{spec.key}].options", runner=True), ctx)
        options = self.scoring_options(options, ctx.tokenizer, train, ctx.max_length, ctx.seed)
        with self._progress(options, ctx.trainer_kwargs.get("enable_progress_bar", True)) as options, eager_attention(ctx.net):
            out = self.compute(ctx.net, train_corpus.examples, query_corpus.examples,
                               train_groups=[r["group"] for r in train], query_groups=[r["group"] for r in query_corpus.records],
                               **({"example_scores": False} if self.streams_training else {}),  # group matrix only: from group mean gradients
                               **options)
        rows = [str(r) for r in out["query_groups"]]  # out["group_rows"]/["group_cols"] name the units, not the groups
        cols = [str(c) for c in out["train_groups"]]
        return ScoreTable(out["group_scores"].float().cpu(), rows, rows, cols, cols, "group", "group", spec.key, {"info": out.get("info", {})})


# -- the six baselines ---------------------------------------------------------------------------------
@register
class GradDot(GradientMethod):
    """``g_q . g_t`` (an SGD step on ``t`` lowers the query loss by ``lr * g_q . g_t``)."""

    name, display = "graddot", "GradDot"
    streams_training = True
    fn = graddot
    Options = _options_class("graddot", [])


@register
class GradCos(GradientMethod):
    """``g_q . g_t / (|g_q| |g_t|)``."""

    name, display = "gradcos", "GradCos"
    streams_training = True
    fn = gradcos
    Options = _options_class("gradcos", [])


@register
class TracIn(GradientMethod):
    """``sum_c lr_c * g_q^c . g_t^c / |g_t^c|`` over training checkpoints ``c``."""

    name, display, aliases = "tracin", "TracIn", ("tracincp",)
    streams_training = True
    fn = tracin
    Options = _options_class("tracin", [
        ("checkpoints", Optional[list], None, "training checkpoints [{path: .../model.safetensors, lr: <the lr that step used>}, ...]"),
        ("normalize_train", bool, True, "normalise the training gradients (the paper); false: captum's TracInCP"),
    ])

    def reproduction_options(self, options: dict, ctx) -> dict:
        return {**options, "checkpoints": options.get("checkpoints") or list(ctx.checkpoints)}

    def check(self, config, module, trainer_kwargs: dict) -> None:
        # the checkpoints exist and carry their lr, before any output folder is staged
        if not _checkpoints((config.baseline or {}).get("checkpoints")):
            raise ValueError(f"method tracin needs {option('options.checkpoints')}: [{{path: <weights .safetensors>, lr: <float>}}, ...]")

    def passes(self, options: dict) -> int:
        return len(options.get("checkpoints") or []) or 1

    def scoring_options(self, options, tokenizer, train_records, max_length, seed) -> dict:
        opts = super().scoring_options(options, tokenizer, train_records, max_length, seed)
        opts["checkpoints"] = _checkpoints(opts.get("checkpoints"))
        if not opts["checkpoints"]:
            raise ValueError(f"method tracin needs {option('options.checkpoints')}: [{{path: <weights .safetensors>, lr: <float>}}, ...]")
        return opts


@register
class HifLissa(GradientMethod):
    """``g_q^T (H + λI)^{-1} g_t``, the inverse-Hessian product by LiSSA."""

    name, display, aliases = "hif_lissa", "HIF (LiSSA)", ("lissa",)
    streams_training = iterates_hessian = True
    fn = hif_lissa
    Options = _options_class("hif_lissa", [
        ("iterations", int, 10, "LiSSA iterations"),
        ("scale", Optional[float], None, "LiSSA scale (null: 1.5 x (|λ_max| + damping))"),
        *_DAMPING,
        ("damping_iterations", int, 20, "power iterations for the automatic damping"),
        ("stochastic", bool, True, "one Hessian batch per iteration (false: the full Hessian each time)"),
        ("hessian_batches", Any, None, "examples whose loss defines the Hessian (null: the training data)"),
        ("seed", int, 0, "seed of the batch order and the eigenvalue estimate"),
        ("hvp_mode", str, "fwd_rev", "Hessian-vector products: fwd_rev or rev_rev"),
        ("query_ihvp", str, "example", "example, or group: only the query groups' mean gradients through LiSSA"),
    ], runner=_HESSIAN_SUBSET)


@register
class HifArnoldi(GradientMethod):
    """HIF through the top Arnoldi eigenpairs of the Hessian."""

    name, display, aliases = "hif_arnoldi", "HIF (Arnoldi)", ("arnoldi", "hif")
    streams_training = iterates_hessian = True
    fn = hif_arnoldi
    Options = _options_class("hif_arnoldi", [
        ("iterations", int, 200, "Arnoldi iterations (paper: 200)"),
        ("top_k", int, 100, "eigenpairs kept (paper: 100)"),
        *_DAMPING,
        ("hessian_batches", Any, None, "examples whose loss defines the Hessian (null: the training data)"),
        ("seed", int, 0, "seed of the start vector"),
        ("select", str, "magnitude", "eigenpairs by magnitude, or largest (algebraically, as captum)"),
        ("hvp_mode", str, "fwd_rev", "Hessian-vector products: fwd_rev or rev_rev"),
    ], runner=_HESSIAN_SUBSET)

    def validate_options(self, options: dict, field_name) -> None:
        if options.get("projection_dim"):
            raise MethodOptionError(f"{field_name('projection_dim')}: hif_arnoldi already scores in the top_k-dimensional "
                                    "eigenbasis; drop projection_dim")


@register
class EKFAC(GradientMethod):
    """EK-FAC influence ``g_q^T G^{-1} g_t`` through kronfluence (optional)."""

    name, display = "ekfac", "EK-FAC"
    fn = ekfac_scores
    Options = _options_class("ekfac", [
        ("batch_size", int, 8, "examples per batch"),
        ("pad_token_id", int, 0, "padding id (set from the tokenizer)"),
        ("damping", Optional[float], None, "damping factor (null: kronfluence's default damping_factor, 1e-8 in 1.0.1)"),
        ("strategy", str, "ekfac", "kronfluence strategy: ekfac, kfac, diagonal, identity"),
        ("output_dir", Optional[str], None, "kronfluence's working folder (null: a temporary one)"),
    ], shared=False)

    @property
    def description(self) -> str:
        return "EK-FAC (kronfluence)"


def compute_baseline_scores(method: str, model: torch.nn.Module, train, queries, *,
                            train_groups: Optional[Sequence[Hashable]] = None,
                            query_groups: Optional[Sequence[Hashable]] = None, **opts) -> dict:
    """Score every training unit against every query unit with a gradient/Hessian baseline.

    ``method``: a registered gradient method (aliases: lissa, arnoldi, tracincp). ``train`` / ``queries``:
    tokenised examples, collated batches or a DataLoader (see :func:`~untrac_pl.baselines._inputs.as_batches`);
    columns/rows follow ``batch['index']`` (else order of appearance). ``train_groups[i]`` /
    ``query_groups[i]``: the group of example ``i``.

    Returns ``{"example_scores": [Q, N], "group_scores": [Qg, K] | None, "train_groups", "query_groups",
    "group_rows", "group_cols", "method", "info"}``. Options the method does not take raise
    :class:`~untrac_pl.errors.MethodOptionError` (a ``ValueError``) listing the ones it does.
    """
    key = canonical_name(method)
    target = get_method(key)
    if target.kind != "gradient":
        raise MethodOptionError(f"'{method}' is not a gradient method; compute_baseline_scores takes "
                                f"{', '.join(method_names('gradient'))}")
    opts = check_options(key, opts)  # an option the method does not take: MethodOptionError, not a TypeError
    return target.compute(model, train, queries, train_groups=train_groups, query_groups=query_groups, **opts)

