"""Toxicity attribution experiment: seed JSON layout, seeded generation, θ0 kept, CLI twin, classifiers, data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from untrac_pl.compat import UnTracConfig
from untrac_pl.data.records import DataSource
from untrac_pl.errors import DataError
from untrac_pl.experiments.toxicity import (
    GenerationConfig,
    ToxicityAttributionExperiment,
    ToxicityExperimentConfig,
    load_toxicity_scorer,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = dict(train=[DataSource(format="generated", generator="quickstart", split="train")],
                  prompts=[DataSource(format="generated", generator="quickstart", split="queries")])



def _untrac(model_dir, **overrides) -> UnTracConfig:
    kwargs = dict(model_name=str(model_dir), unlearning_rate=1e-3, unlearning_steps=2, device="cpu", seed=3,
                  max_train_samples=24, max_test_samples=3, top_k_influences=4, max_length=48)
    kwargs.update(overrides)
    return UnTracConfig(**kwargs)


def test_offline_experiment_writes_the_seed_json_and_keeps_theta0(saved_model_dir, tmp_path):
    exp_cfg = ToxicityExperimentConfig(**QUICKSTART, output_dir=str(tmp_path), prompt_words=4,
                                       generation=GenerationConfig(max_new_tokens=8), toxicity_classifier="auto")
    experiment = ToxicityAttributionExperiment(_untrac(saved_model_dir), exp_cfg)
    training = experiment.load_training_data()
    prompts = experiment.load_test_data_toxic()
    assert len(training) == 24 and len(prompts) == 3
    assert all(len(p["prompt"].split()) <= 4 for p in prompts)
    model = experiment.estimator.model
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    # seeded sampling: same seed → same completion, global RNG untouched
    rng = torch.get_rng_state()
    first = experiment.generate_completion(prompts[0]["prompt"], seed=11)
    assert experiment.generate_completion(prompts[0]["prompt"], seed=11) == first
    assert torch.equal(torch.get_rng_state(), rng)
    results = experiment.run_experiment()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in theta0.items())
    on_disk = json.loads((tmp_path / "untrac_toxicity_results.json").read_text())
    assert on_disk["test_cases"] == json.loads(json.dumps(results["test_cases"]))
    assert on_disk["training_data"]["source"] == ["generated:quickstart/train"]
    assert on_disk["prompts"]["source"] == ["generated:quickstart/queries"]
    assert on_disk["method"] == "untrac_inv" and on_disk["command"]
    for i, case in enumerate(on_disk["test_cases"]):
        assert case["test_case_id"] == i and case["prompt"] == prompts[i]["prompt"]
        assert case["completion"] == experiment.generate_completion(case["prompt"], seed=3 + i)  # seed + i
        top = case["top_influences"]
        assert [t["rank"] for t in top] == [1, 2, 3, 4]
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
        for t in top:
            assert t["text"] == training[t["index"]][:200]
            assert t["group"] in {"animals", "cooking", "sports", "insults"}
        # every training group is scored (24 texts drawn from the four groups)
        assert set(case["group_scores"]) == {r["group"] for r in experiment._training_records()}
    classifier = on_disk["toxicity_classifier"]
    try:  # "auto" takes alt-profanity-check when installed (the [real] extra), else detoxify, else none
        import profanity_check  # noqa: F401
    except ImportError:
        try:
            import detoxify  # noqa: F401
        except ImportError:
            assert classifier["name"] is None and "detoxify" in classifier["reason"]
            assert all(c["toxicity"] is None for c in on_disk["test_cases"])
    else:
        assert classifier["name"] == "alt-profanity-check"
        assert all(0.0 <= c["toxicity"] <= 1.0 for c in on_disk["test_cases"])


def test_completion_only_attribution_matches_the_estimator(saved_model_dir, tmp_path):
    """Each completion is one UnTrac-Inv target with the prompt masked; the engine run equals the estimator's."""
    exp_cfg = ToxicityExperimentConfig(**QUICKSTART, output_dir=str(tmp_path), generation=GenerationConfig(max_new_tokens=6),
                                       toxicity_classifier="none", snippet_chars=1000)
    untrac = _untrac(saved_model_dir, max_test_samples=2, top_k_influences=24)
    experiment = ToxicityAttributionExperiment(untrac, exp_cfg)
    results = experiment.run_experiment()
    training = experiment.load_training_data()
    case = results["test_cases"][1]
    record = [{"id": "case-1", "group": "completions", "prompt": case["prompt"], "completion": case["completion"]}]
    expected = experiment.estimator.attribute_records(record, training)[0]
    got = np.full(len(training), np.nan)
    for t in case["top_influences"]:
        got[t["index"]] = t["score"]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert results["toxicity_classifier"] == {"name": None, "reason": "disabled in the config"}
    # group scores are the means of the example scores over each group's members (recomputed here from the
    # full row of scores, every training text being listed: top_k_influences = 24)
    groups = np.array([r["group"] for r in experiment._training_records()])
    for case in results["test_cases"]:
        row = np.full(len(training), np.nan)
        for t in case["top_influences"]:
            row[t["index"]] = t["score"]
        assert np.isfinite(row).all()
        assert case["group_scores"] == pytest.approx({g: float(row[groups == g].mean()) for g in set(groups)}, abs=1e-9)


@pytest.mark.parametrize("group, planted", [
    ("insults", " you useless clueless buffoon, nobody likes your boring jokes."),
    ("cooking", " simmer the garlic and onions in the sauce for ten minutes, then add a pinch of salt."),
])
def test_a_completion_is_attributed_to_the_group_it_resembles(saved_model_dir, tmp_path, monkeypatch, group, planted):
    """Behaviour, not bookkeeping: when the completion is an insult (planted; the tiny model's own samples are
    noise), unlearning it raises the loss of the insults group's training texts most; a cooking completion
    (the control: the insults group does not simply always win) points at the cooking group."""
    monkeypatch.setattr(ToxicityAttributionExperiment, "generate_completion", lambda self, prompt, seed=None: planted)
    exp_cfg = ToxicityExperimentConfig(**QUICKSTART, output_dir=str(tmp_path), toxicity_classifier="none")
    experiment = ToxicityAttributionExperiment(_untrac(saved_model_dir, max_test_samples=1, top_k_influences=24), exp_cfg)
    case = experiment.run_experiment()["test_cases"][0]
    assert case["completion"] == planted
    means = case["group_scores"]
    # measured (tiny random GPT-2, 2 Adam steps at 1e-3): insults 0.027 vs 0.019 for the next group (sports);
    # cooking 0.039 vs 0.021 (animals); the top 5 / top 3 texts are all of the group. A flipped sign puts the
    # group last; ignoring the completion (e.g. scoring the prompt) or a group column mix-up loses the match.
    assert max(means, key=means.get) == group, means
    assert [t["group"] for t in case["top_influences"][:3]] == [group] * 3


def test_cli_twin_with_local_prompts_and_a_local_classifier(saved_model_dir, tmp_path, caplog, capsys):
    """`untrac-pl toxicity -c`: prompts from a JSONL file, toxicity from a local sequence-classification model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from untrac_pl.cli import main

    tokenizer = AutoTokenizer.from_pretrained(saved_model_dir)
    clf_cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=64, num_labels=2,
                         id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1}, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(clf_cfg).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "You are such a useless clown and", "group": "insults"}\n{"prompt": "The fox", "completion": " sleeps.", "group": "animals"}\n')
    (tmp_path / "tox.yaml").write_text(f"""
untrac: {{model_name: {saved_model_dir}, unlearning_rate: 1.0e-3, unlearning_steps: 1, device: cpu, seed: 5,
          max_train_samples: 12, max_test_samples: 2, top_k_influences: 3, max_length: 48}}
experiment:
  train: [{{format: generated, generator: quickstart, split: train}}]
  prompts: [{{path: {prompts}}}]
  prompt_words: 3
  generation: {{max_new_tokens: 5}}
  toxicity_classifier: {tmp_path / 'clf'}
  output_dir: {tmp_path / 'out'}
""")
    with caplog.at_level("WARNING"):
        assert main(["toxicity", "-c", str(tmp_path / "tox.yaml")]) == 0
    # unlearning_steps: 1 is flagged in this config's own keys (not UnTracConfig's Python fields, not attribute's)
    assert caplog.text.count("for 5 steps: untrac.unlearning_steps: 5") == 1 and "model.unlearning" not in caplog.text
    results = json.loads((tmp_path / "out" / "untrac_toxicity_results.json").read_text())
    assert results["command"].startswith("untrac-pl toxicity -c")
    assert results["toxicity_classifier"]["label"] == "toxic"
    assert sorted(c["prompt"] for c in results["test_cases"]) == ["The fox", "You are such"]
    assert all(0.0 <= c["toxicity"] <= 1.0 for c in results["test_cases"])
    assert all(len(c["top_influences"]) == 3 for c in results["test_cases"])
    # the end of the run: the top influences and top group of the first test cases, then the file written
    text = capsys.readouterr().out
    assert text.startswith("untrac-pl toxicity: untrac_inv, 2 test cases, 0 failed targets"), text
    assert "top training examples of the test cases:\n  (score = " in text
    for case in results["test_cases"]:
        top_group = max(case["group_scores"], key=case["group_scores"].get)
        assert f"  case {case['test_case_id']}: " in text and f"; top group {top_group} " in text
        first = case["top_influences"][0]
        score = re.escape(f"{first['score']:+.3g}")
        assert re.search(rf'^    1\.\s+{score}\s+{re.escape(first["group"])}\s+"', text, re.M), text
    assert f"wrote {tmp_path / 'out' / 'untrac_toxicity_results.json'} (" in text


def test_configs_load_with_print_config(capsys):
    from untrac_pl.cli import main

    for name in ("toxicity.yaml", "toxicity_offline.yaml", "toxicity_toxigen.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            main(["toxicity", "-c", str(REPO / "configs" / name), "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "experiment:" in capsys.readouterr().out


def test_toxigen_statements_become_prompts(shared_data):
    exp_cfg = ToxicityExperimentConfig(prompts=[DataSource(path=str(shared_data / "tests" / "toxigen.jsonl"))], prompt_words=6)
    experiment = ToxicityAttributionExperiment(UnTracConfig(max_test_samples=13, seed=0), exp_cfg)
    cases = experiment.load_test_data_toxic()  # no model is loaded for this
    assert len(cases) == 13 and experiment._estimator is None
    assert all(1 <= len(c["prompt"].split()) <= 6 and c["type"] == "toxic_prompt" for c in cases)
    assert len({c["group"] for c in cases}) > 1  # a seeded sample across target groups, not the first 13 lines


def test_hub_sources_offline_fail_clearly_or_fall_back_with_a_record(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    experiment = ToxicityAttributionExperiment(UnTracConfig(max_train_samples=5, max_test_samples=2), ToxicityExperimentConfig())
    with pytest.raises(DataError, match="offline"):
        experiment._hub_training_records(5)
    assert len(experiment.load_training_data()) == 5  # no source configured + offline: the generated quickstart, recorded
    assert experiment._data_info["training_data"]["source"] == ["generated:quickstart/train"]
    try:
        import detoxify  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="detoxify is not installed"):
            load_toxicity_scorer("detoxify")  # asked for explicitly: an error, not a silent null


def test_recorded_formula_follows_the_method(saved_model_dir, tmp_path):
    """The JSON's ``sign`` was the UnTrac-Inv formula even for ``method: untrac``."""
    from untrac_pl.experiments.toxicity import score_formula

    assert score_formula("untrac_inv").startswith("score = L(train; θ_T) - L(train; θ0) after unlearning the completion")
    assert score_formula("untrac").startswith("score = L(completion; θ_T) - L(completion; θ0) after unlearning the training text")
    with pytest.raises(ValueError, match="choose one of untrac, untrac_inv"):
        score_formula("graddot")
    exp_cfg = ToxicityExperimentConfig(**QUICKSTART, output_dir=str(tmp_path), generation=GenerationConfig(max_new_tokens=4),
                                       toxicity_classifier="none")
    untrac = _untrac(saved_model_dir, method="untrac", max_train_samples=4, max_test_samples=1, top_k_influences=2,
                     unlearning_steps=1)
    ToxicityAttributionExperiment(untrac, exp_cfg).run_experiment()
    on_disk = json.loads((tmp_path / "untrac_toxicity_results.json").read_text())
    assert on_disk["method"] == "untrac"
    assert on_disk["sign"] == score_formula("untrac")
    assert len(on_disk["test_cases"][0]["top_influences"]) == 2
