"""Corpus scale: peak RSS and scoring throughput of UnTrac-Inv against the number of training documents,
and the tokenisation cache's speed-up on a second run (issue 14).

For each corpus size (default 10 k, 100 k, 1 M generated short documents in 8 groups, one JSONL file) two
fresh processes run, one after the other:

  first   ``data.storage: arrow`` with an empty cache: read + validate the file into Arrow, tokenise
          (``data.num_proc`` processes), then UnTrac-Inv with a tiny GPT-2: 2 query subsets of 16
          prompt/completion pairs, 2 ascent steps each, every training document scored on θ0 and after
          each target (3 scoring passes). Peak RSS is the process's ``ru_maxrss`` (it includes the pages of
          the memory-mapped files the run touched, and the tokenizer workers are separate processes).
  second  the same data module over the same cache: read + tokenise only (what a second run pays).

and, for the sizes up to ``--memory-up-to``, the same ``first`` run with ``data.storage: memory`` (records and
tokens as Python lists) side by side, as the reference the Arrow path replaces.

    python benchmarks/bench_corpus_scale.py                          # the committed table (~15 min on 2 cores)
    python benchmarks/bench_corpus_scale.py --sizes 2000 5000 --out /tmp/bench   # smoke test
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, environment, setup, write_result

WORDS = ("the a cat dog bird fish tree river stone cloud road lamp red blue green old new small large quiet loud "
         "runs sits sings falls grows shines waits moves over under near behind beside across into from with").split()
GROUPS = [f"corpus{k}" for k in range(8)]
PAIRS = 16  # prompt/completion pairs per query subset


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14)))
            handle.write(json.dumps({"id": f"doc-{i}", "group": GROUPS[i % len(GROUPS)], "text": words.capitalize() + "."}) + "\n")


def write_queries(path: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for subset in ("subset0", "subset1"):
            for j in range(PAIRS):
                prompt = " ".join(rng.choice(WORDS) for _ in range(6))
                completion = " " + " ".join(rng.choice(WORDS) for _ in range(4))
                handle.write(json.dumps({"id": f"{subset}-{j}", "group": subset, "prompt": prompt, "completion": completion}) + "\n")


def train_tokenizer(folder: Path, corpus: Path) -> None:
    from untrac_pl.data.embedded import train_bpe_tokenizer

    texts = [json.loads(line)["text"] for _, line in zip(range(5000), open(corpus))]
    train_bpe_tokenizer(texts, vocab_size=512).save_pretrained(str(folder))


# -- the child processes --------------------------------------------------------------------------------


def current_rss_mb() -> dict:
    """Resident memory now, from /proc/self/status: VmRSS = RssAnon (the process's own memory) + RssFile
    (pages of mapped files it touched: libraries, the memory-mapped corpus; reclaimable) + RssShmem."""
    fields = {}
    for line in open("/proc/self/status"):
        name = line.split(":")[0]
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(line.split()[1]) / 1024
    return {"total": fields.get("VmRSS"), "anon": fields.get("RssAnon"), "file": fields.get("RssFile")}


def child(args) -> None:
    setup(args.threads)
    import logging

    logging.getLogger("untrac_pl.data.store").setLevel(logging.ERROR)
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.records import DataSource
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.models import ModelSpec, load_tokenizer
    from untrac_pl.optim import OptimizerSpec
    from untrac_pl.unlearning import UnTracModule

    work = Path(args.work)
    dm = AttributionDataModule(train=[DataSource(path=args.corpus)], queries=[DataSource(path=str(work / "queries.jsonl"))],
                               max_length=32, eval_batch_size=args.batch, storage=args.storage, cache_dir=str(work / "cache"),
                               num_proc=args.num_proc)
    spec = ModelSpec(config={"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64,
                             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, tokenizer=str(work / "tokenizer"))
    result = {"storage": args.storage, "phase": args.phase, "rss_mb": {"start": current_rss_mb()}}
    t0 = time.perf_counter()
    dm.load_records()
    result["read_s"] = time.perf_counter() - t0
    result["rss_mb"]["after_read"] = current_rss_mb()
    tokenizer = load_tokenizer(spec)
    t1 = time.perf_counter()
    dm.tokenize(tokenizer)
    result["tokenize_s"] = time.perf_counter() - t1
    result["rss_mb"]["after_tokenize"] = current_rss_mb()
    result["documents"] = len(dm.train_corpus)
    result["tokens"] = int(sum(dm.train_corpus.lengths))
    if args.phase == "first":
        module = UnTracModule(spec, OptimizerSpec(lr=5e-5), UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=4))
        config = AttributionConfig(method="untrac_inv", target_unit="group", output_dir=str(work / f"out-{args.storage}"), overwrite=True)
        t2 = time.perf_counter()
        run = run_attribution(module, dm, config, {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False})
        result["attribution_s"] = time.perf_counter() - t2
        passes = 1 + len(run.table.row_ids)
        scoring = run.timings["base_losses_s"] + run.timings["targets_s"]
        result["scoring_passes"] = passes
        result["scoring_s"] = scoring  # θ0 pass + per target: 2 ascent steps + one pass over every document
        result["docs_per_s"] = passes * result["documents"] / scoring
        result["us_per_doc"] = 1e6 * scoring / (passes * result["documents"])
        result["score_file_mb"] = (work / f"out-{args.storage}" / "scores.safetensors").stat().st_size / 2**20
        result["rss_mb"]["after_attribution"] = current_rss_mb()
        result["engine_memory"] = run.memory  # the engine's own per-phase peaks (memory.json)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


# -- the driver -----------------------------------------------------------------------------------------


def spawn(args, work: Path, corpus: Path, storage: str, phase: str) -> dict:
    result = work / f"{storage}-{phase}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--work", str(work), "--corpus", str(corpus),
               "--storage", storage, "--phase", phase, "--result", str(result), "--batch", str(args.batch),
               "--num-proc", str(args.num_proc), "--threads", str(args.threads)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=str(HERE), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{storage}/{phase} failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out["process_wall_s"] = time.perf_counter() - started
    print(f"  {storage:6s} {phase:6s} {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--memory-up-to", type=int, default=100_000, help="also run data.storage: memory up to this size")
    parser.add_argument("--batch", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--num-proc", type=int, default=2, help="tokenizer processes of the first run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--update-readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--work"), parser.add_argument("--corpus"), parser.add_argument("--storage")
    parser.add_argument("--phase"), parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        return child(args)
    setup(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="untrac-corpus-scale-") as tmp:
        root = Path(tmp)
        for n in args.sizes:
            work = root / f"n{n}"
            work.mkdir()
            corpus = work / "train.jsonl"
            write_corpus(corpus, n)
            write_queries(work / "queries.jsonl")
            train_tokenizer(work / "tokenizer", corpus)
            print(f"{n} documents ({corpus.stat().st_size / 2**20:.1f} MiB of JSONL)", flush=True)
            row = {"documents": n, "jsonl_mb": corpus.stat().st_size / 2**20}
            row["arrow_first"] = spawn(args, work, corpus, "arrow", "first")
            row["arrow_second"] = spawn(args, work, corpus, "arrow", "second")
            if n <= args.memory_up_to:
                row["memory_first"] = spawn(args, work, corpus, "memory", "first")
            first, second = row["arrow_first"], row["arrow_second"]
            row["tokenize_speedup"] = first["tokenize_s"] / second["tokenize_s"]
            row["prepare_speedup"] = (first["read_s"] + first["tokenize_s"]) / (second["read_s"] + second["tokenize_s"])
            rows.append(row)
    result = {"environment": environment("cpu"), "workload": {
        "model": "GPT-2, 2 layers x 64 wide, vocabulary 512, max_length 32", "method": "untrac_inv, target_unit group",
        "queries": f"2 subsets x {PAIRS} prompt/completion pairs", "ascent": "2 steps of Adam 5e-5, batch 4, per subset",
        "eval_batch": args.batch, "num_proc": args.num_proc, "threads": args.threads,
        "documents": "5-14 random words from a 36-word vocabulary, 8 groups, one JSONL file"}, "rows": rows}
    path = write_result("corpus_scale", result, args.out)
    if args.update_readme:
        update_readme(json.loads(path.read_text()), path)  # as written: with the command line


BEGIN, END = "<!-- corpus-scale:begin -->", "<!-- corpus-scale:end -->"


def table(result: dict, path: Path) -> str:
    """The README table of one result file."""
    env = result["environment"]
    lines = [f"Measured {env['date']} by `{result['command']}` ({env['cpu_count']} cores, {env['threads']} threads, torch {env['torch']}; "
             f"`{path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path}`). One run per cell: the figures are "
             "single measurements, not medians (each 1 M-document run takes minutes).", "",
             "| documents | storage | peak RSS (MB) | RSS at the end: anon + file (MB) | RSS after tokenising: anon + file (MB) | "
             "scoring (docs/s) | µs per doc | read (s) | tokenise (s) | 2nd run: read / tokenise (s) | tokenise speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        first, second = row["arrow_first"], row["arrow_second"]
        lines.append(f"| {row['documents']:,} | arrow | {first['peak_rss_mb']:.0f} | {_split(first, 'after_attribution')} | {_split(first, 'after_tokenize')} | "
                     f"{first['docs_per_s']:,.0f} | {first['us_per_doc']:.0f} | {first['read_s']:.1f} | {first['tokenize_s']:.1f} | "
                     f"{second['read_s']:.1f} / {second['tokenize_s']:.2f} | {row['tokenize_speedup']:.0f}× |")
        if "memory_first" in row:
            m = row["memory_first"]
            lines.append(f"| {row['documents']:,} | memory | {m['peak_rss_mb']:.0f} | {_split(m, 'after_attribution')} | {_split(m, 'after_tokenize')} | {m['docs_per_s']:,.0f} | "
                         f"{m['us_per_doc']:.0f} | {m['read_s']:.1f} | {m['tokenize_s']:.1f} | (no cache) | - |")
    return "\n".join(lines) + "\n"


def _split(run: dict, phase: str) -> str:
    rss = run["rss_mb"][phase]
    return f"{rss['anon']:.0f} + {rss['file']:.0f}"


def update_readme(result: dict, path: Path) -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{readme}: no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + table(result, path) + END + tail)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
