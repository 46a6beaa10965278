"""Planted-dose benchmark: does a method's score of a group rise with how much of a behaviour it holds?

One behaviour (toxic ToxiGen statements, ``toxicity_human >= dose.min_toxicity``) is planted into one
training group (``dose.group``) at known doses: that share of the group's blocks is replaced by planted
statements, so the group keeps its size (and UnTrac its number of ascent steps). The test set is other
statements of the same behaviour, disjoint from every planted one. For every dose θ0 is trained from the
same initialisation with the same (coupled) batch order, every method of ``methods:`` runs on it, and
the planted group's score on the behaviour is recorded. The benchmark is the Spearman correlation of
that score with the dose (6 doses: 1.0 only for a score that rises at every step), plus the planted
group's rank among the groups and its margin to the runner-up; at dose 0 nothing is planted, so its
rank there is what chance gives (uniform over the groups).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from untrac_pl.data.tokenize import sample_per_group, tokenize_records
from untrac_pl.evaluation.metrics import standardise
from untrac_pl.evaluation.statistics import dose_response
from untrac_pl.experiments.datasets import corpora_data, corpus_blocks
from untrac_pl.experiments.jobs import FitJob, MethodsJob, check_methods_reach_workers, fit_job, lm_kwargs_of, methods_job, payload_for
from untrac_pl.experiments.pool import JobPool, fit_threads
from untrac_pl.experiments.protocol import unigram_baseline
from untrac_pl.io import save_figure_atomic, write_json_atomic, write_text_atomic
from untrac_pl.lm import CausalLMModule
from untrac_pl.methods import display_name
from untrac_pl.models import build_model, load_tokenizer
from untrac_pl.runtime import json_safe, machine_facts, versions
from untrac_pl.scores import ScoreTable

BEHAVIOUR = "planted/toxic"


@dataclass
class DoseSpec:
    """The planted-dose benchmark (module docstring)."""

    group: str = "forum"
    doses: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.02, 0.05, 0.10, 0.20])
    source_file: str = "toxigen_annotated.jsonl"
    min_toxicity: float = 4.0
    test_samples: int = 64

    def __post_init__(self):
        if any(not 0.0 <= d < 1.0 for d in self.doses) or len(set(self.doses)) != len(self.doses) or len(self.doses) < 3:
            raise ValueError(f"dose.doses={self.doses}: at least three distinct shares in [0, 1)")


def toxigen_rows(path: Path) -> list[tuple[int, str, float]]:
    """``(line number, text, toxicity_human)`` of every non-blank line of a ToxiGen JSONL file; a malformed
    line is a ``ValueError`` naming ``path:line``."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((number, str(row["text"]), float(row["toxicity_human"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: a ToxiGen record needs 'text' and a numeric 'toxicity_human' ({type(exc).__name__}: {exc})") from None
    return rows


def behaviour_statements(path: Path, min_toxicity: float, test_samples: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(planting pool, test records): the toxic statements split at random into two disjoint halves."""
    if not path.exists():
        raise FileNotFoundError(f"dose.source_file: {path} does not exist (ToxiGen statements with a toxicity_human field, JSONL)")
    toxic = [{"text": text} for _, text, score in toxigen_rows(path) if score >= min_toxicity]
    if len(toxic) < 2 * test_samples:
        raise ValueError(f"{path}: {len(toxic)} statements with toxicity_human >= {min_toxicity}, fewer than twice dose.test_samples ({test_samples})")
    random.Random(f"dose-split:{seed}").shuffle(toxic)
    half = len(toxic) // 2
    pool = [{"id": f"planted:{i}", "text": r["text"]} for i, r in enumerate(toxic[:half])]
    tests = [{"id": f"behaviour:{i}", "text": r["text"], "group": BEHAVIOUR} for i, r in enumerate(toxic[half:])]
    return pool, sample_per_group(tests, test_samples, seed)


def plant(blocks: list[dict], group: str, pool: list[dict], dose: float, seed: int) -> tuple[list[dict], int]:
    """``blocks`` with ``round(dose * n_group)`` of ``group``'s blocks replaced (in place in the list, so the
    batch order is coupled across doses) by statements of ``pool``; returns the records and the count.

    Doses are nested: one seeded order of the group's positions is drawn, and dose ``d`` fills its first
    ``k`` positions with the pool's first ``k`` statements, so a higher dose keeps every planted statement
    of a lower one in the same place and only adds more."""
    members = [i for i, b in enumerate(blocks) if b["group"] == group]
    if not members:
        raise ValueError(f"dose.group='{group}' is not a training group ({sorted({b['group'] for b in blocks})})")
    count = round(dose * len(members))
    if count > len(pool):
        raise ValueError(f"dose {dose:g} needs {count} planted statements, the pool has {len(pool)}")
    order = list(members)
    random.Random(f"plant:{seed}").shuffle(order)
    out = list(blocks)
    for position, statement in zip(order[:count], pool):
        out[position] = {**statement, "group": group}
    return out, count


def standing(scores: dict, group: str) -> dict:
    """Where ``group`` stands among the groups' ``scores``: rank (1 = most influential), margin to the best
    other group, z-score over the groups (population std; 0 for constant scores), and the scores."""
    ranked = sorted(scores, key=scores.get, reverse=True)
    names = list(scores)
    z = standardise(torch.tensor([list(scores.values())], dtype=torch.float64))[0, names.index(group)]
    return {"score": scores[group], "rank": ranked.index(group) + 1, "margin": scores[group] - max(v for k, v in scores.items() if k != group),
            "z": float(z), "scores": scores}


def _row(table, group: str) -> dict:
    g = table.group_level()
    i = g.row_ids.index(BEHAVIOUR)
    return standing(dict(zip(g.col_ids, g.scores[i].double().tolist())), group)


@dataclass
class DoseJob:
    """θ0 trained with ``dose`` planted, then every method on it (score files in ``out_dir``)."""

    dose: float
    out_dir: str
    checkpoint_dir: str


def dose_job(payload: dict, job: DoseJob) -> dict:
    """One dose: plant, train θ0 (same initialisation and coupled batch order for every dose), run the methods."""
    started = time.perf_counter()
    train_records, planted = plant(payload["blocks"], payload["group"], payload["pool"], job.dose, payload["seed"])
    corpus = tokenize_records(train_records, payload["tokenizer"], payload["max_length"], "training data")
    here = {**payload, "train": corpus, "train_records": train_records}
    ckpt = Path(job.checkpoint_dir)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    fitted = fit_job(here, FitJob(f"dose{job.dose:g}", payload["fit_spec"], checkpoint_dir=str(ckpt), weights_path=str(ckpt / "theta0.safetensors")))
    info = fitted["info"]
    methods_job(here, MethodsJob(methods=payload["methods"], out_dir=job.out_dir, theta0_path=str(ckpt / "theta0.safetensors"), sample_seed=payload["seed"],
                                 checkpoints=[(c["path"], c["lr"]) for c in info["checkpoints"]], metadata={"dose": job.dose}))
    rows = {m.key: _row(ScoreTable.load(Path(job.out_dir) / f"{m.key}.safetensors"), payload["group"]) for m in payload["methods"]}
    return {"dose": job.dose, "planted": planted, "final_train_loss": info["final_train_loss"],
            "test_loss": sum(fitted["losses"]) / len(fitted["losses"]), "unigram": unigram_baseline(corpus, payload["queries"], len(payload["tokenizer"])),
            "methods": rows, "seconds": time.perf_counter() - started}


def run_dose(cfg, command: str = "", trainer_kwargs: Optional[dict] = None) -> dict:
    """The benchmark for ``cfg`` (a ReproduceConfig with ``experiment: dose``, the corpora of ``corpora:``
    at equal sizes, the first of ``seeds``); writes ``scores/dose<d>/``, ``dose.json``, ``results.md`` and ``dose.png``.

    The doses are independent jobs (``workers`` processes, :mod:`untrac_pl.experiments.pool`); with
    ``protocol.float_noise_threads`` the highest dose is re-run with that thread count into
    ``scores/noise/``, so the report says how much rounding alone moves each method's standing."""
    started = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    check_methods_reach_workers(cfg.methods, cfg.workers)
    if cfg.evaluate_only:  # the report again from dose.json (nothing is retrained)
        path = out_dir / "dose.json"
        if not path.exists():
            raise FileNotFoundError(f"--evaluate_only true: {path} does not exist (run the benchmark first)")
        record = json.loads(path.read_text())
        figure = _figure(record["doses"], cfg.methods, out_dir)
        write_text_atomic(out_dir / "results.md", _markdown(cfg, record, figure))
        return {"metrics": str(path), "markdown": str(out_dir / "results.md"), "figures": [figure]}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    own = fit_threads(cfg.threads, cfg.workers)
    noise_threads = cfg.protocol.float_noise_threads
    if noise_threads and noise_threads == own:
        raise ValueError(f"protocol.float_noise_threads={noise_threads} is the thread count every dose runs with (threads over workers): "
                         "choose another count")
    spec_dose: DoseSpec = cfg.dose
    seed = cfg.seeds[0]
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, **(trainer_kwargs or {})}
    data = corpora_data(cfg, "equal", seed)
    spec = replace(cfg.model, init_seed=seed) if cfg.model.config is not None else cfg.model
    tokenizer = load_tokenizer(spec, data["tokenizer_texts"])
    blocks = corpus_blocks(cfg, data["docs"], tokenizer, "equal", seed)
    pool, tests = behaviour_statements(Path(cfg.corpora.tests_dir) / spec_dose.source_file, spec_dose.min_toxicity, spec_dose.test_samples, seed)
    net = build_model(spec, tokenizer)
    init_state = copy.deepcopy(net.state_dict())
    lm_kwargs = lm_kwargs_of(cfg)
    lm = CausalLMModule(model=spec, **lm_kwargs)
    lm.attach(net, tokenizer)
    fit_spec = replace(cfg.fit, seed=seed, exclude_groups=[], checkpoint_steps=list(cfg.fit.checkpoint_steps), order_seed=seed)
    queries = tokenize_records(tests, tokenizer, cfg.max_length, "behaviour test set")
    payload, local = payload_for(lm, spec, tokenizer, lm_kwargs, init_state, None, queries, query_records=tests, max_length=cfg.max_length,
                                 eval_batch_size=cfg.eval_batch_size, trainer_kwargs=trainer_kwargs)
    payload.update({"blocks": blocks, "group": spec_dose.group, "pool": pool, "seed": seed, "fit_spec": fit_spec, "methods": list(cfg.methods)})
    work = Path(cfg.work_dir) / cfg.name
    jobs = [DoseJob(d, str(out_dir / "scores" / f"dose{d:g}"), str(work / f"dose{d:g}" / "checkpoints")) for d in spec_dose.doses]
    with JobPool(payload, workers=cfg.workers, threads=own, local=local) as jobs_pool:
        done = jobs_pool.map(dose_job, jobs)
    per_dose = {f"{d['dose']:g}": d for d in done}
    for d in done:
        print(f"[dose] {d['dose']:g}: {d['planted']} planted statements; "
              + ", ".join(f"{display_name(k)} rank {v['rank']}" for k, v in d["methods"].items()), flush=True)
    summary = {m.key: dose_response([d["dose"] for d in per_dose.values()], [d["methods"][m.key]["score"] for d in per_dose.values()])
               for m in cfg.methods}
    noise = None
    if noise_threads:  # the highest dose again, with another thread count: what rounding alone moves
        top = max(spec_dose.doses)
        job = DoseJob(top, str(out_dir / "scores" / "noise" / f"threads{noise_threads}" / f"dose{top:g}"), str(work / "noise" / f"dose{top:g}" / "checkpoints"))
        with JobPool(payload, workers=1, threads=noise_threads, local=local) as noise_pool:
            again = noise_pool.map(dose_job, [job])[0]
        noise = _noise_summary(per_dose, again, cfg.methods, noise_threads, own)
    wall = time.perf_counter() - started
    record = {"command": command, "group": spec_dose.group, "doses": per_dose, "dose_response": summary, "float_noise": noise, "wall_seconds": wall,
              "num_test": len(tests), "workers": cfg.workers, "threads_per_dose": own, "machine": machine_facts(), "versions": versions(),
              "config": json_safe(cfg)}
    write_json_atomic(out_dir / "dose.json", json_safe(record))
    figure = _figure(per_dose, cfg.methods, out_dir)
    write_text_atomic(out_dir / "results.md", _markdown(cfg, record, figure))
    return {"metrics": str(out_dir / "dose.json"), "markdown": str(out_dir / "results.md"), "figures": [figure]}


def _noise_summary(per_dose: dict, again: dict, methods, threads: int, own: int) -> dict:
    """How the highest dose's re-run moves each method: its planted score (in units of the groups' spread), its
    rank, and the dose Spearman with the re-run substituted."""
    key = f"{again['dose']:g}"
    first = per_dose[key]
    out = {"dose": again["dose"], "threads": threads, "default_threads": own, "test_loss_change": again["test_loss"] - first["test_loss"], "methods": {}}
    for m in methods:
        a, b = first["methods"][m.key], again["methods"][m.key]
        spread = float(torch.tensor(list(a["scores"].values()), dtype=torch.float64).std(unbiased=False)) or 1.0
        swapped = [again["methods"][m.key]["score"] if k == key else d["methods"][m.key]["score"] for k, d in per_dose.items()]
        rho = dose_response([d["dose"] for d in per_dose.values()], swapped)["spearman"]
        before = dose_response([d["dose"] for d in per_dose.values()], [d["methods"][m.key]["score"] for d in per_dose.values()])["spearman"]
        out["methods"][m.key] = {"score_change_in_spread": abs(b["score"] - a["score"]) / spread, "rank": [a["rank"], b["rank"]],
                                 "spearman_change": abs(rho - before)}
    return out


def _markdown(cfg, record: dict, figure: str) -> str:
    doses = list(record["doses"].values())
    names = [m.key for m in cfg.methods]
    header = ["method", "Spearman (score vs dose)", "monotone"] + [f"{d['dose'] * 100:g} %" for d in doses]
    rows = []
    for n in names:
        dr = record["dose_response"][n]
        cells = [f"{d['methods'][n]['score']:+.3g} (#{d['methods'][n]['rank']})" for d in doses]
        rows.append([display_name(n), f"{dr['spearman']:.3f}", "yes" if dr["monotone"] else "no"] + cells)
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows])
    k = len(next(iter(doses))["methods"][names[0]]["scores"])
    zero = doses[0]
    m = record["machine"]
    return "\n".join([
        f"# {cfg.title}", "", "Produced by:", "", "```", record["command"], "```", "",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs; flags {', '.join(m['cpu_flags']) or 'none of avx2/avx512'}); {record.get('workers', 1)} worker "
        f"process(es) of {record.get('threads_per_dose', m['torch_threads'])} torch thread(s), one dose each; wall time {record['wall_seconds'] / 60:.1f} min.", "",
        f"A behaviour (toxic ToxiGen statements, toxicity_human ≥ {cfg.dose.min_toxicity:g}) planted into `{record['group']}` at each dose "
        f"(that share of its blocks replaced by planted statements; {record['num_test']} other statements of the behaviour as the test set, "
        "disjoint from every planted one). θ0 is retrained per dose from the same initialisation with the same batch order. "
        "Each cell: the planted group's score on the behaviour (the method's own units) and its rank among the "
        f"{k} groups (#1 = most influential).", "",
        table, "",
        f"With {len(doses)} doses, a Spearman of 1.0 means the score rose at every step of the dose; under the null (scores "
        f"unrelated to the dose) its 95th percentile is {_spearman_null_q95(len(doses)):.3f} (exact, all {len(doses)}! orderings). "
        f"At 0 % nothing is planted: the planted group's rank there is what chance gives (uniform over 1..{k}); "
        + ", ".join(f"{display_name(n)} #{zero['methods'][n]['rank']} (z {zero['methods'][n]['z']:+.2f})" for n in names) + ".", "",
        *_theta0_lines(doses), *_noise_lines(record.get("float_noise"), names),
        f"![{figure}]({figure})", ""])


def _theta0_lines(doses: list) -> list[str]:
    if not all("test_loss" in d for d in doses):
        return []
    u = doses[0]["unigram"]
    return ["θ0's mean loss on the behaviour's test statements by dose: " + ", ".join(f"{d['dose'] * 100:g} %: {d['test_loss']:.3f}" for d in doses)
            + f" nats; a unigram model of the training tokens scores {u['test_loss']:.3f} on them (training-token entropy {u['train_entropy']:.3f}; "
            f"uniform guess ln V = {u['uniform']:.3f}). The loss falls with the dose where the planted statements teach the behaviour.", ""]


def _noise_lines(noise: Optional[dict], names: list[str]) -> list[str]:
    if not noise:
        return []
    per = noise["methods"]
    return [f"Float noise: the {noise['dose'] * 100:g} % dose re-run with {noise['threads']} torch thread(s) instead of {noise['default_threads']} "
            f"(same code, data and config) moved θ0's test loss by {abs(noise['test_loss_change']):.2g} nats, and per method the planted "
            "group's score by (in units of the spread of the groups' scores) / its rank (first run → re-run) / the dose Spearman with the "
            "re-run substituted: " + "; ".join(f"{display_name(n)} {per[n]['score_change_in_spread']:.2g} / #{per[n]['rank'][0]} → #{per[n]['rank'][1]} / "
                                               f"{per[n]['spearman_change']:.2g}" for n in names)
            + ". Byte-identical results hold only on the same machine and software.", ""]


def _spearman_null_q95(n: int) -> float:
    """95th percentile of Spearman's rho between a fixed ranking and a random permutation of ``n`` items."""
    import itertools

    values = sorted(1 - 6 * sum((i - p) ** 2 for i, p in enumerate(perm)) / (n * (n * n - 1)) for perm in itertools.permutations(range(n)))
    return values[int(0.95 * (len(values) - 1))]


def _figure(per_dose: dict, methods, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doses = [d["dose"] * 100 for d in per_dose.values()]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for m in methods:
        ax.plot(doses, [d["methods"][m.key]["z"] for d in per_dose.values()], marker="o", label=display_name(m.key))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("planted share of the group (%)")
    ax.set_ylabel("planted group's score (z over groups)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("Planted-dose benchmark")
    path = save_figure_atomic(out_dir / "dose.png", fig, dpi=110)
    plt.close(fig)
    return path.name
