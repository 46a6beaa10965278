"""Several targets unlearned at once (``attribution.parallel_targets: K``) against one after another.

UnTrac at the paper's regime (Adam 5e-5, batch 1, one epoch over each training group), the same
engine, model, data and seeds, dropout off; the only change is ``parallel_targets``. Each
configuration runs ``--repeats`` times in one process, the order rotated every repeat so that a
drifting load hits all alike. Reported: the target phase's seconds (ascent + scoring of every
target; θ0 excluded), ascent steps per second, the speed-up over K = 1 (median of the per-repeat
ratios) and the largest score difference from K = 1 (float rounding alone: dropout is off).

    python benchmarks/bench_parallel_targets.py --size tiny     # 2 x 128 GPT-2, vocabulary 2,048
    python benchmarks/bench_parallel_targets.py --size small    # GPT-2-small-sized (12 x 768, vocabulary 50,257)
"""
from __future__ import annotations

import argparse

from _common import documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, write_result

SIZES = {"tiny": (2, 128, 2, 2048), "small": (12, 768, 12, 50257)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default="1,2,4,8", help="parallel_targets values (1 = the sequential reference)")
    parser.add_argument("--groups", type=int, default=8, help="training groups (targets)")
    parser.add_argument("--group-size", type=int, default=None, help="ascent steps per target (default: tiny 24, small 4)")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer
    from untrac_pl.optim import OptimizerSpec
    from untrac_pl.unlearning import UnTracModule

    layers, width, heads, vocab = SIZES[args.size]
    ks = [int(k) for k in args.ks.split(",")]
    if ks[0] != 1:
        ks = [1] + ks
    n = args.group_size or (24 if args.size == "tiny" else 4)
    docs = [dict(d, group=f"group{i % args.groups}") for i, d in enumerate(documents(n * args.groups, 1, group_names=False))]
    queries = [dict(d, id=f"query-{i}", group="queries") for i, d in enumerate(documents(args.queries, 2, seed=1))]
    spec = ModelSpec(config=gpt2_config(layers, width, heads, 128, 0.0, vocab=vocab), train_tokenizer_vocab=min(vocab, 2048))
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    net.to(args.device)
    schedule = UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1)
    steps = n * args.groups

    def engine(k: int):
        module = UnTracModule(spec, OptimizerSpec(), schedule)  # Adam, lr 5e-5 (paper)
        module.attach(net, tokenizer)
        data = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=16)
        config = AttributionConfig(method="untrac", target_unit="group", parallel_targets=k)
        result = run_attribution(module, data, config, engine_trainer_kwargs(args.device), write=False)
        assert not result.failed
        return result.timings["targets_s"], result.table.scores.double()

    engine(ks[-1])  # warm-up (and the vmap path's first trace)
    seconds = {k: [] for k in ks}
    ratios = {k: [] for k in ks}
    scores = {}
    for r in range(args.repeats):
        order = ks[r % len(ks):] + ks[: r % len(ks)]  # rotated each repeat
        out = {}
        for k in order:
            out[k] = engine(k)
            seconds[k].append(out[k][0])
            scores[k] = out[k][1]
        for k in ks:
            ratios[k].append(out[1][0] / out[k][0])
    rows = {
        str(k): {
            "targets_s": seconds[k],
            "steps_per_s": steps / median(seconds[k]),
            "speedup_over_sequential": median(ratios[k]),
            "max_score_difference_vs_sequential": float((scores[k] - scores[1]).abs().max()),
            "score_scale": float(scores[1].abs().max()),
        }
        for k in ks
    }
    result = {
        "benchmark": "UnTrac, batch 1, one epoch per group, Adam 5e-5: K targets at once (vmap) vs one after another",
        "size": args.size,
        "model": {"layers": layers, "width": width, "heads": heads, "vocab": vocab, "parameters": sum(p.numel() for p in net.parameters())},
        "targets": args.groups, "ascent_steps": steps, "queries": len(queries), "max_length": args.max_length,
        "by_parallel_targets": rows,
        "environment": environment(args.device),
    }
    write_result(f"parallel_targets_{args.size}", result, args.out)
    return result


if __name__ == "__main__":
    main()
