"""Peak memory of unlearning vs plain fine-tuning at the same batch (goal <= 1.05x), with and
without gradient checkpointing.

Fine-tuning: a plain PyTorch loop — Adam, forward, per-example-loss mean, backward, step — for the
same number of steps on the same collated batch. Unlearning: the engine's fit phase for one
UnTrac-Inv target made of the same examples (one optimizer batch), i.e. Lightning manual
optimisation, ``manual_backward(-loss)``, RestoreWeights, MemoryMonitor. Peak = live tensor bytes
between the first and the last step (the model's weights included on both sides).

The θ0 snapshot is what unlearning adds: a copy of the tensors the ascent changes (the trainable
parameters; with LoRA the adapters only). Rows: the full model and a LoRA-wrapped one (``--lora R``,
adapters on ``c_attn``), each with and without gradient checkpointing. On CUDA two unlearning figures
are measured (``torch.cuda.max_memory_allocated``): the snapshot on the device (``snapshot_device:
null``, the default) and in host memory (``snapshot_device: cpu``). On CPU the host IS the device, so
only the first exists; ``benchmarks/memtrack.py`` counts live tensor storages through a
TorchDispatchMode (no allocator keeps statistics there).

    python benchmarks/bench_memory.py                      # CPU (~1-2 min on 2 cores)
    python benchmarks/bench_memory.py --device cuda --layers 12 --width 768 --heads 12 --batch 16 --max-length 512
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import lightning.pytorch as pl
import torch
from _common import documents, engine_trainer_kwargs, environment, gpt2_config, setup, write_result
from memtrack import TensorMemoryTracker


class Meter:
    """Peak live tensor bytes of one phase, on CUDA or (via TensorMemoryTracker) on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.tracker = None if device.startswith("cuda") else TensorMemoryTracker("cpu")

    def context(self):
        return self.tracker if self.tracker is not None else contextlib.nullcontext()

    def track(self, *tensors):
        if self.tracker is not None:
            self.tracker.track(*tensors)

    def reset(self):
        if self.tracker is not None:
            self.tracker.reset_peak()
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.tracker is not None:
            return self.tracker.peak
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


class PhaseMeter(pl.Callback):
    """Resets the meter when the ascent starts and reads its peak when it ends."""

    def __init__(self, meter: Meter, runner_restore=None):
        self.meter, self.restore, self.value = meter, runner_restore, None

    def on_train_start(self, trainer, pl_module):
        self.meter.reset()

    def on_train_end(self, trainer, pl_module):
        self.value = self.meter.peak()


def set_checkpointing(net, enabled: bool) -> None:
    if enabled:
        if hasattr(net, "activation_checkpointing_enable"):
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        if hasattr(net, "activation_checkpointing_disable"):
            net.activation_checkpointing_disable()
        else:
            net.gradient_checkpointing_disable()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lora", type=int, default=8, help="LoRA rank of the adapter rows (0: full model only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)

    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, AttributionRunner
    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer
    from untrac_pl.optim import OptimizerSpec, build_optimizer
    from untrac_pl.unlearning import UnTracModule

    queries = [dict(d, id=f"query-{i}", group="target") for i, d in enumerate(documents(args.batch, args.sentences, seed=1))]
    docs = documents(4, 2)
    spec = ModelSpec(config=gpt2_config(args.layers, args.width, args.heads, args.max_length, 0.1), train_tokenizer_vocab=args.vocab)
    base, tokenizer = load_model_and_tokenizer(spec, [d["text"] for d in docs + queries])
    base.to(args.device)
    cuda = args.device.startswith("cuda")
    net = base
    theta0 = {}
    optimizer_spec = OptimizerSpec()
    schedule = UnlearningSchedule(num_steps=args.steps, num_epochs=None, batch_size=None)

    def reset_weights():
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(theta0[name])

    def fine_tune() -> int:
        meter = Meter(args.device)
        dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
        dm.tokenize(tokenizer)
        batch = {k: v.to(args.device) for k, v in dm.collator(dm.query_corpus.examples).items()}
        meter.track(*net.parameters(), *net.buffers(), *batch.values())
        net.train()
        with meter.context():
            optimizer = build_optimizer(optimizer_spec, [p for p in net.parameters() if p.requires_grad])
            meter.reset()
            for _ in range(args.steps):
                loss = model_per_example_loss(net, batch).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            peak = meter.peak()
            del optimizer, loss
        reset_weights()
        return peak

    def unlearn(snapshot_on_host: bool) -> int:
        meter = Meter(args.device)
        module = UnTracModule(spec, optimizer_spec, schedule)
        module.attach(net, tokenizer)
        dm = AttributionDataModule.from_records(docs, queries, max_length=args.max_length, eval_batch_size=args.batch)
        config = AttributionConfig(method="untrac_inv", target_unit="group", snapshot_device="cpu" if snapshot_on_host else None)
        runner = AttributionRunner(module, dm, config, None)
        phase = PhaseMeter(meter, runner.restore)
        runner.trainer_kwargs = engine_trainer_kwargs(args.device, callbacks=[phase])
        meter.track(*net.parameters(), *net.buffers())
        with meter.context():
            result = runner.run(write=False)
        assert not result.failed and phase.value is not None
        return phase.value

    from untrac_pl.quantization import attach_lora

    variants = {"full model": base}
    if args.lora:
        variants[f"LoRA r={args.lora}"] = attach_lora(copy.deepcopy(base), {"r": args.lora, "alpha": 2 * args.lora, "target_modules": ["c_attn"]})
    rows = {}
    for variant, model in variants.items():
        net = model
        theta0.clear()
        theta0.update({n: p.detach().clone() for n, p in net.named_parameters()})
        trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        for checkpointing in (False, True):
            set_checkpointing(net, checkpointing)
            ft = fine_tune()
            on_device = unlearn(snapshot_on_host=False)
            on_host = unlearn(snapshot_on_host=True) if cuda else None  # on CPU the host is the device: nothing to offload to
            rows[f"{variant}, {'with' if checkpointing else 'without'} checkpointing"] = {
                "variant": variant,
                "checkpointing": checkpointing,
                "snapshot_bytes": trainable,
                "fine_tune_peak_bytes": ft,
                "unlearn_peak_bytes_snapshot_on_device": on_device,
                "unlearn_peak_bytes_snapshot_on_host": on_host,
                "ratio_snapshot_on_device": on_device / ft,
                "ratio_snapshot_on_host": on_host / ft if on_host is not None else None,
            }
        set_checkpointing(net, False)
    params = sum(p.numel() * p.element_size() for p in base.parameters())
    result = {
        "benchmark": "peak memory: unlearning (engine fit phase) vs plain fine-tuning, same batch",
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": len(tokenizer), "parameter_bytes": params},
        "batch": {"examples": args.batch, "max_length": args.max_length, "steps": args.steps},
        "measure": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "live tensor storages (benchmarks/memtrack.py)",
        "rows": rows,
        "goal": "<= 1.05; the snapshot adds about snapshot_bytes / fine-tune peak (trainable parameters: all of them, or LoRA's adapters)",
        "environment": environment(args.device),
    }
    write_result("memory", result, args.out)
    return result


if __name__ == "__main__":
    main()
