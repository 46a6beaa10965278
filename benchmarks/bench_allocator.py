"""What the C allocator's settings cost a plain PyTorch ascent step on CPU (no untrac-pl code involved).

With glibc's defaults a buffer above the mmap threshold is handed back to the kernel when freed, so a
step that frees and re-allocates its gradients, Adam's temporaries and activations page-faults (and the
kernel zeroes) them again every step. This runs the same batch-1 step of a GPT-2-small-sized model
(Adam, ``backward(-loss)``, ``zero_grad(set_to_none=True)``) in one fresh process per setting and
reports the median step, its system time and minor page faults, and the process's peak RSS.

    python benchmarks/bench_allocator.py            # ~2 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import environment, median, setup, write_result

SETTINGS = {
    "default": {},
    "reuse (GLIBC_TUNABLES mmap_max=0, trim_threshold=4 GiB)": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"},
}


def child(steps: int, tokens: int) -> dict:
    import resource
    import time

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    setup(None)
    net = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max(128, tokens),
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-5)
    x = torch.randint(0, net.config.vocab_size, (1, tokens))
    rows = []
    for _ in range(steps):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = net(input_ids=x, labels=x, use_cache=False).loss
        (-loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((time.perf_counter() - t0, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    rows = rows[2:]  # Adam's state and the first allocations
    return {"step_s": median(r[0] for r in rows), "system_s": median(r[1] for r in rows),
            "minor_faults": median(r[2] for r in rows),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "steps_timed": len(rows)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per setting, alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, args.tokens)))
        return {}
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    for repeat in range(args.repeats):
        for name, env in (list(SETTINGS.items()) if repeat % 2 == 0 else list(SETTINGS.items())[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--tokens", str(args.tokens)],
                                 env={**clean, **env}, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {name: {key: median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    default, reuse = summary.values()
    result = {
        "benchmark": "plain PyTorch batch-1 Adam ascent step, GPT-2-small size, per C-allocator setting (one process each)",
        "tokens": args.tokens, "settings": {name: env or "glibc defaults" for name, env in SETTINGS.items()},
        "runs": runs, "median": summary,
        "reuse_speedup": default["step_s"] / reuse["step_s"],
        "environment": environment("cpu"),
    }
    write_result("allocator", result, args.out)
    return result


if __name__ == "__main__":
    main()
