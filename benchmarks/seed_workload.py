"""The seed project's quick-start workload, done properly: GPT-2-small architecture (12 x 768, 50,257
vocabulary, random init), 100 training texts, 5 queries, UnTrac-Inv with one target per query
(5 Adam steps, lr 5e-5), written as a normal run directory. Used by benchmarks/gpu_check.sh.

    python benchmarks/seed_workload.py --device cuda --precision 16-mixed --out runs/gpu_check/seed_workload
    python benchmarks/seed_workload.py --device cpu --tiny --out /tmp/seed_workload      # CPU dry run
"""
from __future__ import annotations

import argparse
import json
import time

from _common import engine_trainer_kwargs, gpt2_config, setup


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="16-mixed")
    parser.add_argument("--tiny", action="store_true", help="2 x 64 model, 16 texts (CPU dry run)")
    parser.add_argument("--out", default="runs/seed_workload")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.embedded import quickstart_corpus
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.models import ModelSpec
    from untrac_pl.optim import OptimizerSpec
    from untrac_pl.unlearning import UnTracModule

    corpus = quickstart_corpus(seed=0, n_per_group=4 if args.tiny else 25)  # 4 groups x 25 = 100 texts
    queries = corpus["queries"][:5]
    config = gpt2_config(2, 64, 2, 128) if args.tiny else gpt2_config(12, 768, 12, 1024, vocab=50257)
    spec = ModelSpec(config=config, train_tokenizer_vocab=1024)
    module = UnTracModule(spec, OptimizerSpec(), UnlearningSchedule(num_steps=5, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(corpus["train"], queries, max_length=128, eval_batch_size=50)
    started = time.perf_counter()
    result = run_attribution(module, dm, AttributionConfig(output_dir=args.out, overwrite=True, top_k=5),
                             engine_trainer_kwargs(args.device, args.precision))
    seconds = time.perf_counter() - started
    summary = json.loads((result.output_dir / "summary.json").read_text())
    report = {"output_dir": str(result.output_dir), "seconds": seconds, "scores_shape": list(result.table.scores.shape),
              "failed": result.failed, "precision": summary.get("precision"), "memory": result.memory,
              "parameters": sum(p.numel() for p in module.net.parameters())}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
