"""Run the four scale benchmarks in one go and put their ratios in a table (benchmarks/README.md).

    python benchmarks/run_all.py --threads 1 --update-readme          # what produced the README table
    python benchmarks/run_all.py --device cuda --gpu-sizes --out runs/gpu_check/bench
    python benchmarks/run_all.py --tiny --out /tmp/bench               # smoke test (seconds, meaningless numbers)

Each benchmark runs in its own process (so thread settings and allocator state do not leak between
them), writes ``<out>/<name>.json``, and the table is built from those files.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- scale-benchmarks:begin -->", "<!-- scale-benchmarks:end -->"

TINY = {
    "throughput": ["--layers", "2", "--width", "64", "--heads", "2", "--vocab", "300", "--docs", "24", "--sentences", "2", "--targets", "2", "--k", "2"],
    "naive": ["--layers", "2", "--width", "32", "--heads", "2", "--vocab", "300", "--train", "24", "--queries", "2", "--steps", "2", "--repeats", "1"],
    "overhead": ["--layers", "2", "--width", "64", "--heads", "2", "--vocab-size", "512", "--docs", "8", "--targets", "2", "--steps", "2"],
    "memory": ["--layers", "2", "--width", "64", "--heads", "2", "--vocab", "300", "--batch", "2", "--max-length", "32", "--sentences", "2"],
}
GPU = {  # sizes for an accelerator: GPT-2-small everywhere, larger evaluation sets
    "throughput": ["--precision", "16-mixed", "--layers", "12", "--width", "768", "--heads", "12", "--vocab", "8192", "--docs", "2048", "--batch", "64", "--targets", "4", "--k", "4"],
    "naive": ["--train", "1024", "--queries", "4"],
    "overhead": ["--docs", "256", "--batch", "32", "--max-length", "128", "--targets", "4"],
    "memory": ["--layers", "12", "--width", "768", "--heads", "12", "--vocab", "8192", "--batch", "16", "--max-length", "256", "--sentences", "24"],
}


def run(name: str, extra: list[str], args) -> dict:
    command = [sys.executable, str(HERE / f"bench_{name}.py"), "--device", args.device, "--out", args.out, *extra]
    if args.threads:
        command += ["--threads", str(args.threads)]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=str(HERE), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"bench_{name}.py failed (exit {proc.returncode})")
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((Path(args.out) / f"{name}.json").read_text())


def table(results: dict, out: str = "benchmarks/results") -> str:
    rows = ["| benchmark | measured | goal | met | setting |", "|---|---|---|---|---|"]

    def add(name, value, goal, met, setting):
        rows.append(f"| {name} | {value} | {goal} | {'yes' if met else '**no**'} | {setting} |")

    t = results.get("throughput")
    if t:
        m = t["model"]
        k = next(key for key in t if key.startswith("targets_per_pass_"))
        add("scoring throughput, UnTrac-Inv / bare no-grad forward", f"{t['ratio']:.2f}", "≥ 0.9", t["ratio"] >= 0.9,
            f"{m['layers']}×{m['width']} GPT-2, {t['eval_set']['tokens']} tokens, batch {t['eval_set']['batch']}, {t['precision']}; median of {len(t['ratios'])} paired passes")
        add(f"… with `targets_per_pass: {k.rsplit('_', 1)[1]}`, per target", f"{t[k]['ratio_per_target']:.2f}", "(≥ 0.9)", t[k]["ratio_per_target"] >= 0.9,
            "k parameter sets per collated batch (torch.func.functional_call)")
    n = results.get("naive")
    if n:
        add("end-to-end speed-up vs naive reference", f"{n['ratio']:.1f}×", "≥ 20×", n["ratio"] >= 20,
            f"{n['workload']['queries']} queries × {n['workload']['train_documents']} docs, {n['model']['layers']}×{n['model']['width']} GPT-2; identical scores (max abs diff {n['max_abs_score_difference']:.1e})")
        c = n.get("ceiling")
        if c:
            add("… attainable on this hardware (forward passes only)", f"{c['attainable_ratio']:.1f}×", "-", c["attainable_ratio"] >= 20,
                f"batch-1 forward {c['batching_gain']:.1f}× slower per example than batch {n['workload']['eval_batch']}, × {c['theta0_caching_gain']:.2f} for θ0 cached; "
                f"the engine reaches {100 * c['engine_efficiency']:.0f}% of it")
    o = results.get("overhead")
    if o:
        m = o["model"]
        add("per-target orchestration overhead", f"{100 * o['overhead_fraction']:.1f}%", "< 10%", o["overhead_fraction"] < 0.10,
            f"{m['layers']}×{m['width']} GPT-2, {m['parameters'] / 1e6:.0f}M params; {o['target']['ascent_steps']} Adam steps + {o['target']['eval_documents']} docs scored per target")
    mem = results.get("memory")
    if mem:
        for label, row in mem["rows"].items():
            if row.get("variant") is None:  # a result file from before the LoRA rows: its host figure was not a measurement on CPU
                row = {**row, "variant": "full model", "snapshot_bytes": None,
                       "ratio_snapshot_on_host": row["ratio_snapshot_on_host"] if mem["measure"].startswith("torch.cuda") else None}
            host = row.get("ratio_snapshot_on_host")
            note = (f"θ0 snapshot ({row['snapshot_bytes'] / 2**20:.1f} MiB of trainable tensors) on the device"
                    if row.get("snapshot_bytes") else "θ0 snapshot on the device")
            note += (f"; in host memory (`snapshot_device: cpu`): {host:.3f}" if host is not None
                     else "; on CPU there is no separate host memory to keep it in, so this is the whole peak")
            add(f"peak memory, unlearning / fine-tuning, {label}", f"{row['ratio_snapshot_on_device']:.3f}", "≤ 1.05",
                row["ratio_snapshot_on_device"] <= 1.05, note)
    env = next((r for r in results.values() if not r.get("_reused")), next(iter(results.values())))["environment"]
    where = env.get("gpu") or f"CPU, {env['threads']} thread(s) of {env['cpu_count']} cores"
    rows.append("")
    shown = [a for a in sys.argv[1:] if a not in ("--reuse", "--update-readme")]
    reused = [name for name, r in results.items() if r.get("_reused")]
    fresh = [name for name in results if name not in reused]
    command = f"`{' '.join(['python', 'benchmarks/run_all.py'] + shown)}`"
    if not reused:
        rows.append(f"Measured in one run of {command} on {where}, torch {env['torch']}; raw numbers in `{out}/*.json`.")
    else:
        dates = sorted({results[n]["environment"].get("date", "an earlier day") for n in reused})
        rows.append(f"Rows of {', '.join(fresh) or 'no benchmark'} measured in this run of {command} on {where}, torch {env['torch']}; "
                    f"rows of {', '.join(reused)} reused from an earlier run (`--reuse`, measured {', '.join(dates)}); raw numbers in `{out}/*.json`.")
    return "\n".join(rows)


def update_readme(text: str) -> None:
    path = HERE / "README.md"
    readme = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        readme = head + block + rest.split(END, 1)[1]
    else:
        readme = readme.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(readme)
    print(f"updated {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--gpu-sizes", action="store_true")
    parser.add_argument("--only", nargs="*", default=["throughput", "naive", "overhead", "memory"])
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse <out>/<name>.json files that exist")
    args = parser.parse_args(argv)
    args.out = str(Path(args.out).resolve())  # the benchmarks run with cwd=benchmarks/
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sizes = TINY if args.tiny else GPU if args.gpu_sizes else {}
    results = {}
    for name in args.only:
        existing = Path(args.out) / f"{name}.json"
        if args.reuse and existing.exists():
            results[name] = {**json.loads(existing.read_text()), "_reused": True}
        else:
            results[name] = run(name, sizes.get(name, []), args)
    text = table(results, Path(args.out).resolve().relative_to(HERE.parent).as_posix() if Path(args.out).resolve().is_relative_to(HERE.parent) else args.out)
    print(text)
    (Path(args.out) / "table.md").write_text(text + "\n")
    if args.update_readme:
        update_readme(text)


if __name__ == "__main__":
    main()
