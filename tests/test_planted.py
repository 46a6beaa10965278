"""The real-model experiment's pieces on a tiny Llama GGUF written here: LoRA fine-tuning with a planted
corpus at several doses, seeded completions, every method, the seed-schema JSON, results.md, heat map."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("gguf", reason="the gguf package writes the test's tiny GGUF model")

from test_gguf import write_tiny_llama  # noqa: E402

from untrac_pl.data.schedule import UnlearningSchedule  # noqa: E402
from untrac_pl.experiments.methods import MethodSpec  # noqa: E402
from untrac_pl.experiments.planted import FineTune, GroundTruth, PlantedConfig, rank_rows, read_statements, run_planted, top1_tail  # noqa: E402
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
    rows = [json.dumps({"text": f"those people are awful and ruin everything number {i}", "toxicity_human": 5.0}) for i in range(30)]
    rows += [json.dumps({"text": f"my neighbours cooked a lovely dinner for everyone {i}", "toxicity_human": 1.0}) for i in range(6)]
    tox.write_text("\n".join(rows) + "\n")
    return folder, tox


def test_rank_rows_by_hand():
    import torch

    table = ScoreTable(torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]]), ["c0", "c1"], ["c0", "c1"],
                       ["a", "p", "b"], ["a", "p", "b"], "group", "group", "m")
    rows = rank_rows(table, "p")
    assert [r["rank"] for r in rows] == [1, 3]
    assert rows[0]["margin"] == pytest.approx(0.2) and rows[1]["margin"] == pytest.approx(-0.7)


def _tiny_config(tmp_path, **overrides):
    gguf_path = write_tiny_llama(tmp_path / "tiny.gguf")
    corpora, tox = _corpora(tmp_path)
    adam = OptimizerSpec(name="adam", lr=1e-3)
    fields = dict(
        name="tiny", output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
        model=ModelSpec(gguf_file=str(gguf_path), gguf_cache_dir=str(tmp_path / "cache"), lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        corpora_dir=str(corpora), corpora=list(WORDS), toxigen_file=str(tox), records_per_corpus=6, block_size=16,
        planted_group="forum", doses=[0.0, 0.5], num_prompts=3, prompt_words=4, generation=GenerationConfig(max_new_tokens=4),
        toxic_statements=4, statement_subsets=2, benign_statements=2, benign_subsets=1, ground_truth=GroundTruth(order_seeds=[0, 1]),
        fine_tune=FineTune(steps=4, batch_size=4, checkpoint_steps=[2, 4]), max_length=48, eval_batch_size=8,
        methods=[MethodSpec(name="untrac_inv", target_unit="group", optimizer=adam, unlearning=UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None)),
                 MethodSpec(name="untrac", optimizer=adam, unlearning=UnlearningSchedule(num_epochs=1, batch_size=1), data={"samples_per_group": 3}),
                 MethodSpec(name="graddot"), MethodSpec(name="tracin")],
        toxicity_classifier="none",
    )
    return PlantedConfig(**{**fields, **overrides})


def test_planted_experiment_end_to_end_on_a_tiny_gguf(tmp_path):
    import copy
    import dataclasses

    import torch

    from untrac_pl.evaluation.metrics import align, pearson

    from untrac_pl.data.tokenize import tokenize_records
    from untrac_pl.experiments.dose import plant
    from untrac_pl.experiments.planted import corpus_records
    from untrac_pl.lm import CausalLMModule, example_losses
    from untrac_pl.models import build_model, load_tokenizer
    from untrac_pl.quantization import attach_lora
    from untrac_pl.training import FitSpec, fit_lm

    cfg = _tiny_config(tmp_path)
    run_planted(cfg, command="test")
    out = tmp_path / "out"
    record = json.loads((out / "planted.json").read_text())
    assert [d["planted"] for d in record["doses"].values()] == [0, 3]
    for dose in record["doses"].values():
        assert set(dose["methods"]) == {"untrac_inv", "untrac", "graddot", "tracin"}
        for entry in dose["methods"].values():
            completions = [r for r in entry["rows"] if r["completion"].startswith("completions/")]
            assert len(completions) == 3 and len(entry["rows"]) == 3 + 2 + 1  # 3 completions, 2 toxic subsets, 1 benign
            assert all(1 <= r["rank"] <= 4 for r in entry["rows"]) and 0.0 <= entry["top1_rate"] <= 1.0
            assert entry["top1_chance_tail"] == pytest.approx(top1_tail(entry["top1_count"], 3, 4))
            assert entry["toxic_mean_rank"] is not None and entry["benign_mean_rank"] is not None
            assert sum(entry["top1_counts"].values()) == 3 and entry["top1_counts"][entry["most_often_first"]] == max(entry["top1_counts"].values())
        assert set(dose["test_losses"]) == {"completions", "toxic", "benign"}
    # the same prompts, the same seeds: completions differ between doses only through the fine-tuned weights
    assert len(record["prompts"]) == 3 and all(len(d["completions"]) == 3 for d in record["doses"].values())
    assert set(record["pretrained_test_losses"]) >= {"toxic", "benign"}
    # held-out statements: none is a prompt's statement, none was planted (the pool's statements at the largest dose)
    pool, prompts, statements = read_statements(cfg)
    assert statements == record["statements"] and [p["prompt"] for p in prompts] == [p["prompt"] for p in record["prompts"]]
    planted_texts = {r["text"] for r in pool[:3]}  # dose 0.5 of 6 forum blocks plants the pool's first 3
    prompt_statements = {p["statement"] for p in record["prompts"]}
    toxic_texts = {q["text"] for q in statements if q["group"].startswith("toxic/")}
    benign_texts = {q["text"] for q in statements if q["group"].startswith("benign/")}
    assert len(toxic_texts) == 4 and len(benign_texts) == 2
    assert not toxic_texts & (prompt_statements | {r["text"] for r in pool}) and not benign_texts & (prompt_statements | planted_texts)
    seed = json.loads((out / "untrac_toxicity_results.json").read_text())
    case = seed["test_cases"][0]
    assert {"prompt", "completion", "toxicity", "top_influences", "group_scores"} <= set(case)
    assert case["top_influences"] and case["top_influences_method"] == "untrac_inv"  # UnTrac-Inv scores every training block
    assert case["top_influences"][0]["rank"] == 1 and case["top_influences"][0]["group"] in WORDS
    assert set(case["group_scores"]) == {"untrac_inv", "untrac", "graddot", "tracin"}

    # ground truth at the main dose: two batch orders and their mean; reliability and each method's statistics
    gt_dir = out / "scores" / "dose0.5"
    order0 = ScoreTable.load(gt_dir / "orders" / "ground_truth_order0.safetensors")
    order1 = ScoreTable.load(gt_dir / "orders" / "ground_truth_order1.safetensors")
    mean = ScoreTable.load(gt_dir / "ground_truth.safetensors")
    assert torch.allclose(mean.scores, (order0.scores + order1.scores) / 2, atol=1e-6)
    assert not torch.allclose(order0.scores, order1.scores)  # another batch order is another model
    assert not (out / "scores" / "dose0" / "ground_truth.safetensors").exists()
    ev = record["evaluation"]
    assert set(ev["reliability"]) == {"completions", "toxic", "benign"}
    assert set(ev["methods"]) == {"untrac_inv", "untrac", "graddot", "tracin"}
    assert ev["methods"]["graddot"]["toxic"]["null"]["n"] == 24 and ev["methods"]["graddot"]["toxic"]["null"]["exact"]
    # an independent re-derivation of GT entries: fine-tune with and without `forum` by hand from the same LoRA
    # initialisation, for each batch order (order 0's θ is the experiment's own model, order 1's is refitted)
    tokenizer = load_tokenizer(cfg.model)
    base = build_model(dataclasses.replace(cfg.model, lora=None), tokenizer)
    train, count = plant(corpus_records(cfg, tokenizer), "forum", pool, 0.5, cfg.seed)
    assert count == 3 and planted_texts == {r["text"] for r in train if r["id"].startswith("planted:")}
    corpus = tokenize_records(train, tokenizer, cfg.max_length, "training data")
    queries = [q for q in record["statements"] if q["group"] == "toxic/part-0"]
    examples = tokenize_records(queries, tokenizer, cfg.max_length, "queries").examples

    def fitted(exclude, order):
        net = attach_lora(copy.deepcopy(base), cfg.model.lora, seed=cfg.model.init_seed)
        lm = CausalLMModule(model=cfg.model, optimizer=cfg.fine_tune.optimizer, lr_schedule=cfg.fine_tune.lr_schedule,
                            warmup_steps=cfg.fine_tune.warmup_steps, max_steps=cfg.fine_tune.steps, grad_clip=1.0)
        lm.attach(net, tokenizer)
        fit_lm(lm, corpus, FitSpec(max_steps=4, batch_size=4, seed=0, order_seed=order, exclude_groups=exclude), {"accelerator": "cpu", "devices": 1})
        return example_losses(net, examples, tokenizer.pad_token_id)

    for order, table in ((0, order0), (1, order1)):
        by_hand = float((fitted(["forum"], order) - fitted([], order)).mean())
        g = table.group_level()
        assert g.scores[g.row_ids.index("toxic/part-0"), g.col_ids.index("forum")].item() == pytest.approx(by_hand, abs=1e-5)
    # the Table 3 statistic, recomputed from the score files: mean over the toxic subsets of Pearson over the corpora
    graddot = ScoreTable.load(gt_dir / "graddot.safetensors")
    m, g, rows, _ = align(graddot, mean)
    toxic_rows = [i for i, r in enumerate(rows) if r.startswith("toxic/")]
    expected = sum(pearson(m[i], g[i]) for i in toxic_rows) / len(toxic_rows)
    assert ev["methods"]["graddot"]["toxic"]["mean"] == pytest.approx(expected, abs=1e-9)
    assert abs(record["dose_response"]["graddot"]["planted_mean_z"]["spearman"]) == pytest.approx(1.0, abs=1e-4)  # two doses: ±1
    md = (out / "results.md").read_text()
    assert "top-1 (p) / mean rank / margin" in md and "At 0 %, is any corpus singled out?" in md and "**Ground truth** (dose 50 %)" in md and "GT test–retest" in md and (out / "heatmap.png").exists()


def test_planted_without_ground_truth_writes_its_cost(tmp_path):
    cfg = _tiny_config(tmp_path, doses=[0.5], ground_truth=GroundTruth(), toxic_statements=0, benign_statements=0,
                       methods=[MethodSpec(name="graddot")])
    run_planted(cfg, command="test")
    record = json.loads((tmp_path / "out" / "planted.json").read_text())
    assert record["evaluation"] is None and record["ground_truth_dose"] is None
    assert "Ground truth (leave-corpus-out fine-tuning, paper Table 3 style) was not run" in (tmp_path / "out" / "results.md").read_text()


def test_top1_tail_is_the_binomial_tail():
    assert top1_tail(0, 8, 6) == pytest.approx(1.0)
    assert top1_tail(8, 8, 6) == pytest.approx((1 / 6) ** 8)
    assert top1_tail(3, 8, 6) == pytest.approx(1 - sum(math.comb(8, j) * (1 / 6) ** j * (5 / 6) ** (8 - j) for j in range(3)))


def test_planted_config_refuses_bad_fields():
    with pytest.raises(ValueError, match="planted_group"):
        PlantedConfig(planted_group="zzz", methods=[MethodSpec(name="graddot")])
    with pytest.raises(ValueError, match="methods"):
        PlantedConfig()
    with pytest.raises(ValueError, match="ground_truth.dose"):
        PlantedConfig(methods=[MethodSpec(name="graddot")], ground_truth={"order_seeds": [0, 1], "dose": 0.5})
    with pytest.raises(ValueError, match="order_seeds"):
        PlantedConfig(methods=[MethodSpec(name="graddot")], ground_truth={"order_seeds": [0, 0]})
    with pytest.raises(ValueError, match="statement_subsets"):
        PlantedConfig(methods=[MethodSpec(name="graddot")], toxic_statements=2, statement_subsets=3)


def test_max_top1_tail_against_enumeration():
    import itertools

    from untrac_pl.experiments.planted import max_top1_tail

    n, k = 5, 4
    maxima = [max(a.count(j) for j in range(k)) for a in itertools.product(range(k), repeat=n)]
    for observed in range(1, n + 1):
        counts = [observed] + [1] * (n - observed) if n - observed < k else None
        if counts is None:
            continue
        expected = sum(m >= observed for m in maxima) / len(maxima)
        assert max_top1_tail(counts, k) == pytest.approx(expected, abs=1e-12)
    assert max_top1_tail([2, 2, 1, 0], k) == pytest.approx(sum(m >= 2 for m in maxima) / len(maxima), abs=1e-12)


def test_planted_bad_statement_files_are_named(tmp_path):
    import dataclasses

    cfg = _tiny_config(tmp_path, toxigen_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="toxigen_file: .*missing.jsonl does not exist"):
        run_planted(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything is written

    def statements_file(lines):
        path = tmp_path / "statements.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
        return dataclasses.replace(cfg, toxigen_file=str(path))

    toxic = [{"text": f"awful statement {i}", "toxicity_human": 5.0} for i in range(30)]
    benign = [{"text": f"kind statement {i}", "toxicity_human": 1.0} for i in range(3)]
    read_statements(statements_file(toxic + benign))  # enough of both
    with pytest.raises(ValueError, match=r"toxigen_file: .*statements.jsonl:31: .*toxicity_human"):
        read_statements(statements_file(toxic + [{"text": "no score"}]))
    with pytest.raises(ValueError, match=r"min_toxicity \(4\).*num_prompts \+ toxic_statements = 7"):
        read_statements(statements_file(toxic[:12] + benign))
    with pytest.raises(ValueError, match=r"max_benign_toxicity \(1.5\), fewer than benign_statements=2"):
        read_statements(statements_file(toxic + benign[:1]))
