"""Precision and memory: 32-true, bf16-mixed, 16-mixed loss scaling in manual optimisation,
gradient checkpointing, and the per-phase memory report.

16-mixed proper is GPU-only (Lightning turns ``precision="16-mixed"`` into bf16-mixed on CPU); its
loss-scaling path — ``manual_backward`` scales, the LightningOptimizer unscales, steps or skips, and
updates the scale — is exercised here on CPU with Lightning's own ``MixedPrecision`` plugin given an
fp16 CPU autocast and a CPU ``GradScaler``. benchmarks/gpu_check.sh runs the real thing on a GPU.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.optim import OptimizerSpec
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
STEPS = 2

# Max |score - 32-true score| over the 2 x 16 scores (mean |score| 0.020, max 0.042), measured on this
# machine (x86_64 with AVX512-BF16, torch 2.13 CPU): bf16-mixed 3.5e-4; fp16 autocast + GradScaler 1.3e-4.
# Plausible wrong runs, also 32-true: another seed (other dropout masks) 9.3e-3; one step fewer 1.9e-2; all
# zeros 4.2e-2; the sign flipped 8.4e-2. The tolerances are ~4x the measured error (a CPU without native
# bf16 rounds differently: headroom) and still 6x below the nearest wrong run;
# test_precision_tolerances_reject_plausibly_wrong_scores checks that margin.
BF16_ATOL = 1.5e-3
FP16_ATOL = 5e-4


def _run(spec, quickstart, trainer_extra=None, write_dir=None, steps=STEPS, seed=0):
    module = UnTracModule(spec, OptimizerSpec(lr=1e-3), UnlearningSchedule(num_steps=steps, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(quickstart["train"][:16], quickstart["queries"][:2], max_length=32, eval_batch_size=8)
    config = AttributionConfig(output_dir=str(write_dir) if write_dir else "unused", overwrite=True, seed=seed)
    result = run_attribution(module, dm, config, {**CPU, **(trainer_extra or {})}, write=write_dir is not None)
    return result, module


def _reference_spec():
    from conftest import tiny_gpt2_config

    from untrac_pl.models import ModelSpec

    return ModelSpec(config=tiny_gpt2_config(0.1), train_tokenizer_vocab=300, init_seed=0)


@pytest.fixture(scope="module")
def reference(quickstart):
    """32-true scores, dropout on (the paper's setting)."""
    result, _ = _run(_reference_spec(), quickstart)
    assert not result.failed and result.table.metadata["precision"] == "32-true"
    return result.table.scores


def _max_diff(scores, reference):
    return float((scores - reference).abs().max())


def test_precision_tolerances_reject_plausibly_wrong_scores(quickstart, reference):
    """BF16_ATOL / FP16_ATOL are tight enough to tell a right mixed-precision run from a wrong 32-true one."""
    other_seed, _ = _run(_reference_spec(), quickstart, seed=1)
    fewer_steps, _ = _run(_reference_spec(), quickstart, steps=STEPS - 1)
    for wrong in (other_seed.table.scores, fewer_steps.table.scores, -reference, torch.zeros_like(reference)):
        assert _max_diff(wrong, reference) > 5 * BF16_ATOL > 5 * FP16_ATOL


class CountingScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"scale": 0, "unscale_": 0, "step": 0}

    def scale(self, outputs):
        self.calls["scale"] += 1
        return super().scale(outputs)

    def unscale_(self, optimizer):
        self.calls["unscale_"] += 1
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.calls["step"] += 1
        return super().step(optimizer, *args, **kwargs)


def test_16_mixed_scales_the_ascent_loss_through_manual_optimisation(tiny_spec, quickstart, reference):
    scaler = CountingScaler("cpu", init_scale=2.0**12)
    result, module = _run(tiny_spec(dropout=0.1), quickstart, {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]})
    assert not result.failed and result.table.metadata["precision"] == "16-mixed"
    targets = 2
    # one micro-batch per step here: every backward went through scaler.scale, every step through unscale/step
    assert scaler.calls == {"scale": targets * STEPS, "unscale_": targets * STEPS, "step": targets * STEPS}
    assert module.amp_skipped_steps == 0
    scores = result.table.scores
    assert torch.isfinite(scores).all() and not torch.equal(scores, reference)
    assert _max_diff(scores, reference) <= FP16_ATOL, _max_diff(scores, reference)  # measured 1.3e-4


def test_16_mixed_overflow_skips_steps_and_says_so(tiny_spec, quickstart, caplog):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # every fp16 backward overflows
    with caplog.at_level(logging.WARNING, logger="untrac_pl.unlearning"):
        result, module = _run(tiny_spec(), quickstart, {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]})
    assert module.amp_skipped_steps == STEPS
    assert "skipped by the 16-mixed GradScaler" in caplog.text
    # no step was taken: θ_T = θ0 and every score is exactly zero
    assert torch.equal(result.table.scores, torch.zeros_like(result.table.scores))


def test_16_mixed_on_cpu_runs_as_bf16_mixed_and_the_metadata_says_so(tiny_spec, quickstart, reference, tmp_path):
    with pytest.warns(UserWarning, match="GPU-only"):
        result, _ = _run(tiny_spec(dropout=0.1), quickstart, {"precision": "16-mixed"}, write_dir=tmp_path / "run")
    assert result.table.metadata["precision"] == "bf16-mixed"
    scores = result.table.scores
    assert torch.isfinite(scores).all() and not torch.equal(scores, reference)
    assert _max_diff(scores, reference) <= BF16_ATOL, _max_diff(scores, reference)  # measured 3.5e-4
    # memory.json: peak per phase, plus the model's static footprint
    memory = json.loads((result.output_dir / "memory.json").read_text())
    assert memory["unlearning"]["peak_bytes"] > 0 and memory["scoring"]["peak_bytes"] > 0
    assert memory["unlearning"]["device"] == "cpu"
    assert memory["model"]["trainable_bytes"] == memory["model"]["parameter_bytes"] > 0 and not memory["model"]["quantized"]


def test_gradient_checkpointing_gives_identical_scores(tiny_spec, quickstart, reference):
    result, module = _run(tiny_spec(dropout=0.1, gradient_checkpointing=True), quickstart)
    net = module.net
    flag = getattr(net, "is_activation_checkpointing", None)
    active = flag if isinstance(flag, bool) else getattr(net, "is_gradient_checkpointing", False)
    assert active
    # non-reentrant checkpointing replays dropout with the saved RNG state: same ascent, same scores
    assert torch.allclose(result.table.scores, reference, atol=1e-6, rtol=0)
