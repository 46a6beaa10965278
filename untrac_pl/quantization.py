"""Quantised bases (bitsandbytes) with LoRA adapters (peft), and checks of scale-related options.

Quantised weights cannot take gradient steps, so a quantised model is always unlearned through LoRA
adapters: only the adapters require grad, :class:`~untrac_pl.callbacks.restore.RestoreWeights`
snapshots just those tensors, and restoring θ0 is resetting the adapters (the base weights are
never written). ``model.quantization`` accepts::

    bits: 4 | 8                     # required
    quant_type: nf4 | fp4           # 4-bit only (default nf4)
    double_quant: true | false      # 4-bit only (default true)
    compute_dtype: float32 | bfloat16 | float16   # 4-bit matmul dtype (default: model.dtype, float32 if auto)
    skip_modules: [lm_head, ...]    # modules kept in full precision
    llm_int8_threshold: 6.0         # 8-bit only
    device: auto | cpu | cuda | cuda:1   # where the weights are quantised (auto: this rank's GPU, else CPU)

and ``model.lora``::

    r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear (or a list of module names), bias: none

A model built from ``model.config`` is initialised in full precision (seeded by ``init_seed``), saved
to a temporary directory and reloaded through ``from_pretrained`` with the quantisation config: the
one path bitsandbytes supports, so a config-built model and a Hub model quantise identically.

bitsandbytes >= 0.49 repacks a 4-bit layer's weight in place for a bf16 AVX512 kernel at its first
CPU forward in eval mode without grad, when the CPU has AVX512-BF16. That conversion fails for layers
whose in_features is not a multiple of the quantisation block size (64) or whose out_features is not
a multiple of 32; a packed layer stays packed, and ``matmul_4bit`` then fails the next forward that
needs grad (LoRA ascent after a scoring pass); undoing it (``state_dict``) re-quantises the double-
quantised absmax (without double quantisation it leaves absmax transposed in bf16), so the frozen base
would not stay bit-exact; and it computes in bf16 whatever ``compute_dtype`` says, on those CPUs only.
:func:`keep_4bit_weights_unpacked` switches that path off on every 4-bit layer of a model loaded here:
the same kernels then run on every CPU, for any layer width.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import warnings
from typing import Any, Mapping, Optional

import torch

from untrac_pl.console import no_transformers_bars
from untrac_pl.errors import UnTracError
from untrac_pl.runtime import CASTING_PRECISIONS, canonical_precision

log = logging.getLogger(__name__)

QUANT_KEYS = {"bits", "quant_type", "double_quant", "compute_dtype", "skip_modules", "llm_int8_threshold", "device"}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bias", "enabled"}
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"}


# Trainer options that would replay, cut or extend a target's planned ascent (or cut the scoring pass),
# with the values that leave the plan alone (LightningCLI passes max_steps=-1 explicitly)
PLAN_TRAINER_OPTIONS: dict[str, tuple] = {
    "max_epochs": (1,), "min_epochs": (0, 1), "max_steps": (-1,), "min_steps": (0,),
    "limit_train_batches": (1.0,), "limit_predict_batches": (1.0,),
}


def refuse_plan_trainer_options(trainer_kwargs: Mapping, why: str) -> None:
    """Raise if a Trainer option in :data:`PLAN_TRAINER_OPTIONS` is set to anything but a neutral value."""
    for key, neutral in PLAN_TRAINER_OPTIONS.items():
        value = trainer_kwargs.get(key)
        if value is not None and value not in neutral:
            raise ScaleConfigError(f"trainer.{key}={value!r} {why}; leave trainer.{key} unset")


def refuse_trainer_gradient_clipping(trainer_kwargs: Mapping) -> None:
    """``trainer.gradient_clip_val`` / ``gradient_clip_algorithm`` are refused: Lightning clips only in
    automatic optimisation (the ascent runs in manual optimisation, where it raises mid-run)."""
    for key in ("gradient_clip_val", "gradient_clip_algorithm"):
        if trainer_kwargs.get(key) is not None:
            raise ScaleConfigError(
                f"trainer.{key}={trainer_kwargs[key]!r}: Lightning clips gradients only in automatic optimisation and the "
                "ascent runs in manual optimisation; clip with model.unlearning.max_grad_norm (e.g. "
                "--model.unlearning.max_grad_norm 1.0, the authors' arguments.py default) and leave trainer.gradient_clip_* unset")


class ScaleConfigError(UnTracError, ValueError):
    """An unsupported combination of precision, quantisation, LoRA, strategy or multi-query options."""


def _require(package: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ScaleConfigError(f"{why} needs the '{package}' package (pip install {package})")


def normalize_quantization(quantization: Mapping) -> dict:
    """Validated copy of ``model.quantization`` with defaults filled in."""
    if not isinstance(quantization, Mapping):
        raise ScaleConfigError(f"model.quantization must be a mapping like {{bits: 4}}, got {quantization!r}")
    unknown = set(quantization) - QUANT_KEYS
    if unknown:
        raise ScaleConfigError(f"model.quantization: unknown keys {sorted(unknown)} (known: {sorted(QUANT_KEYS)})")
    q = dict(quantization)
    bits = q.get("bits")
    if bits not in (4, 8):
        raise ScaleConfigError(f"model.quantization.bits must be 4 or 8, got {bits!r}")
    if bits == 8:
        for key in ("quant_type", "double_quant", "compute_dtype"):
            if q.get(key) is not None:
                raise ScaleConfigError(f"model.quantization.{key} applies to 4-bit only (bits: 8 was given)")
    else:
        if q.get("llm_int8_threshold") is not None:
            raise ScaleConfigError("model.quantization.llm_int8_threshold applies to 8-bit only (bits: 4 was given)")
        q.setdefault("quant_type", "nf4")
        if q["quant_type"] not in ("nf4", "fp4"):
            raise ScaleConfigError(f"model.quantization.quant_type must be nf4 or fp4, got {q['quant_type']!r}")
        q.setdefault("double_quant", True)
        if q.get("compute_dtype") not in (None, "float32", "bfloat16", "float16"):
            raise ScaleConfigError(f"model.quantization.compute_dtype must be float32, bfloat16 or float16, got {q['compute_dtype']!r}")
    q.setdefault("device", "auto")
    return q


def quantization_device(device: str = "auto") -> str:
    """Where to quantise: ``auto`` is this process's GPU (``LOCAL_RANK`` under DDP) or the CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def quantized_load_kwargs(quantization: Mapping, dtype: Optional[str] = None) -> dict:
    """``from_pretrained`` keyword arguments that load the base through bitsandbytes.

    Returns ``{"quantization_config": BitsAndBytesConfig(...), "device_map": {"": device}}``.
    """
    q = normalize_quantization(quantization)
    _require("bitsandbytes", "model.quantization")
    _require("accelerate", "model.quantization")
    _require("peft", "model.quantization (unlearning runs on LoRA adapters)")
    from transformers import BitsAndBytesConfig

    skip = q.get("skip_modules")
    if q["bits"] == 8:
        kwargs = {"load_in_8bit": True, "llm_int8_skip_modules": skip}
        if q.get("llm_int8_threshold") is not None:
            kwargs["llm_int8_threshold"] = float(q["llm_int8_threshold"])
        config = BitsAndBytesConfig(**kwargs)
    else:
        compute = q.get("compute_dtype") or (dtype if dtype not in (None, "auto") else "float32")
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q["quant_type"],
            bnb_4bit_use_double_quant=bool(q["double_quant"]),
            bnb_4bit_compute_dtype=getattr(torch, compute),
            llm_int8_skip_modules=skip,
        )
    return {"quantization_config": config, "device_map": {"": quantization_device(q["device"])}}


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> list[str]:
    """Switch bitsandbytes' CPU weight packing off on every ``Linear4bit`` of ``model``; returns their names.

    bitsandbytes >= 0.49 (``Linear4bit.forward``) converts a layer's weight with
    ``_convert_weight_packed_for_cpu`` when ``x`` is on the CPU, ``self.support_avx512bf16_for_cpu``
    (set from ``has_avx512bf16()`` at construction), the module is in eval mode and ``x`` needs no grad;
    clearing that attribute keeps the layer on the plain dequantise-and-matmul path (the one training
    uses), which computes in ``compute_dtype`` and accepts any shape. See the module docstring for why
    the packed path cannot serve UnTrac. Releases without the packed path need nothing; a release that
    has it but not this switch is refused rather than left to fail (or drift) mid-run.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit

    packing = hasattr(bnb_functional, "_convert_weight_packed_for_cpu")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise ScaleConfigError(
                f"4-bit layer {name!r} already holds bitsandbytes' CPU-packed weights (an eval-mode forward ran "
                "before untrac-pl prepared the model); load the model through untrac-pl (model.quantization)")
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            names.append(name)
        elif packing:
            raise ScaleConfigError(
                f"bitsandbytes {bitsandbytes.__version__} packs 4-bit weights for CPU inference without the "
                f"switch untrac-pl turns off (Linear4bit.support_avx512bf16_for_cpu, layer {name!r}); "
                "install a tested release: pip install 'bitsandbytes>=0.47,<0.51'")
    if names:
        log.debug("bitsandbytes CPU weight packing switched off on %d 4-bit layers", len(names))
    return names


def from_config_quantized(config, dtype, load_kwargs: dict) -> torch.nn.Module:
    """Build a randomly initialised model from ``config`` (caller seeds it) and reload it quantised.

    bitsandbytes quantises while loading weights, so the full-precision model is written to a
    temporary directory and read back with ``from_pretrained(quantization_config=...)``.
    """
    from transformers import AutoModelForCausalLM

    load_kwargs = dict(load_kwargs)
    full = AutoModelForCausalLM.from_config(config, dtype=dtype, **{k: v for k, v in load_kwargs.items() if k not in ("quantization_config", "device_map")})
    with tempfile.TemporaryDirectory(prefix="untrac-quant-", ignore_cleanup_errors=True) as tmp:
        with no_transformers_bars():  # an internal round trip, not a phase of the run
            full.save_pretrained(tmp)
        del full
        with warnings.catch_warnings(), no_transformers_bars():
            warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, **load_kwargs)
    keep_4bit_weights_unpacked(model)
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_quantized", False))


def normalize_lora(lora: Optional[Mapping]) -> dict:
    lora = dict(lora or {})
    unknown = set(lora) - LORA_KEYS
    if unknown:
        raise ScaleConfigError(f"model.lora: unknown keys {sorted(unknown)} (known: {sorted(LORA_KEYS)})")
    options = {**LORA_DEFAULTS, **lora}
    if not isinstance(options["r"], int) or options["r"] < 1:
        raise ScaleConfigError(f"model.lora.r must be a positive integer, got {options['r']!r}")
    if not 0.0 <= float(options["dropout"]) < 1.0:
        raise ScaleConfigError(f"model.lora.dropout must lie in [0, 1), got {options['dropout']!r}")
    if options["bias"] != "none":
        # a trainable bias would be a base weight: restoring θ0 would then touch the base model
        raise ScaleConfigError("model.lora.bias must be 'none' (adapters only; base weights stay untouched)")
    return options


def attach_lora(model: torch.nn.Module, lora: Optional[Mapping] = None, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; every base parameter is frozen, only adapters require grad.

    ``lora: {enabled: false}`` is refused on a quantised model (its weights cannot take steps).
    The adapters start at zero output (LoRA's B = 0), so the wrapped model computes exactly θ0;
    LoRA's A matrices are drawn from ``seed`` (the model's ``init_seed``) so runs are reproducible.
    """
    options = normalize_lora(lora)
    quantized = is_quantized(model)
    if options.pop("enabled", True) is False:
        if quantized:
            raise ScaleConfigError("a quantised model can only be unlearned through LoRA adapters; remove model.lora.enabled: false")
        return model
    _require("peft", "model.lora")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=float(options["dropout"]),
        target_modules=options["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    if quantized:
        keep_4bit_weights_unpacked(model)  # Hub models too (from_config_quantized did it for config-built ones)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                wrapped = get_peft_model(model, config)
            except ValueError as exc:
                raise ScaleConfigError(f"model.lora: {exc}") from None
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in trainable):
        raise ScaleConfigError(f"model.lora: expected only LoRA adapter parameters to require grad, got {trainable[:5]}")
    log.info("LoRA: %d adapter tensors (%d parameters) on a %s base", len(trainable),
             sum(p.numel() for p in wrapped.parameters() if p.requires_grad), "quantised" if quantized else "full-precision")
    return wrapped


def check_scale_options(model_spec, trainer_kwargs: Optional[Mapping] = None, targets_per_pass: int = 1) -> None:
    """Refuse combinations that cannot work, with a message that says what to change.

    Called by the engine before any output exists.
    """
    trainer_kwargs = dict(trainer_kwargs or {})
    precision = canonical_precision(trainer_kwargs.get("precision"))
    refuse_plan_trainer_options(
        trainer_kwargs, "would change the planned ascent or scoring pass (the engine builds each target's exact "
        "micro-batch plan and scores every example); set the unlearning length with model.unlearning.num_steps / "
        "num_epochs / batch_size (and max_loss to stop early)")
    if targets_per_pass < 1:
        raise ScaleConfigError(f"attribution.targets_per_pass must be >= 1, got {targets_per_pass}")
    refuse_trainer_gradient_clipping(trainer_kwargs)
    quant = getattr(model_spec, "quantization", None)
    if quant:
        q = normalize_quantization(quant)
        if precision in CASTING_PRECISIONS:
            raise ScaleConfigError(
                f"trainer.precision={precision} casts the whole module, which bitsandbytes weights do not allow; "
                "use 32-true, bf16-mixed or 16-mixed (set the 4-bit matmul dtype with model.quantization.compute_dtype)"
            )
        lora = getattr(model_spec, "lora", None) or {}
        if lora.get("enabled", True) is False:
            raise ScaleConfigError("a quantised model can only be unlearned through LoRA adapters; remove model.lora.enabled: false")
        accelerator = str(trainer_kwargs.get("accelerator", "auto"))
        device = quantization_device(q["device"])
        if accelerator in ("gpu", "cuda") and device == "cpu":
            raise ScaleConfigError("model.quantization.device is cpu but trainer.accelerator is gpu: quantise on the GPU (device: auto)")
        if accelerator == "cpu" and device.startswith("cuda"):
            raise ScaleConfigError("trainer.accelerator is cpu but the model would be quantised on the GPU: set model.quantization.device: cpu")
        if getattr(model_spec, "dtype", "float32") == "float16" and device == "cpu":
            raise ScaleConfigError("model.dtype float16 with a quantised model on CPU is not supported; use float32 or bfloat16")
    strategy = trainer_kwargs.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    spawned = isinstance(strategy, str) and strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")) or \
        getattr(strategy, "_start_method", "popen") != "popen"
    if spawned or str(name).lower().startswith(("fsdp", "deepspeed", "xla", "model_parallel")):
        raise ScaleConfigError(
            f"trainer.strategy={name} is not supported: the engine runs one Trainer per target in the same processes "
            "and keeps the full trainable weights on every rank; use strategy: ddp (Lightning's launcher, torchrun or SLURM)"
        )
    accelerator = str(trainer_kwargs.get("accelerator", "auto"))
    if precision == "16-mixed" and accelerator == "cpu":
        warnings.warn("precision 16-mixed is GPU-only; Lightning uses bf16-mixed on CPU (recorded in the run's metadata)", stacklevel=2)
