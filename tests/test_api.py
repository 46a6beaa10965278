"""``untrac_pl.attribute``: the in-memory API gives the CLI's scores, takes records, texts and sources, and
the README's snippet runs as written."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO

import untrac_pl
from untrac_pl.data.generators import generate
from untrac_pl.data.records import DataSource
from untrac_pl.scores import ScoreTable

QUICKSTART_MODEL = {"config": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128,
                               "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
                    "train_tokenizer_vocab": 384, "init_seed": 0}
CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


def test_the_api_gives_the_cli_scores_bit_for_bit(tmp_path):
    """configs/quickstart.yaml through ``untrac-pl attribute`` and the same settings through the API."""
    from untrac_pl.cli import main

    assert main(["attribute", "-c", str(REPO / "configs" / "quickstart.yaml"), f"--attribution.output_dir={tmp_path / 'cli'}",
                 "--trainer.enable_progress_bar=false", "--trainer.logger=false"]) == 0
    cli = ScoreTable.load(tmp_path / "cli" / "scores.safetensors")
    table = untrac_pl.attribute(
        generate("quickstart", "train"), generate("quickstart", "queries"), method="untrac_inv", model=QUICKSTART_MODEL,
        optimizer={"name": "adam", "lr": 5e-5}, unlearning={"num_steps": 5, "num_epochs": None, "batch_size": None},
        max_length=64, eval_batch_size=32, trainer=CPU)
    assert table.row_ids == cli.row_ids and table.col_ids == cli.col_ids
    assert torch.equal(table.scores, cli.scores)
    assert table.metadata["method"] == "untrac_inv" and table.metadata["optimizer_steps"] == cli.metadata["optimizer_steps"]


def test_texts_records_and_sources_are_all_accepted(tmp_path):
    train = generate("quickstart", "train")[:12]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in train), encoding="utf-8")
    model = {**QUICKSTART_MODEL, "train_tokenizer_vocab": 300}
    kwargs = dict(method="graddot", model=model, max_length=32, trainer=CPU)
    from_records = untrac_pl.attribute(train, ["a text to attribute", "another one"], **kwargs)
    from_sources = untrac_pl.attribute(DataSource(path=str(path)), [DataSource(path=str(path))], **kwargs)
    from_texts = untrac_pl.attribute([r["text"] for r in train], ["a text to attribute", "another one"], **kwargs)
    assert from_records.scores.shape == (2, 12) and from_sources.scores.shape == (12, 12)
    assert from_texts.scores.shape == (2, 12) and torch.isfinite(from_texts.scores).all()
    assert from_records.col_ids == [r["id"] for r in train]
    result = untrac_pl.attribute(train, ["a text to attribute"], return_result=True, output_dir=str(tmp_path / "out"), **kwargs)
    assert result.output_dir is not None and (tmp_path / "out" / "scores.safetensors").exists() and not result.failed
    summary = __import__("json").loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["command"].startswith("python: untrac_pl.attribute(method='graddot'")  # how the run was made


def test_a_loaded_model_is_used_as_it_is_and_left_at_theta0(tiny_tokenizer):
    from conftest import tiny_gpt2_config

    from untrac_pl.models import ModelSpec, build_model

    net = build_model(ModelSpec(config=tiny_gpt2_config(0.0)), tiny_tokenizer)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    table = untrac_pl.attribute(generate("quickstart", "train")[:8], ["a cat sat on a mat"], model=net, tokenizer=tiny_tokenizer,
                                optimizer={"lr": 1e-3}, max_length=32, trainer=CPU)
    assert torch.isfinite(table.scores).all() and float(table.scores.abs().max()) > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="tokenizer"):
        untrac_pl.attribute(["x y z"], ["x"], model=net)


def test_bad_arguments_name_the_python_argument():
    with pytest.raises(ValueError, match="optimizer: .*unexpected keyword argument 'learning_rate'"):
        untrac_pl.attribute(["a b c"], ["a"], optimizer={"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="method 'untrak' is unknown"):
        untrac_pl.attribute(["a b c"], ["a"], method="untrak")
    with pytest.raises(ValueError, match="target_unit must be example or group, got 'groupp'"):
        untrac_pl.attribute(["a b c"], ["a"], target_unit="groupp")  # a typo is refused, not written as row_unit: groupp


def test_the_readme_python_api_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):text.index("## Coming from UnTrac-TNLP")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md[Python API]", "exec"), namespace)
    assert (tmp_path / "runs" / "api_demo" / "scores.safetensors").exists()
    table, same = namespace["table"], namespace["same"]
    assert torch.equal(same.scores, table.scores) and same.col_ids == table.col_ids
    printed = capsys.readouterr().out.splitlines()
    # the rankings: each query's top training examples, then each query group's training groups, best first
    assert printed[0].startswith("q-insult ['") and printed[1].startswith("q-cook ['")
    ranking = table.top_k(3)["q-insult"]
    assert printed[0] == "q-insult " + str([f"{i} {s:+.3g}" for i, s in ranking])
    assert [s for _, s in ranking] == sorted(table.scores[0].tolist(), reverse=True)[:3]
    assert printed[2].startswith("insults: ") and printed[3].startswith("cooking: ")
    assert all(g in printed[2] for g in ("animals", "cooking", "sports", "insults"))


def test_vocabularies_render_the_callers_keys():
    from untrac_pl import vocabulary as v

    paper = {"num_steps": 5, "num_epochs": None, "batch_size": None}
    assert v.CLI.setting("unlearning", paper) == "model.unlearning: {num_steps: 5, num_epochs: null, batch_size: null}"
    assert v.PYTHON_API.setting("unlearning", paper) == "unlearning={'num_steps': 5, 'num_epochs': None, 'batch_size': None}"
    assert v.UNTRAC_CONFIG.setting("unlearning", paper) == "UnTracConfig(unlearning_steps=5)"
    assert [w.key("max_length") for w in (v.CLI, v.PYTHON_API, v.UNTRAC_CONFIG)] == ["data.max_length", "max_length", "UnTracConfig.max_length"]
    assert [w.setting("eval_batch_size", 8) for w in (v.CLI, v.PYTHON_API)] == ["data.eval_batch_size: 8", "eval_batch_size=8"]
    assert [w.setting("unlearning.loss_reduction", "token_mean") for w in (v.CLI, v.PYTHON_API)] == [
        "model.unlearning.loss_reduction: token_mean", "unlearning.loss_reduction='token_mean'"]
    assert [w.key("samples_per_group") for w in (v.CLI, v.PYTHON_API)] == ["data.samples_per_group", "samples_per_group"]
    assert v.UNTRAC_SECTION.setting("unlearning", paper) == "untrac.unlearning_steps: 5"  # untrac-pl toxicity / scaling
    assert v.UNTRAC_SECTION.key("max_length") == "untrac.max_length"
    assert v.current() is v.CLI  # nothing said: the command line's keys
    with v.speaking(v.UNTRAC_CONFIG):
        with v.speaking(v.PYTHON_API):  # the estimator calls attribute(): its user wrote an UnTracConfig
            assert v.current() is v.UNTRAC_CONFIG
    assert v.current() is v.CLI


def test_api_warnings_name_the_keyword_arguments_once_per_process(caplog):
    import logging

    from untrac_pl.config import AttributionConfig
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionRunner
    from untrac_pl.models import ModelSpec
    from untrac_pl.unlearning import UnTracModule

    train, queries = generate("quickstart", "train")[:8], ["a cat sat on a mat"]
    model = {**QUICKSTART_MODEL, "config": {**QUICKSTART_MODEL["config"], "n_positions": 32}, "train_tokenizer_vocab": 300}
    kwargs = dict(model=model, unlearning={"num_steps": 1, "num_epochs": None, "batch_size": None}, max_length=64, trainer=CPU)
    with caplog.at_level(logging.WARNING):
        untrac_pl.attribute(train, queries, **kwargs)
        untrac_pl.attribute(train, queries, **kwargs)
    messages = [r.getMessage() for r in caplog.records]
    clamp = [m for m in messages if "exceeds the model's context" in m]
    single = [m for m in messages if "GradCos" in m]
    assert len(clamp) == 1 and clamp[0].startswith("max_length=64 exceeds the model's context of 32 tokens")
    assert len(single) == 1 and single[0].endswith("5 steps: unlearning={'num_steps': 5, 'num_epochs': None, 'batch_size': None}")
    assert "data.max_length" not in caplog.text and "model.unlearning" not in caplog.text
    # the engine called directly (the CLI's path) keeps the command line's keys, on every run
    caplog.clear()
    for _ in range(2):
        dm = AttributionDataModule.from_records(train, [{"id": "q", "group": "q", "text": queries[0]}], max_length=64)
        module = UnTracModule(model=ModelSpec(**model), unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
        with caplog.at_level(logging.WARNING):
            AttributionRunner(module, dm, AttributionConfig(), CPU).prepare()
    assert caplog.text.count("data.max_length=64 exceeds") == 2
    assert caplog.text.count("model.unlearning: {num_steps: 5, num_epochs: null, batch_size: null}") == 2
