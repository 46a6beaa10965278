"""Quantised bases (bitsandbytes 8/4-bit) unlearned through LoRA adapters (peft), on CPU.

What must hold: only adapters take gradient steps, the quantised base weights are never written,
restoring θ0 resets the adapters bit-exactly before every target, the quantised model computes
(approximately) the float model it was built from, and unsupported combinations fail with a
message that says what to change.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.optim import OptimizerSpec
from untrac_pl.quantization import ScaleConfigError, attach_lora, check_scale_options, is_quantized, normalize_quantization
from untrac_pl.unlearning import UnTracModule

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


def _texts(quickstart):
    return [r.get("text") or r["prompt"] + r["completion"] for r in quickstart["train"] + quickstart["queries"]]


class AdapterWatch(pl.Callback):
    """Adapters at the start of every ascent (right after RestoreWeights) and at its end."""

    def __init__(self):
        self.starts, self.ends = [], []

    @staticmethod
    def _adapters(pl_module):
        return {n: p.detach().clone() for n, p in pl_module.net.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module):
        self.starts.append(self._adapters(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.ends.append(self._adapters(pl_module))


def _frozen_state(net):
    """Every tensor of the model that is not a LoRA adapter (quantised weights, scales, norms, embeddings)."""
    state = {}
    for name, tensor in net.state_dict().items():
        if "lora_" in name:
            continue
        state[name] = tensor.detach().clone() if isinstance(tensor, torch.Tensor) else tensor
    return state


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_unlearning_on_quantized_base_touches_only_adapters(bits, tiny_spec, quickstart):
    spec = tiny_spec(quantization={"bits": bits, "device": "cpu"}, lora={"r": 4, "alpha": 8})
    module = UnTracModule(spec, OptimizerSpec(lr=5e-2), UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    module.load_model(_texts(quickstart))
    net = module.net
    assert is_quantized(net)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    quantized_dtype = torch.int8 if bits == 8 else torch.uint8
    assert any(p.dtype == quantized_dtype for p in net.parameters())
    base_before = _frozen_state(net)
    adapters_theta0 = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}

    watch = AdapterWatch()
    dm = AttributionDataModule.from_records(quickstart["train"][:8], quickstart["queries"][:2], max_length=32, eval_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_attribution(module, dm, AttributionConfig(), {**CPU, "callbacks": [watch]}, write=False)

    assert not result.failed and torch.isfinite(result.table.scores).all()
    assert result.table.scores.abs().max() > 0  # the adapters did move the losses
    assert result.memory["model"]["quantized"] and result.memory["model"]["trainable_bytes"] < result.memory["model"]["parameter_bytes"]
    # every target started from θ0 adapters, bit-exactly, and ascent changed them
    assert len(watch.starts) == 2
    for start, end in zip(watch.starts, watch.ends):
        assert all(torch.equal(start[n], adapters_theta0[n]) for n in adapters_theta0)
        assert any(not torch.equal(end[n], adapters_theta0[n]) for n in adapters_theta0)
    # after the run the model is θ0 again, and the quantised base was never written
    assert all(torch.equal(p, adapters_theta0[n]) for n, p in net.named_parameters() if p.requires_grad)
    base_after = _frozen_state(net)
    assert base_after.keys() == base_before.keys()
    for name, tensor in base_before.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(base_after[name], tensor), name


def test_quantized_model_approximates_the_float_model_it_was_built_from(tiny_spec, quickstart):
    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.models import load_model_and_tokenizer

    texts = _texts(quickstart)
    full, tokenizer = load_model_and_tokenizer(tiny_spec(), texts)
    quant, _ = load_model_and_tokenizer(tiny_spec(quantization={"bits": 8, "device": "cpu"}), texts)
    enc = tokenizer(texts[:6], return_tensors="pt", padding=True, truncation=True, max_length=24)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = model_per_example_loss(full.eval(), batch)
        b = model_per_example_loss(quant.eval(), batch)
    # same seeded initialisation, quantised: close but not equal (LoRA starts at zero output)
    assert torch.allclose(a, b, atol=0.05) and not torch.equal(a, b)


def test_option_validation_and_unsupported_combinations(tiny_spec):
    with pytest.raises(ScaleConfigError, match="4 or 8"):
        normalize_quantization({"bits": 3})
    with pytest.raises(ScaleConfigError, match="unknown keys"):
        normalize_quantization({"bits": 4, "typo": 1})
    with pytest.raises(ScaleConfigError, match="4-bit only"):
        normalize_quantization({"bits": 8, "quant_type": "nf4"})
    with pytest.raises(ScaleConfigError, match="nf4 or fp4"):
        normalize_quantization({"bits": 4, "quant_type": "int4"})
    assert normalize_quantization({"bits": 4})["quant_type"] == "nf4"
    quant = tiny_spec(quantization={"bits": 4, "device": "cpu"})
    with pytest.raises(ScaleConfigError, match="casts the whole module"):
        check_scale_options(quant, {"precision": "bf16-true", "accelerator": "cpu"})
    for alias in ("bf16", 32, "32"):  # Lightning's aliases of bf16-mixed / 32-true: autocast, allowed
        check_scale_options(quant, {"precision": alias, "accelerator": "cpu"})
    with pytest.raises(ScaleConfigError, match="only be unlearned through LoRA"):
        check_scale_options(tiny_spec(quantization={"bits": 8, "device": "cpu"}, lora={"enabled": False}), {"accelerator": "cpu"})
    with pytest.raises(ScaleConfigError, match="quantise on the GPU"):
        check_scale_options(quant, {"accelerator": "gpu"})
    with pytest.raises(ScaleConfigError, match="targets_per_pass"):
        check_scale_options(tiny_spec(), {}, targets_per_pass=0)
    check_scale_options(quant, {"precision": "bf16-mixed", "accelerator": "cpu"})  # supported
    for strategy in ("ddp_spawn", "fsdp", "deepspeed_stage_2"):
        with pytest.raises(ScaleConfigError, match="use strategy: ddp"):
            check_scale_options(tiny_spec(), {"strategy": strategy})
    check_scale_options(tiny_spec(), {"strategy": "ddp", "devices": 2, "accelerator": "cpu"})
    with pytest.raises(ScaleConfigError, match="bias"):
        attach_lora(torch.nn.Linear(2, 2), {"bias": "all"})
    with pytest.raises(ScaleConfigError, match="unknown keys"):
        attach_lora(torch.nn.Linear(2, 2), {"rank": 4})


def test_cli_error_for_unsupported_combination(tmp_path, capsys):
    from untrac_pl.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    code = main(["attribute", "-c", str(config), "--model.model.quantization", "{bits: 5}",
                 "--attribution.output_dir", str(tmp_path / "out"), "--trainer.logger", "false"])
    assert code == 2
    assert "bits must be 4 or 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
