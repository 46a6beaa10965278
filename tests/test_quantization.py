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
from conftest import tiny_gpt2_config

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.optim import OptimizerSpec
from untrac_pl.quantization import (
    ScaleConfigError,
    attach_lora,
    check_scale_options,
    is_quantized,
    keep_4bit_weights_unpacked,
    normalize_quantization,
)
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


def _force_bnb_cpu_capability(monkeypatch, avx512bf16: bool) -> None:
    """Make bitsandbytes' 4-bit layers built from now on see (or not see) an AVX512-BF16 CPU.

    ``Linear4bit.__init__`` (bitsandbytes >= 0.49) sets ``support_avx512bf16_for_cpu = has_avx512bf16()``
    from its module's namespace, and ``forward`` takes the CPU weight-packing path on that flag: forcing
    it runs the AVX512-BF16 branch of the loading code on any CPU (older releases have neither).
    """
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512bf16, raising=False)


def _linear4bit_layers(net):
    from bitsandbytes.nn import Linear4bit

    return [(name, m) for name, m in net.named_modules() if isinstance(m, Linear4bit)]


def _packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def _loss_batch(tokenizer, texts):
    enc = tokenizer(texts[:6], return_tensors="pt", padding=True, truncation=True, max_length=24)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def _frozen_state(net):
    """Every tensor of the model that is not a LoRA adapter (quantised weights, scales, norms, embeddings)."""
    state = {}
    for name, tensor in net.state_dict().items():
        if "lora_" in name:
            continue
        state[name] = tensor.detach().clone() if isinstance(tensor, torch.Tensor) else tensor
    return state


# 4-bit runs as on a CPU with AVX512-BF16 and as on one without, whatever this machine has
@pytest.mark.parametrize("bits,avx512bf16", [(8, None), (4, True), (4, False)], ids=["8", "4-avx512bf16", "4-no-avx512bf16"])
def test_lora_unlearning_on_quantized_base_touches_only_adapters(bits, avx512bf16, tiny_spec, quickstart, monkeypatch):
    if avx512bf16 is not None:
        _force_bnb_cpu_capability(monkeypatch, avx512bf16)
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


# width 32: in_features 32 < the block size 64 (c_attn, c_fc) next to a shape the packing accepts
# (mlp.c_proj, 32 x 128); width 48: out_features not a multiple of 32 (48, 144) as well
@pytest.mark.parametrize("avx512bf16,width", [(True, 32), (True, 48), (False, 32)], ids=["avx512bf16-32", "avx512bf16-48", "no-avx512bf16-32"])
def test_4bit_layers_stay_unpacked_and_exact_whatever_the_cpu(avx512bf16, width, tiny_spec, quickstart, monkeypatch):
    """Eval scoring, LoRA ascent with grad, eval again: one dequantise-and-matmul path, base bit-exact."""
    import bitsandbytes.functional as bnb_functional

    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.models import load_model_and_tokenizer

    _force_bnb_cpu_capability(monkeypatch, avx512bf16)
    texts = _texts(quickstart)
    spec = tiny_spec(config=tiny_gpt2_config(n_embd=width), quantization={"bits": 4, "device": "cpu"}, lora={"r": 4, "alpha": 8})
    model, tokenizer = load_model_and_tokenizer(spec, texts)
    layers = _linear4bit_layers(model)
    assert len(layers) == 8
    base_before = _frozen_state(model)
    batch = _loss_batch(tokenizer, texts)

    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = model_per_example_loss(model, batch)
        for name, layer in layers:  # the base layer alone: exactly its dequantised weight, in float32
            x = torch.randn(5, layer.in_features, generator=generator)
            weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(x.dtype)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-6, msg=name)
    assert not any(_packed(m) for _, m in layers)

    model.train()  # what a LoRA ascent step does after a scoring pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_per_example_loss(model, batch).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model_per_example_loss(model, batch), first)
    assert not any(_packed(m) for _, m in layers)
    base_after = _frozen_state(model)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[n], t) for n, t in base_before.items() if isinstance(t, torch.Tensor))


def test_bitsandbytes_packed_cpu_kernel_computes_the_same_model(tiny_spec, quickstart):
    """Where bitsandbytes' AVX512-BF16 packed path can run, it agrees with the path the project uses.

    Width 64 is a shape every layer of which the packing accepts. Switching the packing off changes the
    kernel (bf16 for the packed one), not the model: per-example losses agree to within 2e-3 (measured
    on bitsandbytes 0.50.2, AMD EPYC: 9e-5 with double quantisation, 2e-4 without).
    """
    import bitsandbytes.functional as bnb_functional

    from untrac_pl.losses import model_per_example_loss
    from untrac_pl.models import load_model_and_tokenizer

    if not hasattr(bnb_functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes release has no CPU weight-packing path")
    if not bnb_functional.has_avx512bf16():
        pytest.skip("the packed kernel needs a CPU with AVX512-BF16")
    texts = _texts(quickstart)
    for double_quant in (True, False):
        spec = tiny_spec(config=tiny_gpt2_config(n_embd=64), quantization={"bits": 4, "device": "cpu", "double_quant": double_quant})
        model, tokenizer = load_model_and_tokenizer(spec, texts)
        model.eval()
        batch = _loss_batch(tokenizer, texts)
        layers = _linear4bit_layers(model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unpacked = model_per_example_loss(model, batch)
            assert not any(_packed(m) for _, m in layers)
            for _, layer in layers:
                layer.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on this CPU
            packed = model_per_example_loss(model, batch)
        assert len(layers) == 8 and all(_packed(m) for _, m in layers)
        torch.testing.assert_close(packed, unpacked, rtol=0, atol=2e-3)


def test_keep_4bit_weights_unpacked_refuses_what_it_cannot_switch_off():
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit

    def layers():
        net = torch.nn.Sequential(Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4"))
        return net.to("cpu")  # quantised here

    assert keep_4bit_weights_unpacked(layers()) == (["0"] if hasattr(layers()[0], "support_avx512bf16_for_cpu") else [])
    assert keep_4bit_weights_unpacked(torch.nn.Linear(2, 2)) == []
    if not hasattr(bnb_functional, "_convert_weight_packed_for_cpu"):
        return  # nothing to switch off in this release
    net = layers()
    del net[0].support_avx512bf16_for_cpu  # a release with the packing but without this switch
    with pytest.raises(ScaleConfigError, match=r"layer '0'.*bitsandbytes>=0\.47,<0\.51"):
        keep_4bit_weights_unpacked(net)
    net = layers()  # packed before untrac-pl saw it (the conversion itself is plain torch, any CPU)
    weight = net[0].weight
    weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with pytest.raises(ScaleConfigError, match="'0' already holds bitsandbytes' CPU-packed weights"):
        keep_4bit_weights_unpacked(net)


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
