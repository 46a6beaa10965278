"""End-to-end speed of the engine vs a naive reference on the same queries and corpus (goal >= 20x).

The naive reference is what a first implementation of UnTrac-Inv looks like: for every query it
deep-copies the model, recomputes the θ0 loss of every training document one example at a time
(batch 1), runs the ascent, and scores every document again one at a time. The engine computes θ0
losses once, restores θ0 in place, and scores in length-sorted batches. Both use the same seeds,
optimizer, schedule and pre-tokenised examples, and the benchmark checks that the scores agree
(max |Δ| <= 1e-5: batch-1 and padded-batch forwards differ only in float rounding).

It also measures, in the same run, what the speed-up *can* be on this hardware: the per-example cost
of a bare no-grad forward at batch 1 (the naive loop's pattern) and at the engine's length-sorted
batch. With Q queries the naive loop runs 2·Q forwards per document and the engine Q + 1 batched
ones, so ``attainable = (t_batch1 / t_batched) · 2Q / (Q + 1)`` (forward passes only; the ascent is
the same on both sides). The engine's efficiency is ``ratio / attainable``.

    python benchmarks/bench_naive.py               # CPU defaults (~3 min on 2 busy cores)
    python benchmarks/bench_naive.py --device cuda --train 1024 --queries 8
"""
from __future__ import annotations

import argparse
import copy

import lightning.pytorch as pl
import torch
from _common import Stopwatch, documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, sync, write_result


def naive_scores(net, dm, schedule, optimizer_spec, targets, device: str) -> torch.Tensor:
    from untrac_pl.data.schedule import plan_micro_batches
    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.optim import build_optimizer

    train, queries, collate = dm.train_corpus, dm.query_corpus, dm.collator

    def to(batch):
        return {k: v.to(device) for k, v in batch.items()}

    scores = torch.zeros(len(targets), len(train))
    for row, target in enumerate(targets):
        model = copy.deepcopy(net).to(device)
        model.eval()
        with torch.no_grad():
            base = [float(model_per_example_loss(model, to(collate([ex])))[0]) for ex in train.examples]
        pl.seed_everything(target.seed, workers=True, verbose=False)
        torch.empty((), dtype=torch.int64).random_()  # the engine's DataLoader draws its base seed first
        model.train()
        optimizer = build_optimizer(optimizer_spec, model.parameters())
        for entry in plan_micro_batches(len(target.indices), schedule, target.seed):
            examples = [queries.examples[target.indices[p]] for p in entry["positions"]]
            loss = model_per_example_loss(model, to(collate(examples))).sum() / entry["denominator"]
            (-loss).backward()
            if entry["step_end"]:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            for col, ex in enumerate(train.examples):
                scores[row, col] = float(model_per_example_loss(model, to(collate([ex])))[0]) - base[col]
        del model, optimizer
    return scores


def forward_seconds_per_example(net, dm, batch_size: int, device: str) -> float:
    """Bare no-grad forward + per-example loss over the corpus, in the engine's length-sorted batches."""
    import time

    from untrac_pl.data.collate import LengthSortedBatchSampler
    from untrac_pl.losses import model_per_example_loss

    examples, collate = dm.train_corpus.examples, dm.collator
    sampler = LengthSortedBatchSampler([len(ex["input_ids"]) for ex in examples], batch_size)
    batches = [{k: v.to(device) for k, v in collate([examples[i] for i in positions]).items()} for positions in sampler]
    model = net.to(device).eval()
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            model_per_example_loss(model, batch)
        sync(device)
    return (time.perf_counter() - start) / len(examples)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--train", type=int, default=768, help="training documents (the evaluation set)")
    parser.add_argument("--sentences", type=int, default=2)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.methods import query_targets
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer
    from untrac_pl.optim import OptimizerSpec
    from untrac_pl.unlearning import UnTracModule

    docs = documents(args.train, args.sentences)
    queries = [dict(d, id=f"query-{i}") for i, d in enumerate(documents(args.queries, 2, seed=1))]
    spec = ModelSpec(config=gpt2_config(args.layers, args.width, args.heads, args.max_length, args.dropout), train_tokenizer_vocab=args.vocab)
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    optimizer_spec = OptimizerSpec(lr=1e-3)
    schedule = UnlearningSchedule(num_steps=args.steps, num_epochs=None, batch_size=None)  # paper: whole target, 5 steps
    config = AttributionConfig(method="untrac_inv", target_unit="example")

    def engine():
        module = UnTracModule(spec, optimizer_spec, schedule)
        module.attach(net, tokenizer)
        dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
        with Stopwatch(args.device) as watch:
            result = run_attribution(module, dm, config, engine_trainer_kwargs(args.device), write=False)
        assert not result.failed
        return watch.seconds, result.table.scores

    def naive():
        dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
        dm.tokenize(tokenizer)  # tokenised once, like the engine (not counted against either side)
        plan = query_targets("untrac_inv", dm.query_corpus, dm.train_corpus, config.target_unit, config.seed)  # the engine's plan
        with Stopwatch(args.device) as watch:
            scores = naive_scores(net, dm, schedule, optimizer_spec, plan.targets, args.device)
        return watch.seconds, scores

    probe = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
    probe.tokenize(tokenizer)
    engine_s, naive_s, diffs, batch1_s, batched_s = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved, so load drift hits all sides alike
        seconds, engine_scores = engine()
        engine_s.append(seconds)
        batch1_s.append(forward_seconds_per_example(net, probe, 1, args.device))
        seconds, reference = naive()
        naive_s.append(seconds)
        batched_s.append(forward_seconds_per_example(net, probe, args.batch, args.device))
        diffs.append(float((engine_scores - reference).abs().max()))
    max_diff = max(diffs)
    assert max_diff <= 1e-5, f"engine and naive scores differ by {max_diff}"
    assert float(reference.abs().max()) > 1e-3, "the comparison would be vacuous"
    batching_gain = median(batch1_s) / median(batched_s)
    attainable = batching_gain * 2 * args.queries / (args.queries + 1)
    ratio = median(naive_s) / median(engine_s)
    result = {
        "benchmark": "end-to-end: engine vs naive reference (deepcopy per query, θ0 per query, batch-1 loops)",
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": len(tokenizer), "parameters": sum(p.numel() for p in net.parameters()), "dropout": args.dropout},
        "workload": {"train_documents": len(docs), "queries": args.queries, "ascent_steps": args.steps, "eval_batch": args.batch},
        "engine_s": {"median": median(engine_s), "all": engine_s},
        "naive_s": {"median": median(naive_s), "all": naive_s},
        "ratio": ratio,
        "goal": ">= 20",
        "ceiling": {
            "forward_ms_per_example_batch1": 1e3 * median(batch1_s),
            f"forward_ms_per_example_batch{args.batch}": 1e3 * median(batched_s),
            "batching_gain": batching_gain,
            "theta0_caching_gain": 2 * args.queries / (args.queries + 1),
            "attainable_ratio": attainable,
            "engine_efficiency": ratio / attainable,
        },
        "max_abs_score_difference": max_diff,
        "environment": environment(args.device),
    }
    write_result("naive", result, args.out)
    return result


if __name__ == "__main__":
    main()
