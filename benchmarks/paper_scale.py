"""What the paper's Experiment 2 would cost with the engine: per-step times measured at its sizes, then multiplied.

The paper (docs/paper.md): an OPT-125M-sized model, 1,024-token blocks; UnTrac unlearns each of 8
corpora for one epoch at batch 1 over a 10,000-sequence sample (80,000 ascent steps per run) and
scores the 26 test subsets (256 short examples each) after each corpus; UnTrac-Inv unlearns each of
the 26 subsets (256 examples in one batch) for 5 steps and scores the 80,000 training sequences after
each. Measured here on a GPT-2-small-sized model (12 × 768, vocabulary 50,257; 124 M parameters,
OPT-125M's size), every figure through the engine (``run_attribution``), with fixed costs removed by
differences (two runs that differ only in the number of steps, or of scored sequences):

* ``ascent_step_s``: one UnTrac step at batch 1 × ``--block`` tokens (Adam, dropout off);
* ``parallel_step_s``: one step of ``--k`` targets at once (``parallel_targets``), per target;
* ``score_block_s``: one ``--block``-token sequence scored (no-grad forward, eval batch 8);
* ``inv_step_s``: one UnTrac-Inv step over 256 test-length examples (``--test-tokens`` each), in
  micro-batches of 32 (the paper's gradient accumulation);
* ``score_test_s``: one test example scored.

    python benchmarks/paper_scale.py                  # ~10 min on 2 CPU cores
    python benchmarks/paper_scale.py --device cuda    # one GPU
"""
from __future__ import annotations

import argparse
import time

from _common import documents, engine_trainer_kwargs, environment, gpt2_config, setup, write_result

PAPER = {"corpora": 8, "sequences_per_corpus": 10_000, "test_subsets": 26, "test_examples_per_subset": 256, "inv_steps": 5}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block", type=int, default=1024, help="tokens per training sequence (paper: 1,024)")
    parser.add_argument("--test-tokens", type=int, default=32, help="tokens per test example")
    parser.add_argument("--k", type=int, default=2, help="parallel_targets measured")
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

    long_docs = documents(24, 160, group_names=False)  # ~1,500+ tokens each: cut to --block
    short = documents(256, 2, seed=1, group_names=False)
    spec = ModelSpec(config=gpt2_config(12, 768, 12, max(1024, args.block), 0.0, vocab=50257), train_tokenizer_vocab=2048)
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in long_docs + short])
    net.to(args.device)
    kwargs = engine_trainer_kwargs(args.device)

    def run(method: str, train: list[dict], queries: list[dict], schedule: UnlearningSchedule, max_length: int, **config) -> dict:
        module = UnTracModule(spec, OptimizerSpec(), schedule)  # Adam 5e-5 (paper)
        module.attach(net, tokenizer)
        dm = AttributionDataModule.from_records(train, queries, max_length=max_length, eval_batch_size=8)
        started = time.perf_counter()
        result = run_attribution(module, dm, AttributionConfig(method=method, target_unit="group", **config), kwargs, write=False)
        assert not result.failed
        return dict(result.timings, wall_s=time.perf_counter() - started)

    def groups(docs, names):
        return [dict(d, id=f"{n}-{i}", group=n) for n in names for i, d in enumerate(docs)]

    one_query = [dict(short[0], id="q0", group="q")]
    measured = {}
    # UnTrac: 1 group of 2 vs 4 examples, batch 1, one epoch -> 2 more steps (+ the same one query scored)
    untrac = {n: run("untrac", groups(long_docs[:n], ["g"]), one_query, UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1), args.block)
              for n in (2, 4)}
    measured["ascent_step_s"] = (untrac[4]["targets_s"] - untrac[2]["targets_s"]) / 2
    # the same with K groups stepped together: per target
    k = args.k
    names = [f"g{i}" for i in range(k)]
    par = {n: run("untrac", [dict(d, id=f"{g}-{i}", group=g) for g in names for i, d in enumerate(long_docs[:n])], one_query,
                  UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1), args.block, parallel_targets=k)
           for n in (2, 4)}
    measured["parallel_step_s"] = (par[4]["targets_s"] - par[2]["targets_s"]) / (2 * k)
    # scoring blocks: UnTrac-Inv θ0 pass over 8 vs 24 training sequences (one query, one step)
    inv_one = UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None)
    score = {n: run("untrac_inv", groups(long_docs[:n], ["g"]), one_query, inv_one, args.block) for n in (8, 24)}
    measured["score_block_s"] = (score[24]["base_losses_s"] - score[8]["base_losses_s"]) / 16
    # UnTrac-Inv: one subset of 256 test examples in micro-batches of 32, 1 vs 3 steps; 2 training sequences scored
    subset = [dict(d, id=f"t{i}", group="subset") for i, d in enumerate(short)]
    inv = {s: run("untrac_inv", groups(long_docs[:2], ["g"]), subset,
                  UnlearningSchedule(num_steps=s, num_epochs=None, batch_size=None, micro_batch_size=32), args.test_tokens)
           for s in (1, 3)}
    measured["inv_step_s"] = (inv[3]["targets_s"] - inv[1]["targets_s"]) / 2
    # scoring test examples: UnTrac θ0 pass over 256 test examples vs 1 (one group of 2 sequences)
    base = run("untrac", groups(long_docs[:2], ["g"]), subset, UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1), args.test_tokens)
    measured["score_test_s"] = (base["base_losses_s"] - untrac[2]["base_losses_s"]) / 255

    steps = PAPER["corpora"] * PAPER["sequences_per_corpus"]
    tests = PAPER["test_subsets"] * PAPER["test_examples_per_subset"]
    hours = 1 / 3600
    estimate = {
        "untrac_sequential_h": (steps * measured["ascent_step_s"] + PAPER["corpora"] * tests * measured["score_test_s"]) * hours,
        "untrac_parallel_h": (steps * measured["parallel_step_s"] + PAPER["corpora"] * tests * measured["score_test_s"]) * hours,
        "untrac_inv_h": (PAPER["test_subsets"] * PAPER["inv_steps"] * measured["inv_step_s"]
                         + PAPER["test_subsets"] * steps * measured["score_block_s"]) * hours,
        "untrac_inv_scoring_share": PAPER["test_subsets"] * steps * measured["score_block_s"]
        / (PAPER["test_subsets"] * PAPER["inv_steps"] * measured["inv_step_s"] + PAPER["test_subsets"] * steps * measured["score_block_s"]),
    }
    result = {
        "benchmark": "paper-scale cost estimate (Experiment 2: 8 corpora x 10,000 blocks; 26 test subsets x 256)",
        "model": {"layers": 12, "width": 768, "vocab": 50257, "parameters": sum(p.numel() for p in net.parameters())},
        "block_tokens": args.block, "test_tokens": args.test_tokens, "parallel_targets": k,
        "paper": PAPER, "measured_s": measured, "estimate": estimate,
        "raw_runs_s": {"untrac": untrac, "parallel": par, "score": score, "inv": inv, "score_tests": base},
        "environment": environment(args.device),
    }
    write_result("paper_scale" + ("" if args.device == "cpu" else "_" + args.device.split(":")[0]), result, args.out)
    return result


if __name__ == "__main__":
    main()
