"""The real-model experiment's pieces on a tiny Llama GGUF written here: LoRA fine-tuning with a planted
corpus at several doses, seeded completions, every method, the seed-schema JSON, results.md, heat map."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf", reason="the gguf package writes the test's tiny GGUF model")

from test_gguf import write_tiny_llama  # noqa: E402

from untrac_pl.data.schedule import UnlearningSchedule  # noqa: E402
from untrac_pl.experiments.methods import MethodSpec  # noqa: E402
from untrac_pl.experiments.planted import FineTune, PlantedConfig, rank_rows, run_planted  # noqa: E402
from untrac_pl.experiments.toxicity import GenerationConfig  # noqa: E402
from untrac_pl.models import ModelSpec  # noqa: E402
from untrac_pl.optim import OptimizerSpec  # noqa: E402
from untrac_pl.scores import ScoreTable  # noqa: E402

WORDS = {"books": "the old king rode to the castle at dawn and the knights followed him there",
         "news": "the council voted on the new budget after a long meeting in the city hall",
         "forum": "anyone know how to fix the error when the install fails on my old laptop",
         "science": "the protein binds to the receptor and the cell then changes its shape"}


def _corpora(tmp_path):
    folder = tmp_path / "corpora"
    folder.mkdir()
    for name, text in WORDS.items():
        words = text.split()
        lines = [json.dumps({"text": " ".join(words[i % 5:] + words[: i % 5])}) for i in range(12)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    tox = tmp_path / "tox.jsonl"
    tox.write_text("\n".join(json.dumps({"text": f"those people are awful and ruin everything number {i}", "toxicity_human": 5.0})
                             for i in range(30)) + "\n")
    return folder, tox


def test_rank_rows_by_hand():
    table = ScoreTable(__import__("torch").tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]]), ["c0", "c1"], ["c0", "c1"],
                       ["a", "p", "b"], ["a", "p", "b"], "group", "group", "m")
    rows = rank_rows(table, "p")
    assert [r["rank"] for r in rows] == [1, 3]
    assert rows[0]["margin"] == pytest.approx(0.2) and rows[1]["margin"] == pytest.approx(-0.7)


def test_planted_experiment_end_to_end_on_a_tiny_gguf(tmp_path):
    gguf_path = write_tiny_llama(tmp_path / "tiny.gguf")
    corpora, tox = _corpora(tmp_path)
    adam = OptimizerSpec(name="adam", lr=1e-3)
    cfg = PlantedConfig(
        name="tiny", output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
        model=ModelSpec(gguf_file=str(gguf_path), gguf_cache_dir=str(tmp_path / "cache"), lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        corpora_dir=str(corpora), corpora=list(WORDS), toxigen_file=str(tox), records_per_corpus=6, block_size=16,
        planted_group="forum", doses=[0.0, 0.5], num_prompts=3, prompt_words=4, generation=GenerationConfig(max_new_tokens=4),
        fine_tune=FineTune(steps=4, batch_size=4, checkpoint_steps=[2, 4]), max_length=48, eval_batch_size=8,
        methods=[MethodSpec(name="untrac_inv", target_unit="group", optimizer=adam, unlearning=UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None)),
                 MethodSpec(name="untrac", optimizer=adam, unlearning=UnlearningSchedule(num_epochs=1, batch_size=1), data={"samples_per_group": 3}),
                 MethodSpec(name="graddot"), MethodSpec(name="tracin")],
        toxicity_classifier="none",
    )
    run_planted(cfg, command="test")
    out = tmp_path / "out"
    record = json.loads((out / "planted.json").read_text())
    assert [d["planted"] for d in record["doses"].values()] == [0, 3]
    for dose in record["doses"].values():
        assert set(dose["methods"]) == {"untrac_inv", "untrac", "graddot", "tracin"}
        for entry in dose["methods"].values():
            assert all(1 <= r["rank"] <= 4 for r in entry["rows"]) and 0.0 <= entry["top1_rate"] <= 1.0
    # the same prompts, the same seeds: completions differ between doses only through the fine-tuned weights
    assert len(record["prompts"]) == 3 and all(len(d["completions"]) == 3 for d in record["doses"].values())
    seed = json.loads((out / "untrac_toxicity_results.json").read_text())
    case = seed["test_cases"][0]
    assert {"prompt", "completion", "toxicity", "top_influences", "group_scores"} <= set(case)
    assert case["top_influences"] and case["top_influences_method"] == "untrac_inv"  # UnTrac-Inv scores every training block
    assert case["top_influences"][0]["rank"] == 1 and case["top_influences"][0]["group"] in WORDS
    assert set(case["group_scores"]) == {"untrac_inv", "untrac", "graddot", "tracin"}
    md = (out / "results.md").read_text()
    assert "top-1" in md and "Ground truth (leave-corpus-out" in md and (out / "heatmap.png").exists()


def test_planted_config_refuses_bad_fields():
    with pytest.raises(ValueError, match="planted_group"):
        PlantedConfig(planted_group="zzz", methods=[MethodSpec(name="graddot")])
    with pytest.raises(ValueError, match="methods"):
        PlantedConfig()
