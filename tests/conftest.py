"""Shared fixtures. Everything is offline and tiny: models are built from configs, tokenizers trained here."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import logging
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNTRAC_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tiny models: one intra-op thread is fastest, and on a busy 2-core machine two threads oversubscribe.
torch.set_num_threads(1)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _python_api_warnings_said_afresh(monkeypatch):
    """The Python API says each warning once per process (untrac_pl.vocabulary): each test starts afresh,
    so a test that expects a warning does not depend on which tests ran before it."""
    from untrac_pl import vocabulary

    monkeypatch.setattr(vocabulary, "_said", set())


def tiny_gpt2_config(dropout: float = 0.0, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64) -> dict:
    return {
        "model_type": "gpt2",
        "n_layer": n_layer,
        "n_head": 2,
        "n_embd": n_embd,
        "n_positions": n_positions,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
    }


@pytest.fixture
def tiny_spec():
    """Factory of ModelSpec for a tiny random GPT-2 with a BPE tokenizer trained on the run's texts."""
    from untrac_pl.models import ModelSpec

    def make(dropout: float = 0.0, **overrides) -> ModelSpec:
        kwargs = dict(config=tiny_gpt2_config(dropout), train_tokenizer_vocab=300, init_seed=0)
        kwargs.update(overrides)
        return ModelSpec(**kwargs)

    return make


@pytest.fixture(scope="session")
def quickstart():
    from untrac_pl.data.embedded import quickstart_corpus

    return quickstart_corpus(seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(quickstart):
    from untrac_pl.models import ModelSpec, load_tokenizer

    texts = [r.get("text") or r["prompt"] + r["completion"] for r in quickstart["train"] + quickstart["queries"]]
    return load_tokenizer(ModelSpec(train_tokenizer_vocab=300), texts)


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, tiny_tokenizer):
    """A ``save_pretrained`` directory (model + tokenizer) of a tiny GPT-2, loaded through Auto* classes."""
    from untrac_pl.models import ModelSpec, build_model

    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = build_model(ModelSpec(config=tiny_gpt2_config(0.0)), tiny_tokenizer)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set UNTRAC_SHARED_DATA)")
    return SHARED_DATA


@contextlib.contextmanager
def interrupt_after_targets(n: int, exception=KeyboardInterrupt):
    """Within the block, ``ResumeState.record`` raises ``exception`` right after the ``n``-th finished
    target is persisted (a run stopped between two targets, its partial kept for a resume)."""
    from untrac_pl.resume import ResumeState

    original, count = ResumeState.record, {"n": 0}

    def record(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] >= n:
            raise exception()
        return path

    ResumeState.record = record
    try:
        yield count
    finally:
        ResumeState.record = original
