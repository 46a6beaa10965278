"""The `untrac-pl` command line: every config parses, the quickstart runs, bad input fails cleanly."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
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
    args = ["attribute", "-c", str(REPO / "configs" / "quickstart.yaml"), f"--attribution.output_dir={out}", "--trainer.enable_progress_bar=false"]
    previous = os.umask(0o022)  # a normal umask: every file of the run is 0644, as a plain open() gives
    try:
        code = main(args)
    finally:
        os.umask(previous)
    assert code == 0
    files = {p.name for p in out.iterdir()}
    assert {"scores.safetensors", "rankings.json", "group_scores.csv", "group_scores.md", "group_scores.png", "memory.json", "summary.json", "config.yaml", "tensorboard"} <= files
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {name: oct(mode) for name, mode in modes.items() if mode != 0o644} == {}, "files not 0644 under umask 022"
    assert any(name.startswith("tensorboard/") for name in modes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "untrac-pl attribute " + shlex.join(args[1:])
    from PIL import Image

    width, height = Image.open(out / "group_scores.png").size  # the query group x training group heat map
    assert 400 <= width <= 2000 and 300 <= height <= 2000, (width, height)
    md = (out / "group_scores.md").read_text().splitlines()
    header = [c.strip() for c in md[0].split("|")[2:-1]]
    body = [[c.strip() for c in line.split("|")[1:-1]] for line in md[2:] if line.startswith("| ")]
    assert [row[0] for row in body] == header  # the quickstart's four groups: one order, on the diagonal
    assert all(row[1 + i].startswith("**") for i, row in enumerate(body))  # each row's maximum is its own group
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
    assert len(events) == 1  # one event file for the run's Trainers (untrac_pl.board)
    assert "unlearning/ascent_loss" in tags and "scores/all" in tags and any(t.startswith("rankings/top_k") for t in tags)


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
    # the command-line source list replaces the quickstart config's generated one (docs/input_catalogue.md, C51)
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


# -- the root command and the package ------------------------------------------------------------------

def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (this one has torch loaded already); fails the test if it fails."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result


def test_root_help_lists_every_command_without_importing_torch():
    from untrac_pl.cli import COMMANDS

    # in a fresh interpreter: --help and --version must not pull in torch, Lightning or jsonargparse
    heavy = ("torch", "lightning", "transformers", "jsonargparse")
    out = _fresh_python(
        "import sys, contextlib, io\n"
        "from untrac_pl.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    assert main(['--help']) == 0 and main(['--version']) == 0\n"
        f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print(buf.getvalue())\n").stdout
    assert set(COMMANDS) == {"attribute", "fit", "reproduce", "toxicity", "scaling", "planted"}
    for name, description in COMMANDS.items():
        assert re.search(rf"^  {name}\s+{re.escape(description)}$", out, re.M), name


def test_import_untrac_pl_loads_no_torch():
    _fresh_python("import sys, untrac_pl; assert 'torch' not in sys.modules and 'lightning' not in sys.modules; dir(untrac_pl)")


@pytest.mark.parametrize("command", ["attribute", "fit", "reproduce", "toxicity", "scaling"])
def test_each_command_module_and_its_description(command):
    import importlib

    from untrac_pl.cli import COMMANDS

    module = importlib.import_module(f"untrac_pl.cli.{command}")
    assert module.main.__doc__.strip().splitlines()[0] == COMMANDS[command]


def test_version_is_the_packages(capsys):
    import untrac_pl

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"untrac-pl {untrac_pl.__version__}\n"
    from setuptools.config.setupcfg import (
        read_configuration,  # what `pip install` reads: attr: untrac_pl.__version__
    )

    assert read_configuration(str(REPO / "setup.cfg"))["metadata"]["version"] == untrac_pl.__version__


def test_unknown_command_and_no_command(capsys):
    assert main(["atribute", "-c", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'atribute'" in err and "attribute" in err
    assert main([]) == 0 and "commands:" in capsys.readouterr().out


def test_package_exports_resolve_lazily():
    import importlib.util

    import untrac_pl

    assert set(untrac_pl.__all__) <= set(dir(untrac_pl))
    for name in untrac_pl.__all__:
        if name in ("__version__", "attribute"):
            continue
        value = getattr(untrac_pl, name)
        assert value.__name__ == name and value.__module__.startswith("untrac_pl.")
    if importlib.util.find_spec("untrac_pl.api") is None:  # the functional API is not in this tree yet
        with pytest.raises(ImportError, match="untrac_pl.api"):
            untrac_pl.attribute
    else:
        assert callable(untrac_pl.attribute)
    from untrac_pl import UnTracConfig, compat

    assert UnTracConfig is compat.UnTracConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        untrac_pl.nope


def test_attribute_builds_no_trainer_and_passes_the_trainer_arguments(monkeypatch):
    """LightningCLI(run=False) would build a Trainer that the engine never uses: the CLI keeps its arguments only."""
    import functools

    import lightning.pytorch as pl

    from untrac_pl.cli.attribute import AttributionCLI
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.unlearning import UnTracModule

    built = []
    original = pl.Trainer.__init__

    @functools.wraps(original)  # the signature stays visible to the parser
    def counting_init(self, *args, **kwargs):
        built.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", counting_init)
    cli = AttributionCLI(UnTracModule, AttributionDataModule, ["-c", str(REPO / "configs" / "quickstart.yaml"), "--trainer.enable_progress_bar=false",
                                                               "--trainer.precision=bf16-mixed"], prog="untrac-pl attribute", description="")
    assert built == [] and cli.trainer is None
    kwargs = cli.trainer_kwargs
    assert kwargs["enable_progress_bar"] is False and kwargs["precision"] == "bf16-mixed" and kwargs["logger"] is True
    assert None not in kwargs.values()  # unset arguments are left to the engine's defaults
