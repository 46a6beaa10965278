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


def test_the_readme_python_api_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):text.index("## Coming from UnTrac-TNLP")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md[Python API]", "exec"), {})
    assert (tmp_path / "runs" / "api_demo" / "scores.safetensors").exists()
    printed = capsys.readouterr().out
    assert "animals" in printed and "insults" in printed
