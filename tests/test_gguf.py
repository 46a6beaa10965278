"""GGUF checkpoints: transformers' own GGUF loader, converted once to a cached safetensors folder.

The tests write a tiny Llama GGUF file with the ``gguf`` package's writer (byte-level BPE tokenizer,
two layers, float32 tensors); the suite never needs a real checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'untrac-pl[real]' or .[dev]) writes the test file")

from untrac_pl.errors import ModelLoadError  # noqa: E402
from untrac_pl.gguf import MARKER, converted_folder  # noqa: E402
from untrac_pl.models import ModelSpec, load_model_and_tokenizer  # noqa: E402


def write_tiny_llama(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 32-wide Llama with a 300-token byte-level BPE vocabulary, as a GGUF file."""
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab, hidden, layers, ff, heads = 300, 32, 2, 64, 4
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    b2u = bytes_to_unicode()
    tokens = [b2u[i] for i in range(256)]
    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("Ġ", "t"), ("Ġ", "a"), ("r", "e"), ("e", "n")]
    tokens += [a + b for a, b in merges] + ["<|endoftext|>"]
    tokens += [f"<unused{i}>" for i in range(len(tokens), vocab)]
    eos = tokens.index("<|endoftext|>")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_token_types([3 if i == eos else 1 for i in range(vocab)])
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(seed)

    def tensor(name, shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        for part in ("q", "k", "v", "output"):
            tensor(f"blk.{i}.attn_{part}.weight", (hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", (ff, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ff, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", (vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf")


def test_gguf_model_loads_as_transformers_reads_it_and_is_converted_once(tiny_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ModelSpec(gguf_file=str(tiny_gguf), gguf_cache_dir=str(tmp_path / "cache"))
    model, tokenizer = load_model_and_tokenizer(spec)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ref_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer("the ant in the tower", return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok("the ant in the tower", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
    folders = [p for p in (tmp_path / "cache").iterdir()]
    assert len(folders) == 1 and (folders[0] / MARKER).exists() and (folders[0] / "model.safetensors").exists()
    # the second load reads the cached folder: transformers' GGUF path is not taken again
    real = AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "converted twice"
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    again, _ = load_model_and_tokenizer(spec)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_cache_is_keyed_by_the_file_contents(tiny_gguf, tmp_path):
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    a = converted_folder(str(tiny_gguf), cache_dir=str(tmp_path / "cache"))
    b = converted_folder(str(other), cache_dir=str(tmp_path / "cache"))
    assert a != b and converted_folder(str(tiny_gguf), cache_dir=str(tmp_path / "cache")) == a


def test_gguf_file_relative_to_name_or_path_and_inside_a_package(tiny_gguf, tmp_path, monkeypatch):
    rel = converted_folder(tiny_gguf.name, name_or_path=str(tiny_gguf.parent), cache_dir=str(tmp_path / "c"))
    package = tmp_path / "pkgs" / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs a package --no-deps left out')")  # never imported
    (package / "m.gguf").write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    importlib.invalidate_caches()
    assert converted_folder("fake_gguf_pkg:m.gguf", cache_dir=str(tmp_path / "c")) == rel  # same bytes, same folder


def test_gguf_errors_name_the_field(tiny_gguf, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"model.gguf_file: '.*missing.gguf' does not exist"):
        load_model_and_tokenizer(ModelSpec(gguf_file=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="package 'no_such_pkg_xyz' is not installed"):
        load_model_and_tokenizer(ModelSpec(gguf_file="no_such_pkg_xyz:m.gguf"))
    with pytest.raises(ModelLoadError, match="not both"):
        load_model_and_tokenizer(ModelSpec(gguf_file=str(tiny_gguf), config={"model_type": "gpt2"}))
    odd = write_tiny_llama(tmp_path / "odd.gguf", architecture="notanarch")
    with pytest.raises(ModelLoadError, match="cannot read this file's architecture"):
        load_model_and_tokenizer(ModelSpec(gguf_file=str(odd), gguf_cache_dir=str(tmp_path / "c")))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model_and_tokenizer(ModelSpec(gguf_file=str(broken), gguf_cache_dir=str(tmp_path / "c")))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the 'gguf' package.*untrac-pl\[real\]"):
        load_model_and_tokenizer(ModelSpec(gguf_file=str(tiny_gguf), gguf_cache_dir=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())  # nothing half-written
