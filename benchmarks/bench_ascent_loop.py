"""The ascent loop at the paper's UnTrac regime: batch 1, one epoch over a training group, Adam 5e-5.

At that scale (80,000 sequential steps per run in the paper) what a step costs outside the model decides
the wall time. This measures ascent steps per second of the engine (``run_attribution``, UnTrac, one
fresh Trainer per target, RestoreWeights / MemoryMonitor / RankingWriter callbacks) against a plain
PyTorch loop doing the same work on the same model, data, seeds and optimizer — copy θ0 back, build
Adam, one ``backward(-loss)`` + step per example, then the same scoring of the queries — side by side in
one process, alternating which goes first. Steps/s = ascent steps / the target phase's seconds (ascent
and scoring of each target; the θ0 pass excluded). The scores of both must be equal.

    python benchmarks/bench_ascent_loop.py --size tiny      # 2 layers, 128 wide, vocabulary 2,048
    python benchmarks/bench_ascent_loop.py --size small     # GPT-2-small-sized (12 x 768, vocabulary 50,257)
    python benchmarks/bench_ascent_loop.py --size tiny --targets-per-pass 2   # the targets_per_pass path
"""
from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from _common import Stopwatch, documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, write_result

SIZES = {"tiny": (2, 128, 2, 2048), "small": (12, 768, 12, 50257)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--group-size", type=int, default=None, help="ascent steps per target (default: tiny 150, small 24)")
    parser.add_argument("--groups", type=int, default=2, help="targets (training groups) per engine run")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets-per-pass", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule, plan_micro_batches
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.methods import get_method
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer
    from untrac_pl.optim import OptimizerSpec, build_optimizer
    from untrac_pl.unlearning import UnTracModule

    layers, width, heads, vocab = SIZES[args.size]
    n = args.group_size or (150 if args.size == "tiny" else 24)
    docs = [dict(d, group=f"group{i % args.groups}") for i, d in enumerate(documents(n * args.groups, 1, group_names=False))]
    queries = [dict(d, id=f"query-{i}", group="queries") for i, d in enumerate(documents(args.queries, 2, seed=1))]
    spec = ModelSpec(config=gpt2_config(layers, width, heads, 128, 0.0, vocab=vocab), train_tokenizer_vocab=min(vocab, 2048))
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    net.to(args.device)
    optimizer_spec = OptimizerSpec()  # Adam, lr 5e-5 (paper)
    schedule = UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1)
    config = AttributionConfig(method="untrac", target_unit="group", targets_per_pass=args.targets_per_pass)

    dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=16)
    dm.tokenize(tokenizer)
    module = UnTracModule(spec, optimizer_spec, schedule)
    module.attach(net, tokenizer)
    plan = get_method("untrac").plan(config, dm, module)  # the engine's own targets (ids, indices, seeds)
    query_batches = [{k: v.to(args.device) for k, v in b.items()} for b in dm.evaluation_dataloader(dm.query_corpus)]
    theta0 = {name: p.detach().clone() for name, p in net.named_parameters()}
    steps = sum(len(plan_micro_batches(len(t.indices), schedule, t.seed)) for t in plan.targets)

    def query_losses() -> torch.Tensor:
        out = torch.empty(len(queries))
        for b in query_batches:  # length-sorted batches: put each loss back at its query's position
            out[b["index"].cpu()] = model_per_example_loss(net, b).float().cpu()
        return out

    def plain() -> tuple[float, torch.Tensor]:
        rows = []
        with Stopwatch(args.device) as watch:
            for target in plan.targets:
                with torch.no_grad():
                    for name, p in net.named_parameters():
                        p.copy_(theta0[name])
                pl.seed_everything(target.seed, workers=True, verbose=False)
                net.train()
                optimizer = build_optimizer(optimizer_spec, net.parameters())
                for entry in plan_micro_batches(len(target.indices), schedule, target.seed):
                    batch = dm.collator([dm.train_corpus.examples[target.indices[p]] for p in entry["positions"]])
                    batch = {k: v.to(args.device) for k, v in batch.items()}
                    loss = model_per_example_loss(net, batch).sum() / entry["denominator"]
                    (-loss).backward()
                    if entry["step_end"]:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                net.eval()
                with torch.inference_mode():
                    rows.append(query_losses())
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(theta0[name])
        return watch.seconds, torch.stack(rows)

    def engine() -> tuple[float, torch.Tensor]:
        m = UnTracModule(spec, optimizer_spec, schedule)
        m.attach(net, tokenizer)
        data = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=16)
        result = run_attribution(m, data, config, engine_trainer_kwargs(args.device), write=False)
        assert not result.failed
        return result.timings["targets_s"], result.table

    base = None
    plain()  # warm-up
    plain_s, engine_s, ratios = [], [], []
    for i in range(args.repeats):
        pairs = [plain, engine] if i % 2 == 0 else [engine, plain]  # alternating: a drifting load hits both alike
        out = {fn.__name__: fn() for fn in pairs}
        plain_s.append(out["plain"][0])
        engine_s.append(out["engine"][0])
        ratios.append(out["plain"][0] / out["engine"][0])
        rows, table = out["plain"][1], out["engine"][1]
    with torch.inference_mode():
        net.eval()
        base = query_losses()
    # the engine's table is query-major (queries x groups); the plain loop's rows are per target (group)
    plain_scores = (rows - base).T
    order = [table.col_ids.index(t.id) for t in plan.targets]
    diff = float((table.scores[:, order].double() - plain_scores.double()).abs().max())
    result = {
        "benchmark": "ascent loop at batch 1: engine vs plain PyTorch loop, same work (UnTrac, one epoch per group)",
        "size": args.size,
        "model": {"layers": layers, "width": width, "heads": heads, "vocab": vocab, "parameters": sum(p.numel() for p in net.parameters())},
        "targets": len(plan.targets), "ascent_steps": steps, "queries": len(queries), "targets_per_pass": args.targets_per_pass,
        "plain_s": plain_s, "engine_s": engine_s,
        "plain_steps_per_s": steps / median(plain_s), "engine_steps_per_s": steps / median(engine_s),
        "engine_over_plain_throughput": median(ratios),
        "max_score_difference": diff,
        "goal": ">= 0.95 (GPT-2-small size), >= 0.85 (tiny); scores identical",
        "environment": environment(args.device),
    }
    write_result(f"ascent_loop_{args.size}" + (f"_k{args.targets_per_pass}" if args.targets_per_pass > 1 else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
