"""Model and tokenizer loading: local directories through Auto* classes, tiny configs, clear errors."""
from __future__ import annotations

import pytest
import torch

from untrac_pl.errors import ModelLoadError
from untrac_pl.models import (
    ModelSpec,
    build_model,
    load_model_and_tokenizer,
    load_tokenizer,
)


def test_load_from_save_pretrained_directory(saved_model_dir):
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name_or_path=str(saved_model_dir)))
    assert model.config.model_type == "gpt2" and tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"


def test_bfloat16_dtype_and_gradient_checkpointing(saved_model_dir):
    model, _ = load_model_and_tokenizer(ModelSpec(name_or_path=str(saved_model_dir), dtype="bfloat16", gradient_checkpointing=True))
    assert next(model.parameters()).dtype == torch.bfloat16
    flag = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing
    assert flag


def test_missing_pad_token_reuses_eos(saved_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelSpec(tokenizer=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token


def test_tiny_config_is_seeded(tiny_tokenizer):
    spec = ModelSpec(config={"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32}, init_seed=3)
    a, b = build_model(spec, tiny_tokenizer), build_model(spec, tiny_tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == len(tiny_tokenizer)


def test_nonexistent_path_and_offline_hub_id_fail_clearly():
    with pytest.raises(ModelLoadError, match="path './no/such/model' does not exist"):
        load_model_and_tokenizer(ModelSpec(name_or_path="./no/such/model"))
    with pytest.raises(ModelLoadError, match="'someone/some-model' is not a local directory and the Hugging Face Hub is offline"):
        load_model_and_tokenizer(ModelSpec(name_or_path="someone/some-model"))
    with pytest.raises(ModelLoadError, match="needs a 'model_type'"):
        load_model_and_tokenizer(ModelSpec(config={"n_layer": 1}, train_tokenizer_vocab=300), ["some text to train on " * 20])
