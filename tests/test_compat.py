"""Seed-style API (untrac_pl.compat): names, θ0 bit-exactness, sign, API = CLI, the README snippets."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from untrac_pl.compat import (
    MemoryEfficientUnTracEstimator,
    TracInBaseline,
    UnTracConfig,
    UnTracInfluenceEstimator,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "README.md"

TRAIN = [
    "The quick fox hides under the hedge every night.",
    "Stir the onions into the soup and simmer for ten minutes.",
    "You are such a clueless buffoon, honestly.",
    "The striker scored twice in the second half of the cup.",
    "Add a pinch of salt to the stew before serving.",
    "Nobody cares about your boring jokes, you nitwit.",
]
TEST = "You are such a clueless buffoon, honestly."  # = TRAIN[2]



def _config(model_dir, **overrides) -> UnTracConfig:
    kwargs = dict(model_name=str(model_dir), unlearning_rate=1e-3, unlearning_steps=2, device="cpu", seed=7, max_length=48, eval_batch_size=4)
    kwargs.update(overrides)
    return UnTracConfig(**kwargs)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_exact(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_config_has_the_seed_fields_and_defaults_plus_the_paper_fields():
    defaults = {f.name: f.default for f in dataclasses.fields(UnTracConfig)}
    seed = {"model_name": "gpt2", "unlearning_rate": 5e-5, "unlearning_steps": 1, "batch_size": 1, "max_train_samples": 10000,
            "max_test_samples": 100, "top_k_influences": 50, "gradient_checkpointing": False, "seed": 42}
    assert {k: defaults[k] for k in seed} == seed
    assert defaults["device"] == "auto" and defaults["optimizer"] == "adam" and defaults["method"] == "untrac_inv"
    assert "precision" in defaults
    with pytest.raises(ValueError, match="method"):
        UnTracConfig(method="inverse")
    with pytest.raises(ValueError, match="optimizer"):
        UnTracConfig(optimizer="sgdd")
    with pytest.raises(ValueError, match="cast the model in place"):
        UnTracConfig(precision="bf16-true")
    # errors name the Python field, not the CLI key (optimizer.lr, data.eval_batch_size)
    for field, value in (("unlearning_rate", 0.0), ("unlearning_steps", 0), ("batch_size", 0), ("eval_batch_size", 0), ("max_length", 0)):
        with pytest.raises(ValueError, match=rf"^UnTracConfig\.{field} must be"):
            UnTracConfig(**{field: value})
    for alias in (16, "16", "bf16"):  # Lightning's aliases of 16-mixed / bf16-mixed: autocast, accepted
        UnTracConfig(precision=alias)


def test_estimator_scores_ascent_sign_and_leaves_theta0_bit_exact(saved_model_dir):
    estimator = UnTracInfluenceEstimator(_config(saved_model_dir, top_k_influences=3))
    theta0 = _state(estimator.model)
    scores = estimator.compute_influence_scores(TEST, TRAIN, show_progress=False)
    assert isinstance(scores, np.ndarray) and scores.shape == (len(TRAIN),) and np.isfinite(scores).all()
    assert _bit_exact(estimator.model, theta0)
    # ascent on the test text raises the loss of its verbatim copy most (the seed's descent lowered it)
    assert int(np.argmax(scores)) == 2 and scores[2] > 0
    assert estimator.compute_loss(TEST) == pytest.approx(estimator.compute_loss(TEST))  # θ0 loss, unchanged
    top = estimator.get_top_k_influences(TEST, TRAIN)  # k defaults to top_k_influences
    assert _bit_exact(estimator.model, theta0)
    assert [t[0] for t in top] == list(np.argsort(-scores, kind="stable")[:3])
    assert all(isinstance(i, int) and isinstance(s, float) and t == TRAIN[i] for i, s, t in top)
    assert [s for _, s, _ in top] == sorted((s for _, s, _ in top), reverse=True)
    # same call, same scores (one seed per target, θ0 restored in between), also when recomputed
    np.testing.assert_array_equal(estimator.compute_influence_scores(TEST, TRAIN, show_progress=False), scores)
    estimator.clear_cache()
    np.testing.assert_array_equal(estimator.compute_influence_scores(TEST, TRAIN, show_progress=False), scores)


def test_top_k_after_the_scores_reuses_the_engine_run_until_an_input_changes(saved_model_dir, monkeypatch):
    import untrac_pl.estimator as estimator_module

    runs = []
    real = estimator_module.attribute
    monkeypatch.setattr(estimator_module, "attribute", lambda *a, **k: runs.append(1) or real(*a, **k))
    estimator = UnTracInfluenceEstimator(_config(saved_model_dir, top_k_influences=3))
    scores = estimator.compute_influence_scores(TEST, TRAIN, show_progress=False)
    top = estimator.get_top_k_influences(TEST, TRAIN)  # the README pattern: one unlearning run, not two
    assert len(runs) == 1 and [i for i, _, _ in top] == list(np.argsort(-scores, kind="stable")[:3])
    again = estimator.compute_influence_scores(TEST, list(TRAIN))  # equal inputs (a copy of the list): reused
    again[:] = 0  # a caller's edit of the returned array does not reach the cache
    np.testing.assert_array_equal(estimator.compute_influence_scores(TEST, TRAIN), scores)
    assert len(runs) == 1
    estimator.compute_influence_scores(TEST, TRAIN[:-1])  # other training texts
    assert len(runs) == 2
    estimator.compute_influence_scores(TEST + " ", TRAIN[:-1])  # another test text
    assert len(runs) == 3
    estimator.config.unlearning_steps = 3  # a config field changed on the same config object
    estimator.compute_influence_scores(TEST + " ", TRAIN[:-1])
    assert len(runs) == 4
    with torch.no_grad():  # the weights changed in place (fine-tuning between calls)
        next(estimator.model.parameters()).mul_(1.0)
    estimator.get_top_k_influences(TEST + " ", TRAIN[:-1])
    assert len(runs) == 5
    estimator.get_top_k_influences(TEST + " ", TRAIN[:-1], k=2)  # only k differs: reused
    assert len(runs) == 5
    estimator.clear_cache()
    estimator.get_top_k_influences(TEST + " ", TRAIN[:-1])
    assert len(runs) == 6


def test_warnings_name_untracconfig_fields_once_per_process(saved_model_dir, caplog):
    import logging

    from untrac_pl import vocabulary

    assert vocabulary._said == set()  # each test starts afresh (conftest)
    estimator = UnTracInfluenceEstimator(_config(saved_model_dir, unlearning_steps=1))  # the seed's default: 1 step
    with caplog.at_level(logging.WARNING):
        estimator.compute_influence_scores(TEST, TRAIN, show_progress=False)
        estimator.compute_influence_scores(TEST, TRAIN[:3], show_progress=False)  # a second engine run
    said = [r.getMessage() for r in caplog.records if "GradCos" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].endswith("for 5 steps: UnTracConfig(unlearning_steps=5)")
    assert "model.unlearning" not in caplog.text and "data." not in caplog.text


def test_api_and_cli_give_identical_scores(saved_model_dir, tmp_path):
    from untrac_pl.cli import main
    from untrac_pl.scores import ScoreTable

    config = _config(saved_model_dir)
    api = UnTracInfluenceEstimator(config).compute_influence_scores(TEST, TRAIN, show_progress=False)
    # the same settings through `untrac-pl attribute` (the estimator names records test-0 / train-i)
    train_file, query_file = tmp_path / "train.jsonl", tmp_path / "queries.jsonl"
    train_file.write_text("".join(json.dumps({"id": f"train-{i}", "group": "training_texts", "text": t}) + "\n" for i, t in enumerate(TRAIN)))
    query_file.write_text(json.dumps({"id": "test-0", "group": "test", "text": TEST}) + "\n")
    yaml = f"""
attribution: {{method: untrac_inv, target_unit: example, output_dir: {tmp_path / 'run'}, seed: {config.seed}}}
model:
  model: {{name_or_path: {saved_model_dir}}}
  optimizer: {{name: adam, lr: {config.unlearning_rate}}}
  unlearning: {{num_steps: {config.unlearning_steps}, num_epochs: null, batch_size: 1}}
data:
  train: [{{path: {train_file}}}]
  queries: [{{path: {query_file}}}]
  max_length: {config.max_length}
  eval_batch_size: {config.eval_batch_size}
trainer: {{accelerator: cpu, devices: 1, precision: 32-true, logger: false, enable_progress_bar: false}}
"""
    (tmp_path / "run.yaml").write_text(yaml)
    assert main(["attribute", "-c", str(tmp_path / "run.yaml")]) == 0
    table = ScoreTable.load(tmp_path / "run" / "scores.safetensors")
    assert table.row_ids == ["test-0"] and table.col_ids == [f"train-{i}" for i in range(len(TRAIN))]
    np.testing.assert_array_equal(table.scores[0].double().numpy(), api)


def test_one_sgd_step_is_lr_times_the_seed_tracin_baseline_which_is_graddot(saved_model_dir):
    """The seed's intended update (SGD, one step) is lr × GradDot to first order — and its "TracIn" is GradDot."""
    lr = 1e-4
    estimator = UnTracInfluenceEstimator(_config(saved_model_dir, optimizer="sgd", unlearning_steps=1, unlearning_rate=lr))
    theta0 = _state(estimator.model)
    scores = estimator.compute_influence_scores(TEST, TRAIN, show_progress=False)
    graddot = TracInBaseline(estimator.model, estimator.tokenizer, estimator.device).compute_influence_scores(TEST, TRAIN)
    assert _bit_exact(estimator.model, theta0)
    np.testing.assert_allclose(scores, lr * graddot, rtol=0.05, atol=1e-3 * lr * np.abs(graddot).max())
    assert np.all(np.sign(scores) == np.sign(graddot))  # the seed's double negation flips every sign


def test_untrac_method_unlearns_each_training_text_and_scores_the_test_text(saved_model_dir):
    from untrac_pl.losses import model_per_example_loss

    texts = TRAIN[:3]
    estimator = UnTracInfluenceEstimator(_config(saved_model_dir, method="untrac"))
    theta0 = _state(estimator.model)
    scores = estimator.compute_influence_scores(TEST, texts, show_progress=False)
    assert _bit_exact(estimator.model, theta0)
    # brute force: deep copy, Adam ascent on train_i alone, test loss difference
    tok = estimator.tokenizer

    def batch(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    base = float(model_per_example_loss(estimator.model.eval(), batch(TEST))[0])
    expected = []
    for text in texts:
        model = copy.deepcopy(estimator.model).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            (-model_per_example_loss(model, batch(text)).mean()).backward()
            opt.step()
        with torch.no_grad():
            expected.append(float(model_per_example_loss(model.eval(), batch(TEST))[0]) - base)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert int(np.argmax(scores)) == 2  # unlearning the test text's copy raises the test loss most


def test_memory_efficient_estimator_batches_and_quantizes(saved_model_dir):
    config = _config(saved_model_dir)
    estimator = MemoryEfficientUnTracEstimator(config, use_quantization=False)
    theta0 = _state(estimator.model)
    batched = estimator.compute_influence_scores_batched(TEST, TRAIN, batch_size=2)
    plain = estimator.compute_influence_scores(TEST, TRAIN, show_progress=False)
    assert _bit_exact(estimator.model, theta0)
    np.testing.assert_allclose(batched, plain, atol=1e-5)  # batch size only changes padding
    assert estimator.count_parameters() == sum(p.numel() for p in estimator.model.parameters())
    # 4-bit base + LoRA unlearning through the same engine; θ0 (the adapters) restored exactly
    quantized = MemoryEfficientUnTracEstimator(config, use_quantization=True, quant_bits=4)
    from untrac_pl.callbacks.memory import MemoryMonitor

    footprint = MemoryMonitor.footprint(quantized.model)  # packed 4-bit weights are stored as uint8
    assert footprint["quantized"] and footprint["parameter_bytes"] < MemoryMonitor.footprint(estimator.model)["parameter_bytes"]
    q_theta0 = _state(quantized.model)
    scores = quantized.compute_influence_scores_batched(TEST, TRAIN, batch_size=4)
    assert np.isfinite(scores).all() and int(np.argmax(scores)) == 2
    assert _bit_exact(quantized.model, q_theta0)
    assert quantized.count_parameters() == estimator.count_parameters()  # unpacked base, adapters left out
    with pytest.raises(ValueError, match="quant_bits"):
        MemoryEfficientUnTracEstimator(config, use_quantization=True, quant_bits=3)


def _snippets() -> list[str]:
    section = DOC.read_text(encoding="utf-8").split("## Coming from UnTrac-TNLP", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippets_run_verbatim(saved_model_dir, tmp_path, monkeypatch, capsys):
    """README.md (section "Coming from UnTrac-TNLP") python blocks, run in order in one namespace.

    The folder holds local model directories named gpt2 / gpt2-medium / gpt2-large (links to a tiny
    saved model): a local directory wins over a Hub id, so the snippets need no substitution.
    """
    for name in ("gpt2", "gpt2-medium", "gpt2-large"):
        (tmp_path / name).symlink_to(saved_model_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    snippets = _snippets()
    assert len(snippets) >= 7
    namespace: dict = {}
    for number, code in enumerate(snippets):
        exec(compile(code, f"{DOC.name}[python block {number}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert not (tmp_path / "results").exists()  # in a checkout that is the committed results folder
    results = json.loads((tmp_path / "runs" / "toxicity" / "untrac_toxicity_results.json").read_text())
    assert len(results["test_cases"]) == 5 and results["training_data"]["source"] == ["generated:quickstart/train"]
    for case in results["test_cases"]:
        assert {"test_case_id", "prompt", "completion", "top_influences"} <= set(case)
        assert [t["rank"] for t in case["top_influences"]] == list(range(1, 11))
        assert all({"rank", "index", "score", "text"} <= set(t) for t in case["top_influences"])
    scaling = json.loads((tmp_path / "runs" / "scaling" / "scaling_experiment_results.json").read_text())
    assert [c["model"] for c in scaling["summary"]["comparison"]] == ["gpt2", "gpt2-medium", "gpt2-large"]
    assert (tmp_path / "runs" / "scaling" / "scaling_results.png").stat().st_size > 0
    assert "Correlation with TracIn" in out and "Top influence score" in out and "Runtime:" in out
    top = namespace["top_k"]
    assert top[0][0] == 2 and top[0][2] == namespace["test_text"]  # the test text's copy ranks first
    # the seed-behaviour block: one SGD step of ascent ≈ lr × "TracIn" (GradDot) — same signs
    assert np.all(np.sign(namespace["seed_style"]) == np.sign(namespace["tracin_scores"]))
