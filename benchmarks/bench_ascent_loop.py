"""The ascent loop at the paper's UnTrac regime: batch 1, one epoch over a training group, Adam 5e-5.

At that scale (80,000 sequential steps per run in the paper) what a step costs outside the model decides
the wall time. This measures ascent steps per second of the engine (``run_attribution``, UnTrac, one
fresh Trainer per target, RestoreWeights / MemoryMonitor / RankingWriter callbacks) against a plain
PyTorch loop doing the same work on the same model, data, seeds and optimizer — copy θ0 back, build
Adam, one ``backward(-loss)`` + step per example, then the same scoring of the queries — side by side in
one process, alternating which goes first. The scores of both must be equal.

The engine runs as a user runs it: TensorBoard logger, progress bar, run directory written (rankings,
per-target partial results for resume). Two figures are reported for each side:

- **steady-state step interval**: the time between consecutive ascent step ends inside a target (the
  engine: a callback's ``on_train_batch_end``; the plain loop: after its ``optimizer.step``), i.e. one
  whole cycle of the loop; the first step of each target is excluded (it carries the target's set-up:
  restore, a fresh optimizer, Adam's state allocated on its first step). On CUDA the marks are CUDA
  events recorded on the stream, so timing adds no host synchronisation to either loop. The goal is
  judged on the ratio of the median intervals (plain / engine = engine steps/s over plain steps/s), with
  a 95 % hierarchical bootstrap interval (repeats resampled, then intervals within each): met when the
  interval's lower end clears the goal, missed when its upper end is below it, otherwise not resolved.
- **per-target fixed cost**: (target phase seconds - the target's steady-state intervals) / targets: its
  first step, the restore, the Trainer, the scoring of the queries and (engine) the writes.

    python benchmarks/bench_ascent_loop.py --size tiny      # 2 layers, 128 wide, vocabulary 2,048
    python benchmarks/bench_ascent_loop.py --size small     # GPT-2-small-sized (12 x 768, vocabulary 50,257)
    python benchmarks/bench_ascent_loop.py --size tiny --targets-per-pass 2   # the targets_per_pass path
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from _common import Stopwatch, documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, write_result

SIZES = {"tiny": (2, 128, 2, 2048), "small": (12, 768, 12, 50257)}


class StepMarks:
    """Times of the loop's step ends: ``perf_counter`` on CPU, CUDA events on the stream (no host sync)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(e) / 1000.0 for e in self.marks]
        return [m - self.marks[0] for m in self.marks]


class StepMarkCallback(pl.Callback):
    """The engine's step ends, as a user's callback sees them (after the run's own callbacks)."""

    def __init__(self, marks: StepMarks):
        self.marks = marks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marks.mark()


def steady_intervals(times: list[float], steps_per_target: list[int]) -> list[float]:
    """Intervals between consecutive step ends within each target (its first step excluded)."""
    if len(times) != sum(steps_per_target):
        raise RuntimeError(f"{len(times)} step marks for {sum(steps_per_target)} steps")
    out, start = [], 0
    for n in steps_per_target:
        chunk = times[start:start + n]
        out.extend(b - a for a, b in zip(chunk, chunk[1:]))
        start += n
    return out


def ratio_interval(plain: list[list[float]], engine: list[list[float]], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of median(plain) / median(engine): repeats resampled (paired), then intervals within each."""
    rng = np.random.default_rng(seed)
    plain_arrays, engine_arrays = [np.asarray(r) for r in plain], [np.asarray(r) for r in engine]
    ratios = []
    for _ in range(resamples):
        picks = rng.integers(0, len(plain_arrays), len(plain_arrays))
        p = np.concatenate([rng.choice(plain_arrays[i], plain_arrays[i].size) for i in picks])
        e = np.concatenate([rng.choice(engine_arrays[i], engine_arrays[i].size) for i in picks])
        ratios.append(np.median(p) / np.median(e))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def verdict(low: float, high: float, goal: float) -> str:
    return "met" if low >= goal else "missed" if high < goal else "not resolved"


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
    goal = 0.85 if args.size == "tiny" else 0.95
    docs = [dict(d, group=f"group{i % args.groups}") for i, d in enumerate(documents(n * args.groups, 1, group_names=False))]
    queries = [dict(d, id=f"query-{i}", group="queries") for i, d in enumerate(documents(args.queries, 2, seed=1))]
    spec = ModelSpec(config=gpt2_config(layers, width, heads, 128, 0.0, vocab=vocab), train_tokenizer_vocab=min(vocab, 2048))
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    net.to(args.device)
    optimizer_spec = OptimizerSpec()  # Adam, lr 5e-5 (paper)
    schedule = UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1)
    scratch = tempfile.TemporaryDirectory(prefix="bench_ascent_loop_")
    config = AttributionConfig(method="untrac", target_unit="group", targets_per_pass=args.targets_per_pass,
                               output_dir=str(Path(scratch.name) / "run"), overwrite=True)

    dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=16)
    dm.tokenize(tokenizer)
    module = UnTracModule(spec, optimizer_spec, schedule)
    module.attach(net, tokenizer)
    plan = get_method("untrac").plan(config, dm, module)  # the engine's own targets (ids, indices, seeds)
    query_batches = [{k: v.to(args.device) for k, v in b.items()} for b in dm.evaluation_dataloader(dm.query_corpus)]
    theta0 = {name: p.detach().clone() for name, p in net.named_parameters()}
    # batch 1: one micro-batch per optimizer step, so a step end is a batch end on both sides
    steps_per_target = [len(plan_micro_batches(len(t.indices), schedule, t.seed)) for t in plan.targets]
    steps = sum(steps_per_target)

    def query_losses() -> torch.Tensor:
        out = torch.empty(len(queries))
        for b in query_batches:  # length-sorted batches: put each loss back at its query's position
            out[b["index"].cpu()] = model_per_example_loss(net, b).float().cpu()
        return out

    def plain() -> tuple[float, list[float], torch.Tensor]:
        rows, marks = [], StepMarks(args.device)
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
                    marks.mark()
                net.eval()
                with torch.inference_mode():
                    rows.append(query_losses())
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(theta0[name])
        return watch.seconds, marks.seconds(), torch.stack(rows)

    def engine() -> tuple[float, list[float], torch.Tensor]:
        marks = StepMarks(args.device)
        m = UnTracModule(spec, optimizer_spec, schedule)
        m.attach(net, tokenizer)
        data = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=16)
        # as a user runs it: TensorBoard logger, progress bar, the run directory written
        kwargs = engine_trainer_kwargs(args.device, logger=True, enable_progress_bar=True, callbacks=[StepMarkCallback(marks)])
        result = run_attribution(m, data, config, kwargs)
        assert not result.failed
        return result.timings["targets_s"], marks.seconds(), result.table

    plain()  # warm-up
    total = {"plain": [], "engine": []}
    intervals = {"plain": [], "engine": []}
    for i in range(args.repeats):
        pairs = [plain, engine] if i % 2 == 0 else [engine, plain]  # alternating: a drifting load hits both alike
        out = {fn.__name__: fn() for fn in pairs}
        for side, (seconds, times, _) in out.items():
            total[side].append(seconds)
            intervals[side].append(steady_intervals(times, steps_per_target))
        rows, table = out["plain"][2], out["engine"][2]
    scratch.cleanup()
    with torch.inference_mode():
        net.eval()
        base = query_losses()
    # the engine's table is query-major (queries x groups); the plain loop's rows are per target (group)
    plain_scores = (rows - base).T
    order = [table.col_ids.index(t.id) for t in plan.targets]
    diff = float((table.scores[:, order].double() - plain_scores.double()).abs().max())

    pooled = {side: [x for r in runs for x in r] for side, runs in intervals.items()}
    step_s = {side: median(values) for side, values in pooled.items()}
    ratio = step_s["plain"] / step_s["engine"]
    low, high = ratio_interval(intervals["plain"], intervals["engine"])
    fixed = {side: [(t - sum(r)) / len(plan.targets) for t, r in zip(total[side], intervals[side])] for side in total}
    result = {
        "benchmark": "ascent loop at batch 1: engine vs plain PyTorch loop, same work (UnTrac, one epoch per group)",
        "size": args.size,
        "model": {"layers": layers, "width": width, "heads": heads, "vocab": vocab, "parameters": sum(p.numel() for p in net.parameters())},
        "targets": len(plan.targets), "ascent_steps": steps, "queries": len(queries), "targets_per_pass": args.targets_per_pass,
        "engine_settings": "TensorBoard logger, progress bar, run directory written",
        "steady_step_s": step_s,
        "steady_steps_per_s": {side: 1.0 / s for side, s in step_s.items()},
        "engine_over_plain_steady": ratio,
        "engine_over_plain_steady_ci95": [low, high],
        "per_repeat_steady_ratio": [median(p) / median(e) for p, e in zip(intervals["plain"], intervals["engine"])],
        "goal": goal,
        "goal_verdict": verdict(low, high, goal),
        "per_target_fixed_s": {side: median(v) for side, v in fixed.items()},
        "target_phase_s": total,
        "engine_over_plain_whole_phase": median(total["plain"]) / median(total["engine"]),
        "max_score_difference": diff,
        "environment": environment(args.device),
    }
    write_result(f"ascent_loop_{args.size}" + (f"_k{args.targets_per_pass}" if args.targets_per_pass > 1 else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
