"""What a researcher sees in the terminal (issue 13, points 1, 2 and 5): the end-of-run report, quiet
output (no Lightning banners unless --verbose), progress on stderr (one bar per phase in a terminal, a
few lines in a file), the interrupt and resume lines, help order, did-you-mean, errors in the caller's words."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from untrac_pl.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
BANNERS = ("GPU available", "TPU available", "Seed set to", "💡", "litlogger", "LOCAL_RANK")
LIGHTNING_BARS = ("Predicting", "Training:", "Epoch 0", "Sanity Checking", "Writing model shards")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``untrac-pl ARGS`` in a fresh interpreter, stdout and stderr captured (so: not a terminal)."""
    return subprocess.run([sys.executable, "-m", "untrac_pl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=ENV)


# -- the end of a run, quiet output, few progress lines when redirected -----------------------------------


def test_attribute_reports_findings_files_and_tensorboard_quietly(tmp_path):
    out = tmp_path / "qs"
    run = _cli("attribute", "-c", str(QUICKSTART), f"--attribution.output_dir={out}")
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert text.startswith("untrac-pl attribute: untrac_inv, 6 queries x 96 training examples, 0 failed targets")
    # the top training groups per query group: the shared group ranks first in each row of the demo
    assert "top training groups per query group" in text
    for group in ("animals", "cooking", "sports", "insults"):
        assert re.search(rf"^  {group}\s+{group} \+", text, re.M), group
    # the top examples of the first queries, with the query text and the training texts
    assert "top training examples of the first 3 of 6 queries:" in text
    rankings = json.loads((out / "rankings.json").read_text())
    first = rankings["queries"][0]
    assert f"  {first['query_id']} ({first['query_group']})" in text
    assert "1.  +" in text and first["top"][0]["id"] in text
    # the files written, and how to open TensorBoard
    assert f"files in {out}/:" in text
    for name in ("scores.safetensors", "rankings.json", "group_scores.csv", "summary.json", "config.yaml"):
        assert re.search(rf"^  {re.escape(name)}\s+\S", text, re.M), name
    if list(out.rglob("events.out.tfevents*")):
        assert "TensorBoard: tensorboard --logdir " + str(out) in text
    # quiet: no Lightning banner or advert anywhere, no Lightning bar next to the run's
    for noise in BANNERS + LIGHTNING_BARS:
        assert noise not in run.stdout + run.stderr, noise
    # progress went to stderr, as a few plain lines (no carriage-return updates): θ0 + one per target here
    lines = run.stderr.splitlines()
    assert "\r" not in run.stderr and len(lines) <= 10, run.stderr
    assert lines[0].startswith("θ0 losses: 3/3 batches") and lines[-1].startswith("targets: 6/6 targets"), run.stderr


def test_no_banner_before_a_config_error_and_verbose_brings_them_back(tmp_path):
    args = ["attribute", "-c", str(QUICKSTART), f"--attribution.output_dir={tmp_path / 'x'}", "--data.max_length=1"]
    quiet = _cli(*args)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().startswith("untrac-pl attribute: error:") and "\n" not in quiet.stderr.strip()
    assert not any(b in quiet.stdout + quiet.stderr for b in BANNERS)
    loud = _cli("--verbose", *args)  # root-level --verbose
    assert loud.returncode == 2 and "Seed set to 0" in loud.stderr
    # per-command --verbose on a real run: Lightning's device banners are back
    run = _cli("attribute", "-c", str(QUICKSTART), f"--attribution.output_dir={tmp_path / 'v'}", "--verbose")
    assert run.returncode == 0, run.stderr
    assert "GPU available" in run.stderr and "TPU available" in run.stderr


def test_first_output_within_two_seconds_in_a_terminal(tmp_path):
    """In a terminal the command says something at once (importing torch and Lightning takes seconds)."""
    import pty

    leader, follower = pty.openpty()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "untrac_pl.cli", "attribute", "-c", str(QUICKSTART),
                             f"--attribution.output_dir={tmp_path / 'x'}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower, cwd=REPO, env=ENV)
    os.close(follower)
    try:
        first = os.read(leader, 200).decode("utf-8", "replace")
        elapsed = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)  # our own child: nothing more is needed from it
        proc.wait(timeout=60)
        os.close(leader)
    assert first.startswith("untrac-pl attribute: loading"), first
    assert elapsed < 2.0, elapsed


# -- one bar per phase in a terminal -------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _tiny_run(tiny_spec, quickstart, out=None, trainer=None, **config):
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.unlearning import UnTracModule

    train = [r for r in quickstart["train"] if r["group"] in ("animals", "sports")][:8]
    module = UnTracModule(model=tiny_spec(), unlearning=UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(train, quickstart["queries"][:3], max_length=64, eval_batch_size=4)
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, **(trainer or {})}
    return run_attribution(module, dm, AttributionConfig(output_dir=str(out or "unused"), target_unit="example", **config),
                           kwargs, write=out is not None)


def test_one_bar_per_phase_in_a_terminal_none_of_lightnings(monkeypatch, tiny_spec, quickstart):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    _tiny_run(tiny_spec, quickstart)
    text = terminal.getvalue()
    # tqdm redraws each bar in place: every redraw starts with a carriage return and the bar's name
    names = {re.sub(r":.*", "", part).strip() for part in re.split(r"[\r\n]", text) if part.strip()}
    assert names == {"θ0 losses", "targets"}, names
    assert "3/3" in text and "query-2 done" in text
    assert not any(bar in text + stdout.getvalue() for bar in LIGHTNING_BARS)
    assert stdout.getvalue() == ""  # progress never goes to stdout
    terminal.seek(0)
    terminal.truncate()
    _tiny_run(tiny_spec, quickstart, trainer={"enable_progress_bar": False})
    assert terminal.getvalue() == ""  # trainer.enable_progress_bar: false silences them all


def test_progress_lines_when_redirected_are_few():
    from untrac_pl.console import Progress

    stream = io.StringIO()
    bar = Progress("targets", total=150, unit="target", stream=stream)
    for i in range(150):
        bar.update(1, note=f"query-{i} done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("targets: 150/150 targets (") and lines[-1].endswith("; query-149 done)")
    # in a terminal: one tqdm bar, redrawn in place
    terminal = _Terminal()
    bar = Progress("targets", total=150, unit="target", stream=terminal)
    for _ in range(150):
        bar.update(1)
    assert terminal.getvalue().count("\n") == 1 and "150/150" in terminal.getvalue()


def test_gradient_baseline_and_fit_have_a_bar(capsys, tiny_spec, quickstart):
    _tiny_run(tiny_spec, quickstart, method="graddot")
    err = capsys.readouterr().err.splitlines()
    assert err and re.match(r"GradDot training gradients: (\d+)/\1 batches \(", err[-1]), err
    assert len(err) <= 4

    # HIF: the Hessian work (eigenvalue estimate, then LiSSA) has its own bars, before the training gradients
    _tiny_run(tiny_spec, quickstart, method="hif_lissa", baseline={"iterations": 3, "damping_iterations": 4})
    err = capsys.readouterr().err.splitlines()
    stages = [re.match(r"HIF \(LiSSA\) (\w+(?: \w+)?): (\d+)/(\d+) ", line) for line in err]
    finished = [(m.group(1), m.group(2)) for m in stages if m and m.group(2) == m.group(3)]
    assert finished == [("eigenvalues", "4"), ("LiSSA", "3"), ("training gradients", finished[-1][1])], err

    from untrac_pl.data.tokenize import tokenize_records
    from untrac_pl.lm import CausalLMModule
    from untrac_pl.training import FitSpec, fit_lm

    lm = CausalLMModule(model=tiny_spec(), max_steps=6)
    train = [r for g in ("animals", "sports") for r in [x for x in quickstart["train"] if x["group"] == g][:8]]
    lm.load_model([r["text"] for r in train])
    corpus = tokenize_records(train, lm.tokenizer, 64, "training data")
    fit_lm(lm, corpus, FitSpec(max_steps=6, batch_size=4, seed=0, exclude_groups=["animals"]), {"accelerator": "cpu", "devices": 1})
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("train without animals: 6/6 steps (") and "loss " in err[-1], err
    assert len(err) == 2 and not any(bar in line for line in err for bar in LIGHTNING_BARS)


# -- Ctrl-C and resume -----------------------------------------------------------------------------------


CONFIG = """\
seed_everything: 0
attribution: {{method: untrac_inv, target_unit: example, output_dir: {out}, top_k: 3, seed: 0}}
model:
  model:
    config: {{model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}}
    train_tokenizer_vocab: 300
  optimizer: {{name: adam, lr: 0.001}}
  unlearning: {{num_steps: 2, num_epochs: null, batch_size: null}}
data:
  train: [{{format: generated, generator: quickstart, split: train}}]
  queries: [{{format: generated, generator: quickstart, split: queries}}]
  samples_per_group: 3
  max_length: 48
trainer: {{accelerator: cpu, devices: 1, logger: false}}
"""


def test_ctrl_c_says_interrupted_and_how_to_resume_then_resumed_k_of_n(tmp_path, capsys, caplog):
    cfg = tmp_path / "cfg.yaml"
    out = tmp_path / "out"
    cfg.write_text(CONFIG.format(out=out))
    # Ctrl-C during the third target's ascent: inside the Trainer, which turns it into sys.exit(1)
    ctrl_c = '[{"class_path": "kill_after_targets.InterruptAfterTargets", "init_args": {"targets": 2}}]'
    args = ["attribute", "-c", str(cfg), f"--trainer.callbacks={ctrl_c}"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; 2 of 6 targets finished and kept in" in caplog.text  # the engine's log line (stderr)
    assert err.rstrip().endswith("untrac-pl attribute: interrupted; to go on, run the same command again (finished targets, "
                                 "if any were kept, are reused):\n"
                                 f"  untrac-pl attribute -c {cfg} '--trainer.callbacks={ctrl_c}'"), err
    assert "SystemExit" not in err and "Detected KeyboardInterrupt" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    assert main(["attribute", "-c", str(cfg)]) == 0  # the same command (without the test's Ctrl-C)
    captured = capsys.readouterr()
    assert "resumed 2 of 6 targets (finished by the interrupted run); computed 4 now" in captured.out
    assert "resuming: 2 of 6 targets already finished" in captured.err
    assert json.loads((out / "summary.json").read_text())["resumed_targets"] == 2


def test_resume_command_adds_what_the_command_needs():
    from untrac_pl.cli import resume_command

    assert resume_command("attribute", ["attribute", "-c", "my config.yaml"]) == "untrac-pl attribute -c 'my config.yaml'"
    assert resume_command("reproduce", ["reproduce", "-c", "r.yaml"]) == "untrac-pl reproduce -c r.yaml --resume true"
    assert resume_command("fit", ["--verbose", "fit", "-c", "f.yaml"]) == "untrac-pl --verbose fit -c f.yaml --output.overwrite true"


# -- help and errors ---------------------------------------------------------------------------------------


def test_help_lists_the_tools_options_before_the_trainers(capsys):
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    text = capsys.readouterr().out
    order = [text.index(key) for key in ("--attribution.method", "--attribution.target_unit", "--model.model.name_or_path",
                                         "--model.unlearning.max_loss", "--data.train", "--trainer.accelerator")]
    assert order == sorted(order)
    assert "--verbose" in text and "hidden by default" in text
    # the tool's own fields carry their docstring's Args: line, not only type and default (issue 13.5)
    flat = " ".join(text.split())
    for flag, words in (("--model.unlearning.max_loss", "stop a target's ascent early"),
                        ("--model.model.name_or_path", "a Hub id or a ``save_pretrained`` directory"),
                        ("--model.optimizer.lr", "learning rate"),
                        ("--model.unlearning.loss_reduction", "ascent and scoring alike"),
                        ("--attribution.target_unit", "scores each query on its own")):
        block = flat.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert words in block, (flag, block)
    assert "Optimizer of the gradient ascent (paper: Adam, constant lr 5e-5):" in text  # the group title: a whole sentence
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert text.index("--fit.max_steps") < text.index("--output.output_dir") < text.index("--model.model.config") < text.index("--trainer.accelerator")


@pytest.mark.parametrize("args, expected", [
    (["attribute", "--attribution.methd", "untrac"],
     "untrac-pl attribute: error: unrecognized arguments: --attribution.methd untrac (did you mean --attribution.method?)"),
    (["attribute", "--model.unlearning.nmu_steps=3"],
     "untrac-pl attribute: error: unrecognized arguments: --model.unlearning.nmu_steps=3 (did you mean --model.unlearning.num_steps?)"),
    (["reproduce", "--num_sed", "1"], "untrac-pl reproduce: error: unrecognized arguments: --num_sed 1 (did you mean --num_seeds?)"),
    (["attribute", "--zzz", "1"], "untrac-pl attribute: error: unrecognized arguments: --zzz 1 (see untrac-pl attribute --help)"),
])
def test_unknown_key_gets_the_nearest_valid_one(capsys, args, expected):
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == expected


def test_unknown_key_in_a_config_file_gets_the_nearest_valid_one(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("attribution:\n  methd: untrac\n")
    assert main(["attribute", "-c", str(QUICKSTART), "-c", str(typo)]) == 2
    assert "(did you mean attribution.method?)" in capsys.readouterr().err


def test_errors_name_command_line_flags_on_the_cli_and_arguments_in_python(tmp_path, capsys):
    args = ["attribute", "-c", str(QUICKSTART), f"--attribution.output_dir={tmp_path / 'x'}", "--attribution.overwrite=false"]
    assert main([*args, "--model.model.name_or_path=./some/dir"]) == 2
    assert ("set either --model.model.name_or_path or --model.model.config, not both "
            "(to load --model.model.name_or_path, add --model.model.config null)") in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    assert main(args) == 2
    assert "exists; set --attribution.overwrite true or choose another --attribution.output_dir" in capsys.readouterr().err

    import untrac_pl

    with pytest.raises(FileExistsError, match=r"exists; set overwrite=True or choose another output_dir"):
        untrac_pl.attribute(["a b c"], ["a b"], model={"config": {"model_type": "gpt2"}}, output_dir=str(tmp_path / "x"))
    from untrac_pl.errors import ModelLoadError
    from untrac_pl.models import ModelSpec, load_model_and_tokenizer

    with pytest.raises(ModelLoadError, match=r"set either model\.name_or_path or model\.config, not both"):  # the library itself
        load_model_and_tokenizer(ModelSpec(name_or_path="x", config={"model_type": "gpt2"}, train_tokenizer_vocab=300), ["a b c"])


def test_the_reports_group_table_has_group_scores_mds_row_order():
    """The end-of-run group table lists the query groups in group_scores.md's (and the heat map's) aligned order."""
    import torch

    from untrac_pl.callbacks.rankings import RankingWriter
    from untrac_pl.cli._report import _group_block
    from untrac_pl.scores import ScoreTable

    table = ScoreTable(torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.1, 0.2], [0.5, 0.0, 0.1]]), ["q0", "q1", "q2"], ["extra", "b", "a"],
                       ["t0", "t1", "t2"], ["a", "b", "c"], "example", "example", "untrac_inv")
    _, md = RankingWriter.group_tables(table)
    md_rows = [line.split("|")[1].strip() for line in md.splitlines()[2:] if line.startswith("| ")]
    block = _group_block(table)
    assert block[1].split()[:2] == ["query", "group"]
    report_rows = [line.split()[0] for line in block[2:]]
    assert md_rows == report_rows == ["a", "b", "extra"]


def test_help_and_print_config_say_loading_on_stderr_in_a_terminal():
    """`attribute --help` in a terminal: the "loading ..." line at once on stderr, the help alone on stdout."""
    import pty

    leader, follower = pty.openpty()
    try:
        run = subprocess.run([sys.executable, "-m", "untrac_pl.cli", "attribute", "--help"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=follower, cwd=REPO, env=ENV, timeout=120, text=True)
        os.close(follower)
        follower = None
        err = os.read(leader, 2000).decode("utf-8", "replace")
    finally:
        if follower is not None:
            os.close(follower)
        os.close(leader)
    assert run.returncode == 0
    assert err.startswith("untrac-pl attribute: loading"), err
    assert "loading" not in run.stdout and run.stdout.lstrip().startswith("usage:"), run.stdout[:200]
