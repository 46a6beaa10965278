"""End-to-end reproduction of the paper's experiments at CPU scale.

For every setting (synthetic dataset A/B, or corpus sizes equal/unequal) and every seed:

1. build the data (training groups + test subsets) for that seed;
2. train θ0 from the seed's initialisation for ``fit.max_steps`` steps on the mixture of all groups
   (checkpoints with their learning rate for TracIn);
3. ground truth: retrain from the *same* initialisation for the *same* number of steps without each
   group, ``GT[s, k] = L_s(θ_-k) − L_s(θ0)``;
4. run every method of ``methods:`` (dispatched by name through
   :mod:`untrac_pl.experiments.methods`) on θ0;
5. save every ScoreTable as ``<output_dir>/scores/<setting>/seed<k>/<method>.safetensors``.

Then :func:`untrac_pl.evaluation.evaluate_directory` correlates every score file with the ground
truth and :func:`untrac_pl.evaluation.report.write_report` writes ``metrics.json``, ``results.md`` and
figures. Any ScoreTable file dropped into a seed folder is evaluated too (``evaluate_only: true``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.data.tokenize import tokenize_records
from untrac_pl.evaluation.ground_truth import GROUND_TRUTH, ground_truth_table
from untrac_pl.evaluation.metrics import evaluate_directory
from untrac_pl.evaluation.power import setting_statistics
from untrac_pl.evaluation.report import write_report
from untrac_pl.experiments.datasets import (  # noqa: F401  (the reproduction's data, importable from here as before)
    CorporaData,
    SyntheticData,
    corpora_data,
    corpus_blocks,
    synthetic_data,
)
from untrac_pl.experiments.dose import DoseSpec, run_dose
from untrac_pl.experiments.jobs import FitJob, MethodsJob, check_methods_reach_workers, fit_job, lm_kwargs_of, methods_job, payload_for
from untrac_pl.experiments.methods import MethodData, MethodSpec
from untrac_pl.experiments.pool import JobPool, fit_threads
from untrac_pl.experiments.protocol import (
    LDS_FILE,
    NOISE_DIR,
    ORDERS_DIR,
    Protocol,
    expand_curves,
    lds_jobs,
    lds_record,
    mean_ground_truth,
    unigram_baseline,
)
from untrac_pl.io import write_json_atomic
from untrac_pl.lm import CausalLMModule, LRSchedule, example_losses
from untrac_pl.methods import canonical_name, get_method, method_names
from untrac_pl.models import ModelSpec, build_model, load_tokenizer
from untrac_pl.optim import OptimizerSpec
from untrac_pl.resume import fingerprint_diff, score_trainer_settings
from untrac_pl.runtime import json_safe, machine_facts, versions
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec, load_weights

log = logging.getLogger(__name__)


@dataclass
class LMTraining:
    """Optimiser of θ0 and of every leave-group-out model."""

    optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec(name="adamw", lr=1e-3))
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class Sweep:
    """Optimizer × learning-rate ablation: every base method in ``methods`` is rerun with each pair.

    The cells are the full ``optimizers × lrs`` grid, or, when ``pairs`` is given, exactly those
    ``[optimizer, lr]`` pairs (e.g. every optimizer at one lr plus Adam at several). Every cell runs
    on the same θ0 and is scored against the same ground truth as the base methods (nothing is retrained).
    """

    methods: list[str] = field(default_factory=lambda: ["untrac", "untrac_inv"])
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sgd_momentum", "rmsprop", "adam", "adafactor"])
    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3])
    pairs: Optional[list[tuple[str, float]]] = None

    def cells(self) -> list[tuple[str, float]]:
        if self.pairs:
            return list(dict.fromkeys((str(o), float(lr)) for o, lr in self.pairs))
        return [(o, float(lr)) for o in self.optimizers for lr in self.lrs]


@dataclass
class ReproduceConfig:
    """A reproduction: experiment, settings, seeds, model, θ0 training, methods and outputs."""

    name: str = "synthetic"
    title: str = "UnTrac reproduction"
    experiment: Literal["synthetic", "corpora", "dose"] = "synthetic"
    output_dir: Optional[str] = None  # default runs/<name>: never the committed results/ unless given
    log_dir: Optional[str] = None
    work_dir: str = "runs/reproduce"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    num_seeds: Optional[int] = None
    settings: Optional[list[str]] = None
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    corpora: CorporaData = field(default_factory=CorporaData)
    model: ModelSpec = field(default_factory=lambda: ModelSpec(config={"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, train_tokenizer_vocab=512))
    max_length: int = 64
    eval_batch_size: int = 64
    fit: FitSpec = field(default_factory=FitSpec)
    lm: LMTraining = field(default_factory=LMTraining)
    methods: list[MethodSpec] = field(default_factory=list)
    sweep: Optional[Sweep] = None
    protocol: Protocol = field(default_factory=Protocol)
    dose: DoseSpec = field(default_factory=DoseSpec)
    resume: bool = False
    evaluate_only: bool = False
    figures: bool = True
    notes: str = ""
    threads: Optional[int] = None
    workers: int = 1  # processes for the independent fits and method runs (untrac_pl.experiments.pool); threads split among them

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: at least 1 (1 = every model and method run in this process)")
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        # the reproduction sets these per run: θ0 sees every group, and the seed comes from ``seeds``
        if self.fit.exclude_groups:
            raise ValueError(f"fit.exclude_groups={self.fit.exclude_groups}: the reproduction trains θ0 on every group and "
                             "leaves each group out itself for the ground truth; remove fit.exclude_groups")
        if self.fit.seed != 0:
            raise ValueError(f"fit.seed={self.fit.seed}: the reproduction trains with each seed of `seeds` "
                             f"(now {self.seeds}); set seeds instead and leave fit.seed unset")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def settings_of(cfg: ReproduceConfig) -> list[str]:
    every = list(cfg.synthetic.datasets) if cfg.experiment == "synthetic" else list(cfg.corpora.sizes)
    if cfg.settings:
        unknown = [s for s in cfg.settings if s not in every]
        if unknown:
            raise ValueError(f"settings {unknown} are not among {every}")
        return [s for s in every if s in cfg.settings]
    return every


def seeds_of(cfg: ReproduceConfig) -> list[int]:
    return list(cfg.seeds[: cfg.num_seeds] if cfg.num_seeds else cfg.seeds)


# --------------------------------------------------------------------------------------------------
# one setting × seed
# --------------------------------------------------------------------------------------------------
def expand_methods(cfg: ReproduceConfig) -> tuple[list[MethodSpec], dict]:
    methods = list(cfg.methods)
    sweep_info: dict = {}
    if cfg.sweep:
        for given in cfg.sweep.methods:
            base_name = canonical_name(given, what="sweep.methods")
            base = next((m for m in cfg.methods if m.name == base_name), None)
            if base is None:
                raise ValueError(f"sweep method '{given}' has no entry in methods:")
            if get_method(base.name).kind != "unlearning":
                raise ValueError(f"sweep.methods: '{given}' takes no unlearning optimizer, so every optimizer x lr cell "
                                 f"would be the same run; sweep {' or '.join(method_names('unlearning'))}")
            for opt, lr in cfg.sweep.cells():
                label = f"{base_name}@{opt}@{lr:g}"
                methods.append(replace(base, label=label, optimizer=replace(base.optimizer, name=opt, lr=lr)))
                sweep_info[label] = {"base": base_name, "optimizer": opt, "lr": lr}
    keys = [m.key for m in methods]
    if len(set(keys)) != len(keys) or GROUND_TRUTH in keys:
        raise ValueError(f"method labels must be unique and not '{GROUND_TRUTH}': {keys}")
    return methods, sweep_info


# What θ0 and the ground truth depend on (not the methods, outputs, seeds list or reporting).
SHARED_FIELDS = ("experiment", "synthetic", "corpora", "model", "max_length", "eval_batch_size", "fit", "lm")
SHARED_TRAINER_KEYS = ("precision", "deterministic")


def shared_fingerprint(cfg: ReproduceConfig, setting: str, trainer_kwargs: dict) -> dict:
    """The configuration a seed folder's θ0 and ground truth were computed with, as plain JSON."""
    full = json_safe(asdict(cfg))
    shared = {key: full[key] for key in SHARED_FIELDS}
    shared["setting"] = setting
    if cfg.protocol.batch_orders is not None:  # the ground truth is their mean (older folders: one order, seeded by the seed)
        shared["batch_orders"] = list(cfg.protocol.batch_orders)
    shared["trainer"] = score_trainer_settings(trainer_kwargs, SHARED_TRAINER_KEYS)
    return json.loads(json.dumps(shared, sort_keys=True, default=str))


class ReproduceResumeError(ValueError):
    """``--resume true`` on score files computed with a different configuration."""


def _comparable_shared(shared: Optional[dict]) -> Optional[dict]:
    """A stored θ0/ground-truth configuration in today's names (the generated corpora were ``embedded``), with
    fields added since (``model.gguf_file``, ``fit.order_seed``, ...) at their defaults, as the old run had them."""
    if not shared or "corpora" not in shared:
        return shared
    shared = dict(shared)
    for key, cls in (("model", ModelSpec), ("fit", FitSpec)):
        if isinstance(shared.get(key), dict):
            defaults = {f.name: json_safe(f.default) for f in fields(cls) if f.default is not MISSING}
            shared[key] = {**{k: v for k, v in defaults.items() if k not in shared[key]}, **shared[key]}
    corpora = dict(shared["corpora"])
    for old, new in (("embedded_docs_per_corpus", "generated_docs_per_corpus"), ("embedded_test_per_group", "generated_test_per_group")):
        if old in corpora:
            corpora[new] = corpora.pop(old)
    if corpora.get("source") == "embedded":
        corpora["source"] = "generated"
    return {**shared, "corpora": corpora}


def _comparable_spec(spec: Optional[dict]) -> Optional[dict]:
    """A method spec as today's fields, with what does not change its scores left out: a stored spec of an
    older version (top-level ``samples_per_group``, no ``loss_reduction``/``max_grad_norm``/``lr_schedule``)
    compares equal to the same method today, and ``target_unit`` counts only where the reproduction uses it."""
    if not spec:
        return spec
    spec = json.loads(json.dumps(spec))
    data = {**asdict(MethodData()), **(spec.get("data") or {})}
    if "samples_per_group" in spec:
        data["samples_per_group"] = spec.pop("samples_per_group")
    spec["data"] = data
    if isinstance(spec.get("unlearning"), dict):  # fields added since: their defaults, as the old run had them
        defaults = {f.name: json_safe(f.default) for f in fields(UnlearningSchedule)}
        spec["unlearning"] = {**defaults, **spec["unlearning"]}
    try:
        method = get_method(spec["name"])
    except (KeyError, ValueError):
        return spec
    if method.kind != "unlearning" or method.unlearns_training_data:  # UnTrac and the baselines ignore it here
        spec.pop("target_unit", None)
    return spec


def check_resumable(seed_dir: Path, shared: dict, methods, run_dirs: Sequence[Path] = ()) -> None:
    """Refuse to reuse a seed folder whose ground truth or method files came from another configuration.

    Adding methods (new labels) is fine; a changed shared setting or a changed method under an
    existing label would otherwise be reported with the new configuration next to the old numbers.
    """
    gt_path = seed_dir / f"{GROUND_TRUTH}.safetensors"
    if not gt_path.exists():
        return
    stored = _comparable_shared(ScoreTable.load(gt_path).metadata.get("shared_config"))
    if stored != shared:
        changed = fingerprint_diff(stored or {}, shared) if stored else "no configuration stored (written by an older version)"
        raise ReproduceResumeError(f"--resume true: '{seed_dir}' was computed with another θ0/ground-truth configuration: {changed}; "
                                   "rerun with --resume false (recomputes everything) or choose another output_dir")
    for method, folder in [(m, d) for d in (list(run_dirs) or [seed_dir]) for m in methods]:
        path = folder / f"{method.key}.safetensors"
        if path.exists():
            old = _comparable_spec(json.loads(json.dumps(ScoreTable.load(path).metadata.get("spec"), default=str)))
            new = _comparable_spec(json.loads(json.dumps(asdict(method), default=str)))  # as ScoreTable.save stores it
            if old != new:
                raise ReproduceResumeError(f"--resume true: '{path}' holds method '{method.key}' computed with other settings: "
                                           f"{fingerprint_diff(old or {}, new)}; delete that file to recompute it, or rerun with --resume false")


def _drop_unconfigured_runs(seed_dir: Path, configured: Sequence[Path]) -> None:
    """On resume, ``run<r>/`` folders the config no longer lists are removed (the report averages every run folder)."""
    for folder in seed_dir.glob("run*"):
        if folder.is_dir() and folder.name[3:].isdigit() and folder not in configured:
            print(f"[reproduce] {seed_dir}: {folder.name}/ is not among protocol.runs any more, removed", flush=True)
            shutil.rmtree(folder)


def method_dir(seed_dir: Path, run: Optional[int]) -> Path:
    """Where one run's method files go: ``seed<k>/run<r>/`` (the paper's protocol) or the seed folder itself."""
    return seed_dir if run is None else seed_dir / f"run{run}"


def run_sample_seed(seed: int, run: int) -> int:
    """The sample seed of run ``run`` on θ0 seed ``seed``: distinct across θ0 seeds (θ0 seed 0: ``run`` itself)."""
    return run + 1_000_003 * seed


def method_files(cfg: ReproduceConfig, seed: int, seed_dir: Path, methods) -> list[Path]:
    return [method_dir(seed_dir, run) / f"{m.key}.safetensors" for run in cfg.protocol.run_seeds(seed) for m in methods]


def _ground_truth_jobs(cfg, seed, fit_spec, groups) -> list[FitJob]:
    """θ0 of every batch order after the first and every leave-group-out model of every order."""
    jobs = []
    for i, order in enumerate(cfg.protocol.orders(seed)):
        spec = replace(fit_spec, order_seed=order, checkpoint_steps=[])
        suffix = "" if i == 0 else f"_order{order}"
        if i > 0:
            jobs.append(FitJob(f"full{suffix}", spec, log_version=f"full{suffix}"))
        jobs += [FitJob(f"without_{g}{suffix}", replace(spec, exclude_groups=[g]), log_version=f"without_{g}{suffix}") for g in groups]
    return jobs


def _ground_truth(cfg, seed, results: dict, base, groups, query_corpus, query_groups, seed_dir) -> tuple[ScoreTable, dict]:
    """Leave-group-out ground truth of every batch order from the fitted models in ``results``, their
    mean, and each order's table in ``orders/``."""
    orders = cfg.protocol.orders(seed)
    tables, runs = [], {}
    for i, order in enumerate(orders):
        suffix = "" if i == 0 else f"_order{order}"
        base_o = base if i == 0 else torch.tensor(results[f"full{suffix}"]["losses"], dtype=torch.float64)
        loo = {g: torch.tensor(results[f"without_{g}{suffix}"]["losses"], dtype=torch.float64) for g in groups}
        info = {g: results[f"without_{g}{suffix}"]["info"] for g in groups}
        meta = {"fit": {"max_steps": cfg.fit.max_steps, "batch_size": cfg.fit.batch_size, "seed": seed}, "runs": info}
        table = ground_truth_table(base_o, loo, query_corpus.ids, query_groups, meta)
        table.metadata.update({"order_seed": order, "base_query_loss": float(base_o.mean())})
        if cfg.protocol.batch_orders is not None:
            table.save(seed_dir / ORDERS_DIR / f"{GROUND_TRUTH}_order{order}.safetensors")
        tables.append(table)
        runs.update(info if i == 0 else {f"{k}{suffix}": v for k, v in info.items()})
    gt = tables[0] if len(tables) == 1 else mean_ground_truth(tables)
    gt.metadata["batch_orders"] = orders
    return gt, runs


def lds_done(cfg: ReproduceConfig, seed_dir: Path) -> bool:
    """Whether ``seed_dir`` has the LDS models ``protocol.lds_models`` asks for (none asked: done)."""
    if not cfg.protocol.lds_models:
        return True
    path = seed_dir / LDS_FILE
    if not path.exists():
        return False
    stored = json.loads(path.read_text())
    return stored.get("requested") == cfg.protocol.lds_models and stored.get("fraction") == cfg.protocol.lds_fraction


def _held_out_curve(net, checkpoints: list[dict], query_corpus, pad: int, batch_size: int) -> list[list[float]]:
    """θ0's mean test loss at each saved checkpoint ``[[step, loss], ...]``: whether training had plateaued."""
    curve = []
    for c in checkpoints:
        load_weights(net, c["path"])
        curve.append([c["step"], float(example_losses(net, query_corpus.examples, pad, batch_size).mean())])
    return curve


def run_setting_seed(cfg: ReproduceConfig, setting: str, seed: int, methods: list[MethodSpec], seed_dir: Path, trainer_kwargs: dict, data: Optional[dict] = None, reuse: bool = False, may_fail: tuple = ()) -> dict:
    """Train θ0, compute GT and every method for one setting and seed; write the score files.

    ``data`` (``{"train", "queries", "tokenizer_texts"}`` records) replaces the experiment's own data
    (Python API: any grouped training records and grouped queries).

    ``reuse`` (``resume: true`` on a seed folder that has the ground truth but lacks some methods, e.g.
    methods added to the config later): θ0 is retrained (deterministic: same seed, same data) for the
    missing methods, the stored ground truth and the existing method files are kept.

    With ``protocol.batch_orders`` the ground truth is the mean over the orders (θ0 of the first order
    is the one the methods run on); with ``protocol.runs`` each run resamples the methods' examples
    into ``run<r>/`` on the same θ0 and ground truth (:mod:`untrac_pl.experiments.protocol`).
    """
    timings: dict = {}
    t0 = time.perf_counter()
    if data is None:
        data = synthetic_data(cfg, setting, seed) if cfg.experiment == "synthetic" else corpora_data(cfg, setting, seed)
    spec = replace(cfg.model, init_seed=seed) if cfg.model.config is not None else cfg.model
    tokenizer = load_tokenizer(spec, data["tokenizer_texts"])
    train_records = data["train"] if "train" in data else corpus_blocks(cfg, data["docs"], tokenizer, setting, seed)
    query_records = data["queries"]
    query_groups = [r["group"] for r in query_records]
    net = build_model(spec, tokenizer)
    init_state = copy.deepcopy(net.state_dict())
    lm_kwargs = lm_kwargs_of(cfg)
    lm = CausalLMModule(model=spec, **lm_kwargs)
    lm.attach(net, tokenizer)
    train_corpus = tokenize_records(train_records, tokenizer, cfg.max_length, "training data")
    query_corpus = tokenize_records(query_records, tokenizer, cfg.max_length, "queries")
    timings["data_s"] = time.perf_counter() - t0

    orders = cfg.protocol.orders(seed)
    fit_spec = replace(cfg.fit, seed=seed, exclude_groups=[])
    groups = list(train_corpus.groups)
    ckpt_dir = Path(cfg.work_dir) / cfg.name / setting / f"seed{seed}" / "checkpoints"
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    theta0_path = ckpt_dir / "theta0.safetensors"
    gt_path = seed_dir / f"{GROUND_TRUTH}.safetensors"
    seed_dir.mkdir(parents=True, exist_ok=True)
    reuse_gt = reuse and gt_path.exists()
    log = {"save_dir": cfg.log_dir or str(Path(cfg.output_dir) / "tensorboard"), "name": f"{setting}/seed{seed}"}
    payload, local = payload_for(lm, spec, tokenizer, lm_kwargs, init_state, train_corpus, query_corpus, train_records=train_records,
                                 query_records=query_records, max_length=cfg.max_length, eval_batch_size=cfg.eval_batch_size,
                                 trainer_kwargs=trainer_kwargs, log=log)
    pool = JobPool(payload, workers=cfg.workers, threads=fit_threads(cfg.threads, cfg.workers), local=local)
    with pool:
        # every model of the setting, in one pool: θ0 (order 0, with checkpoints), then the ground truth's, then the LDS models
        t1 = time.perf_counter()
        theta0_job = FitJob("full", replace(fit_spec, order_seed=orders[0]), log_version="full", checkpoint_dir=str(ckpt_dir), weights_path=str(theta0_path))
        gt_jobs = [] if reuse_gt else _ground_truth_jobs(cfg, seed, fit_spec, groups)
        lds = [] if lds_done(cfg, seed_dir) else lds_jobs(groups, replace(fit_spec, order_seed=orders[0]), cfg.protocol, seed)  # also on resume
        fitted = pool.map(fit_job, [theta0_job] + gt_jobs + lds)
        results = {r["key"]: r for r in fitted}
        models_s = time.perf_counter() - t1
        theta0_run = results["full"]["info"]
        load_weights(net, theta0_path)
        base = torch.tensor(results["full"]["losses"], dtype=torch.float64)
        theta0_run["held_out_curve"] = _held_out_curve(net, theta0_run["checkpoints"], query_corpus, tokenizer.pad_token_id, cfg.eval_batch_size)
        if data.get("validation"):
            validation = tokenize_records(data["validation"], tokenizer, cfg.max_length, "validation")
            theta0_run["validation_curve"] = _held_out_curve(net, theta0_run["checkpoints"], validation, tokenizer.pad_token_id, cfg.eval_batch_size)
        load_weights(net, theta0_path)
        # per-phase times of a pooled run: the models' wall time shared out in proportion to their own fit times
        fit_seconds = {r["key"]: r["info"]["seconds"] for r in fitted}
        share = models_s / max(sum(fit_seconds.values()), 1e-9)
        timings["fit_theta0_s"] = fit_seconds["full"] * share
        timings["workers"] = cfg.workers
        timings["threads_per_job"] = pool.threads
        if reuse_gt:
            gt, runs = ScoreTable.load(gt_path), {}
            stored_threads = gt.metadata.get("timings", {}).get("threads_per_job")
            if stored_threads is not None and int(stored_threads) != pool.threads:
                raise ReproduceResumeError(f"--resume true: '{seed_dir}' was computed with {stored_threads} torch thread(s) per job, this run "
                                           f"uses {pool.threads} (threads: {cfg.threads or torch.get_num_threads()} over workers: {cfg.workers}); "
                                           "new models would round differently from the stored ground truth: resume with the same threads "
                                           "and workers, or rerun with --resume false")
            stored = gt.metadata.get("base_query_loss")
            if stored is not None and abs(float(stored) - float(base.mean())) > 1e-4 * max(1.0, abs(float(stored))):
                raise RuntimeError(f"{setting} seed {seed}: retrained θ0 has mean test loss {float(base.mean()):.6f}, the stored ground "
                                   f"truth's θ0 had {float(stored):.6f}; the run is not reproducible here: rerun with --resume false")
            timings["ground_truth_s"] = gt.metadata.get("timings", {}).get("ground_truth_s", 0.0)
            timings["ground_truth_reused"] = True
        else:
            gt, runs = _ground_truth(cfg, seed, results, base, groups, query_corpus, query_groups, seed_dir)
            timings["ground_truth_s"] = sum(fit_seconds[j.key] for j in gt_jobs) * share
        if lds:
            lds_record(groups, lds, [results[j.key] for j in lds], query_groups, replace(fit_spec, order_seed=orders[0]), cfg.protocol, seed_dir / LDS_FILE)
            timings["lds_s"] = sum(fit_seconds[j.key] for j in lds) * share

        method_times = dict(gt.metadata.get("timings", {}).get("methods_s", {})) if reuse else {}
        checkpoints = [(c["path"], c["lr"]) for c in theta0_run["checkpoints"]]
        run_seeds = cfg.protocol.run_seeds(seed)
        jobs = [MethodsJob(methods=list(methods), out_dir=str(method_dir(seed_dir, run)), theta0_path=str(theta0_path),
                           sample_seed=seed if run is None else run_sample_seed(seed, run), checkpoints=checkpoints,
                           metadata={"setting": setting, "seed": seed, "run": run}, skip_existing=reuse, may_fail=tuple(may_fail))
                for run in run_seeds]
        t3 = time.perf_counter()
        done = pool.map(methods_job, jobs)
        timings["methods_wall_s"] = time.perf_counter() - t3
    failed_methods: dict = {}
    for run, result in zip(run_seeds, done):
        prefix = "" if run is None else f"run{run}/"
        method_times.update({prefix + k: v for k, v in result["seconds"].items()})
        for key, message in result["failed"].items():
            failed_methods[prefix + key] = message
            print(f"[reproduce] {setting} seed {seed}: {prefix + key} diverged, no score file: {message}", flush=True)
    baseline = unigram_baseline(train_corpus, query_corpus, len(tokenizer))
    gt.metadata.update({"setting": setting, "seed": seed, "theta0": theta0_run, "base_query_loss": float(base.mean()), "unigram": baseline,
                        "shared_config": shared_fingerprint(cfg, setting, trainer_kwargs)})

    timings["methods_s"] = method_times
    timings["total_s"] = time.perf_counter() - t0
    gt.metadata["timings"] = timings
    gt.save(gt_path)  # written last: marks the seed folder complete
    gt_groups = gt.group_level()
    return {
        "timings": timings,
        "failed_methods": failed_methods,
        "theta0": {"steps": theta0_run["steps"], "final_train_loss": theta0_run["final_train_loss"], "mean_query_loss": float(base.mean()),
                   "unigram": baseline, "held_out_curve": theta0_run["held_out_curve"], "validation_curve": theta0_run.get("validation_curve")},
        "retrain_steps": {k: v["steps"] for k, v in runs.items()} or {g: cfg.fit.max_steps for g in train_corpus.group_members()},
        "num_train_examples": len(train_records),
        "num_train_per_group": {g: len(ix) for g, ix in train_corpus.group_members().items()},
        "num_queries": len(query_records),
        "ground_truth_group_level": {r: dict(zip(gt_groups.col_ids, gt_groups.scores[i].tolist())) for i, r in enumerate(gt_groups.row_ids)},
    }


def float_noise_check(cfg: ReproduceConfig, setting: str, seed: int, methods: list[MethodSpec], seed_dir: Path, trainer_kwargs: dict) -> Optional[dict]:
    """Recompute the first batch order's ground truth and the first run's methods with
    ``protocol.float_noise_threads`` torch threads into ``seed<k>/noise/threads<N>/`` (same code, same
    config: only the float rounding differs), for the report's float-noise line."""
    threads = cfg.protocol.float_noise_threads
    if not threads:
        return None
    target = seed_dir / NOISE_DIR / f"threads{threads}"
    p = cfg.protocol
    noise_cfg = replace(cfg, protocol=replace(p, batch_orders=[p.orders(seed)[0]] if p.batch_orders is not None else None,
                                              runs=[p.runs[0]] if p.runs else None, lds_models=0, curves=[], float_noise_threads=None),
                        threads=threads, workers=1, log_dir=str(Path(cfg.work_dir) / cfg.name / "noise_tensorboard"), work_dir=str(Path(cfg.work_dir) / cfg.name / "noise"))
    # resume: the noise folder is kept where its configuration still holds; only its missing method files are computed
    reuse = cfg.resume and (target / f"{GROUND_TRUTH}.safetensors").exists()
    if reuse:
        check_resumable(target, shared_fingerprint(noise_cfg, setting, trainer_kwargs), methods, [method_dir(target, r) for r in noise_cfg.protocol.run_seeds(seed)])
        if all(f.exists() for f in method_files(noise_cfg, seed, target, methods)):
            return {"threads": threads, "reused": True}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if target.exists() and not reuse:
            shutil.rmtree(target)
        started = time.perf_counter()
        run_setting_seed(noise_cfg, setting, seed, methods, target, trainer_kwargs, reuse=reuse)
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "default_threads": fit_threads(cfg.threads, cfg.workers), "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------------
# whole reproduction
# --------------------------------------------------------------------------------------------------
def reproduce(cfg: ReproduceConfig, command: str = "", trainer_kwargs: Optional[dict] = None) -> dict:
    """Run (or, with ``evaluate_only``, just evaluate) a reproduction; returns the written report paths."""
    import json

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.experiment == "dose":
        return run_dose(cfg, command, trainer_kwargs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    own = fit_threads(cfg.threads, cfg.workers)
    if cfg.protocol.float_noise_threads and cfg.protocol.float_noise_threads == own:
        raise ValueError(f"protocol.float_noise_threads={cfg.protocol.float_noise_threads} is the thread count the run's models and methods "
                         f"use (threads: {cfg.threads or torch.get_num_threads()} over workers: {cfg.workers}): the re-run would only "
                         "repeat the same sums; choose another count")
    started = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    scores_root = out_dir / "scores"
    methods, sweep_info = expand_methods(cfg)
    curve_specs, curve_info = expand_curves(cfg.protocol, methods)
    main_methods, methods = methods, methods + curve_specs
    check_methods_reach_workers(methods, cfg.workers)
    settings, seeds = settings_of(cfg), seeds_of(cfg)
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, **(trainer_kwargs or {})}
    runs_path = out_dir / "runs.json"
    runs: dict = json.loads(runs_path.read_text()) if (cfg.resume or cfg.evaluate_only) and runs_path.exists() else {}
    noise: dict = {}
    if not cfg.evaluate_only:
        for setting in settings:
            for seed in seeds:
                seed_dir = scores_root / setting / f"seed{seed}"
                if cfg.resume:
                    runs_here = [method_dir(seed_dir, r) for r in cfg.protocol.run_seeds(seed)]
                    check_resumable(seed_dir, shared_fingerprint(cfg, setting, trainer_kwargs), methods, runs_here)
                    _drop_unconfigured_runs(seed_dir, runs_here)
                files = method_files(cfg, seed, seed_dir, methods)
                done = (seed_dir / f"{GROUND_TRUTH}.safetensors").exists() and all(f.exists() for f in files) and lds_done(cfg, seed_dir)
                if cfg.resume and done:
                    print(f"[reproduce] {setting} seed {seed}: already done, skipped", flush=True)
                else:
                    reuse = cfg.resume and (seed_dir / f"{GROUND_TRUTH}.safetensors").exists()
                    if seed_dir.exists() and not reuse:
                        shutil.rmtree(seed_dir)
                    missing = [str(f.relative_to(seed_dir).with_suffix("")) for f in files if not (reuse and f.exists())]
                    print(f"[reproduce] {setting} seed {seed}: training θ0, {len(missing)} method run(s)"
                          + (" (ground truth reused)" if reuse else "") + "...", flush=True)
                    info = run_setting_seed(cfg, setting, seed, methods, seed_dir, trainer_kwargs, reuse=reuse, may_fail=tuple(sweep_info))
                    runs.setdefault(setting, {})[f"seed{seed}"] = info
                    write_json_atomic(runs_path, json_safe(runs))
                    t = info["timings"]
                    print(f"[reproduce] {setting} seed {seed}: done in {t['total_s']:.1f} s (θ0 {t['fit_theta0_s']:.1f} s, GT {t['ground_truth_s']:.1f} s, "
                          f"methods {sum(t['methods_s'].values()):.1f} s)", flush=True)
                if seed == seeds[0] and cfg.protocol.float_noise_threads:
                    print(f"[reproduce] {setting} seed {seed}: float-noise check with {cfg.protocol.float_noise_threads} thread(s)...", flush=True)
                    noise[setting] = float_noise_check(cfg, setting, seed, main_methods, seed_dir, trainer_kwargs)
    metrics = evaluate_directory(scores_root)
    metrics = {s: metrics[s] for s in settings if s in metrics}
    for setting, result in metrics.items():
        pairs = [(k, c["reference"]) for k, c in curve_info.items() if c["value"] == 1 and c["reference"]]
        result["statistics"] = setting_statistics(scores_root / setting, [m.key for m in methods], cfg.protocol.bootstrap_resamples,
                                                  cfg.protocol.permutations, pairs, seed=f"seed{seeds[0]}")
    wall = time.perf_counter() - started
    history_path = out_dir / "invocations.json"
    history = json.loads(history_path.read_text()) if (cfg.resume or cfg.evaluate_only) and history_path.exists() else []
    history.append({"command": command, "wall_seconds": wall, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "evaluate_only": cfg.evaluate_only, "machine": machine_facts()["cpu"]})
    write_json_atomic(history_path, history)
    extra = {"name": cfg.name, "wall_seconds": wall, "runs": json_safe(runs), "config": json_safe(asdict(cfg)), "versions": versions(),
             "machine": machine_facts(), "float_noise_runs": noise, "curves": curve_info, "invocations": history}
    notes = cfg.notes + "\n\n" + _run_notes(cfg, runs, wall, history)
    made_by = [h["command"] for h in history if not h.get("evaluate_only")] or [command]  # the commands that computed the scores
    return write_report(metrics, out_dir, title=cfg.title, command="\n".join(made_by), notes=notes, method_names=[m.key for m in main_methods],
                        sweep=sweep_info or None, extra=extra, paper_table3=cfg.experiment == "corpora", figures=cfg.figures, curves=curve_info)


def _run_notes(cfg: ReproduceConfig, runs: dict, wall: float, history: Optional[list] = None) -> str:
    m = machine_facts()
    lines = []
    if history and len(history) > 1:
        lines += ["Invocations that wrote this folder (each resumed the one before):", ""]
        lines += [f"{i}. `{h['command']}` — {h['wall_seconds'] / 60:.1f} min wall" + (f" on {h['machine']}" if h.get("machine") else "")
                  + (" (evaluation only)" if h.get("evaluate_only") else "")
                  for i, h in enumerate(history, 1)]
        lines += [""]
    lines += [f"Machine: {m['cpu']} ({m['cpus']} CPUs; flags {', '.join(m['cpu_flags']) or 'none of avx2/avx512'}); {m['platform']}.", ""]
    lines += [f"Run facts: seeds {seeds_of(cfg)}, settings {settings_of(cfg)}; θ0 and every leave-group-out model: "
             f"{cfg.fit.max_steps} steps of batch {cfg.fit.batch_size} ({cfg.lm.optimizer.name}, lr {cfg.lm.optimizer.lr:g}, {cfg.lm.lr_schedule}); "
             f"model {cfg.model.config or cfg.model.name_or_path}; wall time of this invocation {wall / 60:.1f} min "
             f"(torch threads per model or method run: {fit_threads(cfg.threads, cfg.workers)}, in {cfg.workers} worker process(es))."]
    for setting, seeds in runs.items():
        for seed, info in seeds.items():
            t = info["timings"]
            curve = info["theta0"].get("held_out_curve") or []
            val = info["theta0"].get("validation_curve") or []
            by_step = lambda c: ", ".join(f"{int(s)}: {v:.3f}" for s, v in c)  # noqa: E731
            lines.append(f"- `{setting}` {seed}: θ0 final train loss {info['theta0']['final_train_loss']:.3f}, mean test loss "
                         f"{info['theta0']['mean_query_loss']:.3f}" + (f" (by step: {by_step(curve)})" if curve else "")
                         + (f"; held-out loss on another draw of the training tasks by step: {by_step(val)}" if val else "")
                         + f"; {info['num_train_examples']} training sequences; total {t['total_s']:.0f} s")
            if info.get("failed_methods"):
                lines.append(f"  - diverged (non-finite ascent loss; no score file, `n/a` in the tables): {', '.join(sorted(info['failed_methods']))}")
    return "\n".join(lines)
