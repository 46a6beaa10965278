"""The `untrac-pl` command line: every config parses, the quickstart runs, bad input fails cleanly."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from untrac_pl.cli import main
from untrac_pl.scores import ScoreTable

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _command_of(config: Path) -> str:
    first = config.read_text().splitlines()[0]
    match = re.match(r"#\s*untrac-pl\s+(\w+)\s+-c\s+configs/", first)
    assert match, f"{config.name}: first line must be '# untrac-pl <command> -c configs/{config.name}'"
    return match.group(1)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_with_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([_command_of(config), "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.strip(), f"{config.name}: --print_config printed nothing"


def test_print_config_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["attribute", "--print_config"])
    out = capsys.readouterr().out
    for expected in ("method: untrac_inv", "lr: 5.0e-05", "name: adam", "- 0.999", "eval_batch_size"):
        assert expected in out


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    code = main(["attribute", "-c", str(REPO / "configs" / "quickstart.yaml"), f"--attribution.output_dir={out}", "--trainer.enable_progress_bar=false"])
    assert code == 0
    files = {p.name for p in out.iterdir()}
    assert {"scores.safetensors", "rankings.json", "group_scores.csv", "group_scores.md", "memory.json", "summary.json", "config.yaml", "tensorboard"} <= files
    table = ScoreTable.load(out / "scores.safetensors")
    rankings = json.loads((out / "rankings.json").read_text())
    assert table.method == "untrac_inv" and table.scores.shape == (6, 96)
    duplicate = next(q for q in rankings["queries"] if q["query_id"] == "query-5")
    assert duplicate["top"][0]["text"] == duplicate["query_text"]  # the verbatim training copy ranks first
    memory = json.loads((out / "memory.json").read_text())
    assert memory["unlearning"]["peak_bytes"] > 0 and memory["scoring"]["peak_bytes"] > 0
    events = list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["histograms"]) | set(acc.Tags()["tensors"])
    assert "ascent_loss/query-0" in tags and "scores/all" in tags and any(t.startswith("rankings/top_k") for t in tags)


def _bad_run(tmp_path, *extra):
    out = tmp_path / "out"
    args = ["attribute", "-c", str(REPO / "configs" / "quickstart.yaml"), f"--attribution.output_dir={out}", "--trainer.enable_progress_bar=false", *extra]
    return out, args


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (None, ["--data.train=[{path: MISSING}]"], "MISSING: file not found"),
        ("", ["--data.train=[{path: FILE}]"], "FILE: no records"),
        ('{"text": "ok ok"}\n{oops\n', ["--data.train=[{path: FILE}]"], "FILE, line 2: not valid JSON"),
        ('{"group": "g"}\n', ["--data.train=[{path: FILE}]"], "FILE, line 1, field 'text'"),
        ('{"text": ""}\n', ["--data.train=[{path: FILE}]"], "text is empty"),
        ('{"body": "hi"}\n', ["--data.train=[{path: FILE}]"], "fields present: body"),
        (None, ["--model.model.name_or_path=./no/model/here", "--model.model.config=null"], "path './no/model/here' does not exist"),
        (None, ["--model.model.name_or_path=gpt2", "--model.model.config=null", "--model.model.train_tokenizer_vocab=null"], "Hub is offline"),
        (None, ["--data.max_length=1"], "max_length must be >= 2"),
    ],
    ids=["missing-file", "empty-file", "bad-json", "no-text", "empty-text", "unknown-field", "no-model-path", "hub-offline", "max-length"],
)
def test_bad_input_clear_error_and_no_complete_output(tmp_path, capsys, setup, extra, message):
    data = tmp_path / "data.jsonl"
    if setup is not None:
        data.write_text(setup)
    target = str(data) if setup is not None else str(tmp_path / "missing.jsonl")
    extra = [e.replace("FILE", target).replace("MISSING", target) for e in extra]
    out, args = _bad_run(tmp_path, *extra)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.replace("FILE", target).replace("MISSING", target) in err
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_config_typo_is_rejected(tmp_path):
    out, args = _bad_run(tmp_path, "--model.optimizer.learning_rate=0.1")
    # main() reports parser errors in one line and returns 2 (docs/input_catalogue.md, C25)
    assert main(args) == 2 and not out.exists()


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "untrac_pl.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "attribute" in result.stdout
