"""Per-target orchestration overhead of the Lightning engine (goal: < 10% of one target's compute).

Model: GPT-2-small-sized by default (12 layers, 768 wide, 12 heads, 50,257-token vocabulary, ~124M
parameters, random init). One target = the paper's UnTrac-Inv step: 5 Adam ascent steps on one query,
then one scoring pass over the evaluation documents.

Engine: ``run_attribution`` with one fresh Trainer per target (fit = ascent, predict = scoring),
RestoreWeights, MemoryMonitor and RankingWriter callbacks, run on one query at a time; per-target
time = the engine's ``targets_s`` (its θ0 pass excluded). Bare: the same work as a plain PyTorch loop
on the same model, batches and seeds — copy θ0 back in place, build Adam, 5 x (forward,
``backward(-loss)``, step), then a no-grad per-example-loss pass over the same pre-collated batches.
Each target is measured both ways back to back, in alternating order; overhead = median of the
per-target ratios - 1.

    python benchmarks/bench_overhead.py                      # CPU, GPT-2-small sized (~3-4 min on 2 cores)
    python benchmarks/bench_overhead.py --layers 4           # lighter variant for slow machines
    python benchmarks/bench_overhead.py --device cuda --docs 512
"""
from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from _common import Stopwatch, documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, sync, write_result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=50257, help="model vocabulary (GPT-2: 50,257)")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=4)
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule, plan_micro_batches
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.methods import query_targets
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer
    from untrac_pl.optim import OptimizerSpec, build_optimizer
    from untrac_pl.unlearning import UnTracModule

    docs = documents(args.docs, args.sentences)
    queries = [dict(d, id=f"query-{i}") for i, d in enumerate(documents(args.targets, 3, seed=1))]
    config = gpt2_config(args.layers, args.width, args.heads, 1024, 0.1, vocab=args.vocab_size)
    spec = ModelSpec(config=config, train_tokenizer_vocab=1024)
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    net.to(args.device)
    optimizer_spec = OptimizerSpec()  # Adam, lr 5e-5 (paper)
    schedule = UnlearningSchedule(num_steps=args.steps, num_epochs=None, batch_size=None)
    attribution = AttributionConfig(method="untrac_inv", target_unit="example")

    dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
    dm.tokenize(tokenizer)
    plan = query_targets("untrac_inv", dm.query_corpus, dm.train_corpus, attribution.target_unit, attribution.seed)  # the engine's plan
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in dm.evaluation_dataloader(dm.train_corpus)]
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}

    def bare_target(target) -> float:
        with Stopwatch(args.device) as watch:
            with torch.no_grad():
                for name, p in net.named_parameters():
                    p.copy_(theta0[name])
            pl.seed_everything(target.seed, workers=True, verbose=False)
            net.train()
            optimizer = build_optimizer(optimizer_spec, net.parameters())
            for entry in plan_micro_batches(len(target.indices), schedule, target.seed):
                batch = dm.collator([dm.query_corpus.examples[target.indices[p]] for p in entry["positions"]])
                batch = {k: v.to(args.device) for k, v in batch.items()}
                loss = model_per_example_loss(net, batch).sum() / entry["denominator"]
                (-loss).backward()
                if entry["step_end"]:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            net.eval()
            with torch.inference_mode():
                scores = [model_per_example_loss(net, b).float().cpu() for b in batches]
            del optimizer, scores
        return watch.seconds

    def engine(query: dict) -> tuple[float, dict]:
        """The engine on one target (plus its θ0 pass, which is not counted)."""
        module = UnTracModule(spec, optimizer_spec, schedule)
        module.attach(net, tokenizer)
        data = AttributionDataModule.from_records(docs, [query], max_length=args.max_length, eval_batch_size=args.batch)
        result = run_attribution(module, data, attribution, engine_trainer_kwargs(args.device), write=False)
        assert not result.failed
        return result.timings["targets_s"], result.timings

    bare_target(plan.targets[0])  # warm-up
    bare, engine_s, ratios = [], [], []
    for i, (target, query) in enumerate(zip(plan.targets, queries)):
        # paired and alternately ordered, so a drifting machine load hits both sides alike
        if i % 2 == 0:
            bare.append(bare_target(target))
            seconds, timings = engine(query)
        else:
            seconds, timings = engine(query)
            bare.append(bare_target(target))
        engine_s.append(seconds)
        ratios.append(seconds / bare[-1])
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(theta0[name])
    result = {
        "benchmark": "per-target orchestration overhead: Lightning engine vs bare PyTorch loop, same work",
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": args.vocab_size,
                  "parameters": sum(p.numel() for p in net.parameters())},
        "target": {"ascent_steps": args.steps, "eval_documents": len(docs), "eval_batch": args.batch,
                   "eval_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))},
        "bare_target_s": bare,
        "engine_target_s": engine_s,
        "per_pair_ratio": ratios,
        "overhead_fraction": median(ratios) - 1.0,
        "goal": "< 0.10",
        "environment": environment(args.device),
    }
    write_result("overhead", result, args.out)
    return result


if __name__ == "__main__":
    main()
