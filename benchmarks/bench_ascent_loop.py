"""The ascent loop at the paper's UnTrac regime: batch 1, one epoch over a training group, Adam 5e-5.

At that scale (80,000 sequential steps per run in the paper) what a step costs outside the model decides
the wall time. This measures ascent steps per second of the engine (``run_attribution``, UnTrac, one
fresh Trainer per target, RestoreWeights / MemoryMonitor / RankingWriter callbacks) against a plain
PyTorch loop doing the same work on the same model, data, seeds and optimizer — copy θ0 back, build
Adam, one ``backward(-loss)`` + step per example, then the same scoring of the queries. The scores of
both must be equal. By default (``--engine-settings user``) the engine runs as a user runs it:
TensorBoard logger, progress bar, run directory written (rankings, per-target results for resume).

Two designs, both in one run (``--mode both``):

- **lockstep** (the steady-state step rate; what the goal is judged on): the plain loop runs on its own
  copy of the model *interleaved with the engine step by step* — after each engine step a callback runs
  one plain step — so both see the same machine state to within a second (this CPU's speed drifts by
  ±25 % between 15-second windows). Engine interval = from the end of the plain step to the end of the
  engine's next step (one whole cycle of the Trainer's loop, its callbacks included); plain interval =
  the plain step. The first step of each target is excluded on both sides (it carries the target's
  set-up: restore, a fresh optimizer, Adam's state allocated). Two ratios: median plain interval /
  median engine interval (the typical step), and total plain / total engine time (steps/s over the
  loop, the periodic costs included), each with a 95 % bootstrap interval that resamples the runs,
  then blocks of consecutive (engine, plain) step pairs within each: the goal is met when both lower
  ends clear it, missed when both upper ends are below it, otherwise not resolved. Interleaving slows
  both sides (each finds the caches filled by the other's model), so lockstep rates are below what
  either reaches alone; the ratio is what it measures.
- **sequential**: the engine's whole target phase against the plain loop's, one after the other,
  alternating which goes first; from it the **per-target fixed cost** of each side:
  (phase seconds - the steady-state intervals) / targets (the first step, restore, Trainer, scoring of
  the queries and, for the engine, its writes).

On CUDA every mark is a CUDA event recorded on the stream, so timing adds no host synchronisation (not
yet run on a GPU; there the per-target fixed cost mixes device-timeline intervals with host phase times).

    python benchmarks/bench_ascent_loop.py --size tiny      # 2 layers, 128 wide, vocabulary 2,048
    python benchmarks/bench_ascent_loop.py --size small     # GPT-2-small-sized (12 x 768, vocabulary 50,257)
    python benchmarks/bench_ascent_loop.py --size tiny --targets-per-pass 2   # the targets_per_pass path
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from _common import Stopwatch, documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, write_result

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule, plan_micro_batches
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.losses import model_per_example_loss
from untrac_pl.methods import get_method
from untrac_pl.models import ModelSpec, load_model_and_tokenizer
from untrac_pl.optim import OptimizerSpec, build_optimizer
from untrac_pl.unlearning import UnTracModule

SIZES = {"tiny": (2, 128, 2, 2048), "small": (12, 768, 12, 50257)}


class StepMarks:
    """Times of step ends: ``perf_counter`` on CPU, CUDA events on the stream (no host sync)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []

    def mark(self) -> int:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self) -> list[float]:
        if not self.marks:
            return []
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


class PlainLoop:
    """The bare PyTorch reference: the same steps on ``net`` (θ0 copied back per target)."""

    def __init__(self, net, theta0, dm, schedule, optimizer_spec, query_batches, n_queries, device):
        self.net, self.theta0, self.dm, self.schedule = net, theta0, dm, schedule
        self.optimizer_spec, self.query_batches, self.n_queries, self.device = optimizer_spec, query_batches, n_queries, device

    def load_theta0(self) -> None:
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                p.copy_(self.theta0[name])

    def start(self, target):
        self.load_theta0()
        pl.seed_everything(target.seed, workers=True, verbose=False)
        self.net.train()
        self.target = target
        self.optimizer = build_optimizer(self.optimizer_spec, self.net.parameters())
        return iter(plan_micro_batches(len(target.indices), self.schedule, target.seed))

    def step(self, entry) -> None:
        batch = self.dm.collator([self.dm.train_corpus.examples[self.target.indices[p]] for p in entry["positions"]])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = model_per_example_loss(self.net, batch).sum() / entry["denominator"]
        (-loss).backward()
        if entry["step_end"]:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def scores_row(self) -> torch.Tensor:
        self.net.eval()
        out = torch.empty(self.n_queries)
        with torch.inference_mode():
            for b in self.query_batches:  # length-sorted batches: put each loss back at its query's position
                out[b["index"].cpu()] = model_per_example_loss(self.net, b).float().cpu()
        return out


class LockstepPlain(pl.Callback):
    """After each engine step, one step of the plain loop on its own model copy (same target, same data)."""

    def __init__(self, plain: PlainLoop, marks: StepMarks):
        self.plain, self.marks = plain, marks
        self.pairs: list[tuple[int, int, int]] = []  # (previous plain end, engine end, plain start) mark indices
        self.plain_ends: list[int] = []
        self.rows: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.entries = self.plain.start(pl_module.target)
        self.first, self.last_end = True, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine_end = self.marks.mark()
        self.plain.step(next(self.entries))
        plain_end = self.marks.mark()
        if not self.first:  # a target's first step carries its set-up on both sides
            self.pairs.append((self.last_end, engine_end, plain_end))
        self.first, self.last_end = False, plain_end

    def on_train_end(self, trainer, pl_module) -> None:
        if next(self.entries, None) is not None:
            raise RuntimeError("the plain loop has steps left: the engine ran fewer steps than planned")
        self.rows[pl_module.target.id] = self.plain.scores_row()

    def intervals(self) -> tuple[list[float], list[float]]:
        t = self.marks.seconds()
        return [t[e] - t[p] for p, e, _ in self.pairs], [t[q] - t[e] for _, e, q in self.pairs]


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


def ratios(engine: np.ndarray, plain: np.ndarray) -> tuple[float, float]:
    """(median plain / median engine, total plain / total engine): the typical step, and steps/s over
    the whole loop, the periodic costs (an RSS sample every 16 steps, a log write every 50) included."""
    return float(np.median(plain) / np.median(engine)), float(plain.sum() / engine.sum())


def ratio_intervals(runs: list[tuple[list[float], list[float]]], resamples: int = 2000, block: int = 8,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % intervals of both :func:`ratios`: runs resampled, then blocks of ``block`` consecutive step
    pairs within each (a moving-block bootstrap: neighbouring steps share the machine's drift)."""
    rng = np.random.default_rng(seed)
    arrays = [(np.asarray(e), np.asarray(p)) for e, p in runs]
    draws = []
    for _ in range(resamples):
        engine, plain = [], []
        for i in rng.integers(0, len(arrays), len(arrays)):
            e, p = arrays[i]
            b = max(1, min(block, e.size))
            starts = rng.integers(0, e.size - b + 1, -(-e.size // b))
            pick = (starts[:, None] + np.arange(b)[None, :]).reshape(-1)[: e.size]
            engine.append(e[pick])
            plain.append(p[pick])
        draws.append(ratios(np.concatenate(engine), np.concatenate(plain)))
    draws = np.asarray(draws)
    return {name: tuple(float(x) for x in np.percentile(draws[:, j], [2.5, 97.5])) for j, name in enumerate(("median", "mean"))}


def verdict(intervals, goal: float) -> str:
    """Met when every interval's lower end clears the goal, missed when every upper end is below it."""
    if all(low >= goal for low, _ in intervals):
        return "met"
    return "missed" if all(high < goal for _, high in intervals) else "not resolved"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--group-size", type=int, default=None, help="ascent steps per target (default: tiny 150, small 24)")
    parser.add_argument("--groups", type=int, default=2, help="targets (training groups) per engine run")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--mode", choices=["both", "lockstep", "sequential"], default="both")
    parser.add_argument("--repeats", type=int, default=3, help="engine runs per design")
    parser.add_argument("--targets-per-pass", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--engine-settings", choices=["user", "bare"], default="user",
                        help="user: TensorBoard logger, progress bar, run directory written; bare: none of them")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

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
    plain_loop = PlainLoop(net, theta0, dm, schedule, optimizer_spec, query_batches, len(queries), args.device)
    base = plain_loop.scores_row()  # θ0's query losses

    def plain() -> tuple[float, list[float], dict]:
        rows, marks = {}, StepMarks(args.device)
        with Stopwatch(args.device) as watch:
            for target in plan.targets:
                for entry in plain_loop.start(target):
                    plain_loop.step(entry)
                    marks.mark()
                rows[target.id] = plain_loop.scores_row()
        plain_loop.load_theta0()  # the engine's next run starts from θ0
        return watch.seconds, marks.seconds(), rows

    def engine(*callbacks):
        m = UnTracModule(spec, optimizer_spec, schedule)
        m.attach(net, tokenizer)
        data = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=16)
        user = args.engine_settings == "user"  # as a user runs it: TensorBoard logger, progress bar, the run directory written
        kwargs = engine_trainer_kwargs(args.device, logger=user, enable_progress_bar=user, callbacks=list(callbacks))
        result = run_attribution(m, data, config, kwargs, write=user)
        assert not result.failed
        return result

    def score_difference(table, rows: dict) -> float:
        plain_scores = torch.stack([rows[t.id] - base for t in plan.targets]).T  # queries x targets
        order = [table.col_ids.index(t.id) for t in plan.targets]
        return float((table.scores[:, order].double() - plain_scores.double()).abs().max())

    plain()  # warm-up
    result = {
        "benchmark": "ascent loop at batch 1: engine vs plain PyTorch loop, same work (UnTrac, one epoch per group)",
        "size": args.size,
        "model": {"layers": layers, "width": width, "heads": heads, "vocab": vocab, "parameters": sum(p.numel() for p in net.parameters())},
        "targets": len(plan.targets), "ascent_steps": steps, "queries": len(queries), "targets_per_pass": args.targets_per_pass,
        "engine_settings": {"user": "TensorBoard logger, progress bar, run directory written", "bare": "no logger, no progress bar, nothing written"}[args.engine_settings],
        "goal": goal,
    }
    differences = []
    if args.mode in ("both", "lockstep"):
        twin = copy.deepcopy(net)
        twin_loop = PlainLoop(twin, theta0, dm, schedule, optimizer_spec, query_batches, len(queries), args.device)
        runs = []
        for _ in range(args.repeats):
            marks = StepMarks(args.device)
            lockstep = LockstepPlain(twin_loop, marks)
            result_engine = engine(lockstep)
            runs.append(lockstep.intervals())
            differences.append(score_difference(result_engine.table, lockstep.rows))
        del twin, twin_loop
        engine_steps = np.asarray([x for e, _ in runs for x in e])
        plain_steps = np.asarray([x for _, p in runs for x in p])
        steady = {"engine": float(np.median(engine_steps)), "plain": float(np.median(plain_steps))}
        by_median, by_mean = ratios(engine_steps, plain_steps)
        ci = ratio_intervals(runs)
        result["lockstep"] = {
            "note": "each side with the other's step between its own steps: rates below what either reaches alone",
            "steady_step_s": steady,
            "mean_step_s": {"engine": float(engine_steps.mean()), "plain": float(plain_steps.mean())},
            "steps_per_s": {"engine": 1.0 / float(engine_steps.mean()), "plain": 1.0 / float(plain_steps.mean())},
            "paired_steps": int(engine_steps.size),
            "engine_over_plain": by_median,
            "engine_over_plain_ci95": list(ci["median"]),
            "engine_over_plain_steps_per_s": by_mean,
            "engine_over_plain_steps_per_s_ci95": list(ci["mean"]),
            "per_run_ratio": [ratios(np.asarray(e), np.asarray(p))[0] for e, p in runs],
            "goal_verdict": verdict([ci["median"], ci["mean"]], goal),
            "intervals_s": [{"engine": [round(x, 6) for x in e], "plain": [round(x, 6) for x in p]} for e, p in runs],
        }
    if args.mode in ("both", "sequential"):
        total = {"plain": [], "engine": []}
        intervals = {"plain": [], "engine": []}
        for i in range(args.repeats):
            for side in (["plain", "engine"] if i % 2 == 0 else ["engine", "plain"]):  # alternating: a drifting load hits both alike
                if side == "plain":
                    seconds, times, rows = plain()
                else:
                    marks = StepMarks(args.device)
                    result_engine = engine(StepMarkCallback(marks))
                    seconds, times = result_engine.timings["targets_s"], marks.seconds()
                    table = result_engine.table
                total[side].append(seconds)
                intervals[side].append(steady_intervals(times, steps_per_target))
            differences.append(score_difference(table, rows))
        fixed = {side: [(t - sum(r)) / len(plan.targets) for t, r in zip(total[side], intervals[side])] for side in total}
        result["sequential"] = {
            "target_phase_s": total,
            "engine_over_plain_whole_phase": median(total["plain"]) / median(total["engine"]),
            "steady_step_s": {side: median([x for r in runs for x in r]) for side, runs in intervals.items()},
            "per_target_fixed_s": {side: median(v) for side, v in fixed.items()},
            "intervals_s": {side: [[round(x, 6) for x in r] for r in runs] for side, runs in intervals.items()},
        }
    scratch.cleanup()
    result["max_score_difference"] = max(differences)
    result["environment"] = environment(args.device)
    write_result(f"ascent_loop_{args.size}" + (f"_k{args.targets_per_pass}" if args.targets_per_pass > 1 else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
