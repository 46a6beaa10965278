"""Peak memory of ``parallel_targets: K``: one fresh process per K, K targets of a GPT-2-small-sized model.

Each child builds the model, runs the engine's UnTrac with ``parallel_targets: K`` over K training
groups (2 ascent steps each, batch 1) and reports its peak RSS (``ru_maxrss``; CPU). What K costs is
the difference to K = 1: each extra target holds its copy of the trainable tensors, their gradients
and the optimizer state (Adam: 2 more copies) during the ascent.

    python benchmarks/bench_parallel_memory.py --ks 1,2,4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import environment, write_result

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {here!r})
from _common import documents, engine_trainer_kwargs, gpt2_config, setup
setup(None)
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.models import ModelSpec, load_model_and_tokenizer
from untrac_pl.optim import OptimizerSpec
from untrac_pl.unlearning import UnTracModule
k, layers, width, heads, vocab = {k}, {layers}, {width}, {heads}, {vocab}
docs = [dict(d, group=f"group{{i % k}}") for i, d in enumerate(documents(2 * k, 1, group_names=False))]
queries = [dict(d, id=f"q{{i}}", group="queries") for i, d in enumerate(documents(4, 2, seed=1))]
spec = ModelSpec(config=gpt2_config(layers, width, heads, 128, 0.0, vocab=vocab), train_tokenizer_vocab=2048)
net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
module = UnTracModule(spec, OptimizerSpec(), UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1))
module.attach(net, tokenizer)
dm = AttributionDataModule.from_records(docs, queries, max_length=32, eval_batch_size=8)
result = run_attribution(module, dm, AttributionConfig(method="untrac", target_unit="group", parallel_targets=k), engine_trainer_kwargs("cpu"), write=False)
assert not result.failed
print(json.dumps({{"model_loaded_gb": before / 2**20, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    layers, width, heads, vocab = (12, 768, 12, 50257) if args.size == "small" else (2, 128, 2, 2048)
    rows = {}
    for k in [int(x) for x in args.ks.split(",")]:
        code = CHILD.format(here=here, k=k, layers=layers, width=width, heads=heads, vocab=vocab)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            rows[str(k)] = {"failed": f"exit {done.returncode}", "stderr_tail": done.stderr[-400:]}
            continue
        rows[str(k)] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows.get("1", {}).get("peak_gb")
    for k, row in rows.items():
        if base and "peak_gb" in row:
            row["over_k1_gb"] = row["peak_gb"] - base
            row["per_extra_target_gb"] = (row["peak_gb"] - base) / (int(k) - 1) if int(k) > 1 else None
    result = {"benchmark": "peak RSS of parallel_targets: K (one process per K), UnTrac, batch 1, Adam", "size": args.size,
              "by_parallel_targets": rows, "environment": environment("cpu")}
    write_result(f"parallel_memory_{args.size}", result, args.out)
    return result


if __name__ == "__main__":
    main()
