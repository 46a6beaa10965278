"""Scoring throughput of UnTrac-Inv vs a bare no-grad forward over the same tokens (goal >= 0.9).

Engine: the predict passes of ``run_attribution`` (UnTrac-Inv, one pass over the training documents
per target, per-example losses and scores, RankingWriter collection), timed per pass by a callback.
Bare: ``with torch.inference_mode(): model(input_ids, attention_mask)`` over the very same
pre-collated batches (same length-sorted batching, same padding), logits only, no loss. Both sides
use the same model object and precision (autocast when mixed). Each engine pass is followed at once
by a bare pass or preceded by one, alternately (paired; the ratio is the median of per-pair
ratios); the θ0 pass is warm-up. Also measured: ``targets_per_pass: k`` (k parameter sets per
collated batch), reported as scoring throughput per target relative to the same bare forward.

    python benchmarks/bench_throughput.py                      # CPU defaults (~2 min on 2 cores)
    python benchmarks/bench_throughput.py --device cuda --precision 16-mixed --layers 12 --width 768 --heads 12 --docs 2048 --batch 64
"""
from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from _common import Stopwatch, autocast, documents, engine_trainer_kwargs, environment, gpt2_config, median, setup, sync, write_result


class PairedPassTimer(pl.Callback):
    """Times every engine predict pass and pairs it with one bare pass over the same batches, run
    just before it (even passes) or just after it (odd passes), so order effects cancel.

    Pairing makes the ratio robust to a machine whose load drifts (the shared CI box this runs on);
    the reported ratio is the median of the per-pair ratios. The θ0 pass (the first) is a warm-up
    and is not paired.
    """

    def __init__(self, device: str, precision: str, bare_pass):
        self.device, self.precision, self.bare_pass = device, precision, bare_pass
        self.engine, self.bare = [], []
        self.calls = 0

    def on_predict_epoch_start(self, trainer, pl_module):
        self.calls += 1
        if self.calls > 1 and self.calls % 2 == 0:  # alternate the order: bare first on even passes
            self.bare.append(self.bare_pass())
        sync(self.device)
        self._start = time.perf_counter()

    def on_predict_epoch_end(self, trainer, pl_module):
        sync(self.device)
        seconds = time.perf_counter() - self._start
        if self.calls == 1:
            return
        self.engine.append(seconds)
        if self.calls % 2 == 1:
            self.bare.append(self.bare_pass())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=6, help="sentences per document (~12 tokens each)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="targets_per_pass of the multi-query run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer
    from untrac_pl.optim import OptimizerSpec
    from untrac_pl.unlearning import UnTracModule

    docs = documents(args.docs, args.sentences)
    queries = [dict(d, id=f"query-{i}") for i, d in enumerate(documents(args.targets, 2, seed=1))]
    spec = ModelSpec(config=gpt2_config(args.layers, args.width, args.heads, args.max_length), train_tokenizer_vocab=args.vocab)
    net, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
    dm.tokenize(tokenizer)
    # the bare reference runs over the engine's own evaluation batches, collated up front
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in dm.evaluation_dataloader(dm.train_corpus)]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded = int(sum(b["attention_mask"].numel() for b in batches))

    def bare_pass() -> float:
        model = net.to(args.device).eval()
        with Stopwatch(args.device) as watch, torch.inference_mode(), autocast(args.device, args.precision):
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return watch.seconds

    def run(k: int) -> PairedPassTimer:
        module = UnTracModule(spec, OptimizerSpec(), UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
        module.attach(net, tokenizer)
        data = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
        timer = PairedPassTimer(args.device, args.precision, bare_pass)
        result = run_attribution(module, data, AttributionConfig(targets_per_pass=k), engine_trainer_kwargs(args.device, args.precision, callbacks=[timer]), write=False)
        assert not result.failed
        return timer

    one = run(1)
    multi = run(args.k)
    sizes = [min(args.k, args.targets - start) for start in range(0, args.targets, args.k)]
    ratios = [b / e for b, e in zip(one.bare, one.engine)]
    ratios_k = [b / (e / n) for b, e, n in zip(multi.bare, multi.engine, sizes)]
    result = {
        "benchmark": "scoring throughput: UnTrac-Inv predict pass vs bare inference_mode forward",
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": len(tokenizer), "parameters": sum(p.numel() for p in net.parameters())},
        "eval_set": {"documents": len(docs), "tokens": tokens, "padded_tokens": padded, "batch": args.batch, "batches": len(batches)},
        "precision": args.precision,
        "engine_pass_s": one.engine,
        "bare_pass_s": one.bare,
        "engine_tokens_per_s": tokens / median(one.engine),
        "bare_tokens_per_s": tokens / median(one.bare),
        "ratio": median(ratios),
        "ratios": ratios,
        "goal": ">= 0.9",
        f"targets_per_pass_{args.k}": {"pass_s": multi.engine, "targets_per_pass": sizes, "bare_pass_s": multi.bare,
                                         "ratio_per_target": median(ratios_k)},
        "environment": environment(args.device),
    }
    write_result("throughput", result, args.out)
    return result


if __name__ == "__main__":
    main()
