"""docs/input_catalogue.md, row by row: each bad input gets the documented message (or is accepted
as documented) and no complete-looking output is left behind. ``test_cNN_*`` backs row ``CNN``;
rows backed by other files are named in the table and checked to exist."""
from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.errors import (
    DataError,
    ModelLoadError,
    NonFiniteBaseLossError,
    OutputWriteError,
)
from untrac_pl.models import (
    ModelSpec,
    build_model,
    load_model_and_tokenizer,
    load_tokenizer,
)
from untrac_pl.optim import OptimizerSpec
from untrac_pl.unlearning import UnTracModule

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "docs" / "input_catalogue.md"
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
GOOD_TRAIN = [{"id": f"t{i}", "group": g, "text": f"The {w} sat on the mat near the {g} shelf."} for i, (g, w) in enumerate(
    [("a", "cat"), ("a", "dog"), ("b", "bird"), ("b", "fish")])]
GOOD_QUERIES = [{"id": "q0", "group": "q", "text": "A cat sat on the mat."}]


# -- helpers -----------------------------------------------------------------------------------------


def assert_no_complete_output(out: Path) -> None:
    """No ``<output_dir>``, no finished-run marker in ``.partial``, no stray temporary file."""
    assert not out.exists(), f"{out} exists and looks like a finished run"
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        assert not (partial / "summary.json").exists()
    assert not [p for p in out.parent.rglob("*.tmp")], "a temporary file was left behind"


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


DATA_DEFAULTS = {"max_length": 40, "eval_batch_size": 8}


@pytest.fixture(params=["memory", "arrow"])
def storage(request, monkeypatch, tmp_path):
    """Run a file-reading row with both storages: Arrow (data.storage: arrow) must give the same errors."""
    monkeypatch.setitem(DATA_DEFAULTS, "storage", request.param)
    monkeypatch.setitem(DATA_DEFAULTS, "cache_dir", str(tmp_path / "datasets-cache"))
    return request.param


def _attribute(tmp_path, train=None, queries=None, *, spec=None, module=None, schedule=None, data=None, method="untrac_inv", **config):
    """One write=True run into tmp_path/out; ``train``/``queries``: paths (real readers) or records."""
    data = {**DATA_DEFAULTS, **(data or {})}
    train = GOOD_TRAIN if train is None else train
    queries = GOOD_QUERIES if queries is None else queries
    if isinstance(train, Path) or isinstance(queries, Path):
        train = train if isinstance(train, Path) else _jsonl(tmp_path / "good_train.jsonl", train)
        queries = queries if isinstance(queries, Path) else _jsonl(tmp_path / "good_queries.jsonl", queries)
        dm = AttributionDataModule(train=[DataSource(path=str(train))], queries=[DataSource(path=str(queries))], **data)
    else:
        dm = AttributionDataModule.from_records(train, queries, **data)
    if module is None:
        module = UnTracModule(model=spec or ModelSpec(config=_tiny(), train_tokenizer_vocab=300),
                              optimizer=OptimizerSpec(lr=1e-3),
                              unlearning=schedule or UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    return run_attribution(module, dm, AttributionConfig(method=method, output_dir=str(tmp_path / "out"), **config), CPU)


def _tiny(**overrides):
    from conftest import tiny_gpt2_config

    return {**tiny_gpt2_config(0.0), **overrides}


def _expect(tmp_path, error, match, **kwargs):
    with pytest.raises(error, match=match):
        _attribute(tmp_path, **kwargs)
    assert_no_complete_output(tmp_path / "out")


def _cli(args, capsys):
    from untrac_pl.cli import main

    rc = main(["attribute", "-c", str(REPO / "configs" / "quickstart.yaml"), *args])
    err = capsys.readouterr().err.strip()
    return rc, err


# -- data --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("storage")
def test_c01_non_utf8_file(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9 au lait, served hot"}\n')
    _expect(tmp_path, DataError, r"train\.jsonl: not valid UTF-8 \(invalid continuation byte at byte 13\)", train=bad)


def test_c02_utf8_bom_is_accepted(tmp_path):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("\ufeffid,group,text\nx1,g,hello there world\n".encode("utf-8"))
    jsonl = tmp_path / "notepad.jsonl"
    jsonl.write_bytes("\ufeff".encode() + b'{"id": "j1", "text": "hi there you"}\n')
    assert read_records(str(csv_path)) == [{"id": "x1", "group": "g", "text": "hello there world"}]
    assert read_records(str(jsonl)) == [{"id": "j1", "group": "notepad", "text": "hi there you"}]


@pytest.mark.usefixtures("storage")
def test_c03_invalid_json_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "fine line here"}\n{"text": "broken\n')
    _expect(tmp_path, DataError, r"train\.jsonl, line 2: not valid JSON", train=bad)


@pytest.mark.usefixtures("storage")
def test_c04_empty_file(tmp_path):
    empty = tmp_path / "queries.jsonl"
    empty.write_text("\n\n")
    _expect(tmp_path, DataError, r"queries\.jsonl: no records \(the file is empty\)", queries=empty)


@pytest.mark.usefixtures("storage")
def test_c05_missing_text_field(tmp_path):
    bad = _jsonl(tmp_path / "train.jsonl", [{"id": "1", "body": "text under the wrong key"}])
    _expect(tmp_path, DataError, r"train\.jsonl, line 1, field 'text': record has no 'text' field .*fields present: body, id", train=bad)


@pytest.mark.usefixtures("storage")
def test_c06_empty_text(tmp_path):
    bad = _jsonl(tmp_path / "train.jsonl", [{"text": "ok text here"}, {"text": "   "}])
    _expect(tmp_path, DataError, r"train\.jsonl, line 2, field 'text': text is empty", train=bad)


@pytest.mark.usefixtures("storage")
def test_c07_non_string_text(tmp_path):
    bad = _jsonl(tmp_path / "train.jsonl", [{"text": 42}])
    _expect(tmp_path, DataError, r"field 'text': must be a string, got int", train=bad)


@pytest.mark.usefixtures("storage")
def test_c08_prompt_without_completion(tmp_path):
    bad = _jsonl(tmp_path / "queries.jsonl", [{"prompt": "Q: what is 2+2? A:"}])
    _expect(tmp_path, DataError, r"field 'completion': missing \(a prompt needs a completion", queries=bad)


@pytest.mark.usefixtures("storage")
def test_c09_empty_group_name(tmp_path):
    bad = _jsonl(tmp_path / "train.jsonl", [{"group": "", "text": "some text here"}])
    _expect(tmp_path, DataError, r"field 'group': group is empty", train=bad)


@pytest.mark.usefixtures("storage")
def test_c10_duplicate_ids(tmp_path):
    bad = _jsonl(tmp_path / "train.jsonl", [{"id": "x", "text": "first text"}, {"id": "x", "text": "second text"}])
    _expect(tmp_path, DataError, r"training data, field 'id': duplicate id 'x' \(records 0 and 1\); ids must be unique", train=bad)


def test_c11_group_with_one_example_is_accepted(tmp_path):
    train = GOOD_TRAIN + [{"id": "solo", "group": "solo", "text": "A lone sentence about the sea."}]
    result = _attribute(tmp_path, train=train, method="untrac", schedule=UnlearningSchedule(num_epochs=1, batch_size=1))
    assert result.table.col_ids == ["a", "b", "solo"]
    assert result.table.metadata["optimizer_steps"] == {"a": 2, "b": 2, "solo": 1}
    assert torch.isfinite(result.table.scores).all() and (tmp_path / "out" / "summary.json").exists()


def test_c12_text_of_one_token(tmp_path):
    _expect(tmp_path, DataError, r"queries, field 'text': record 'q1' has no target token: it has fewer than two tokens",
            queries=GOOD_QUERIES + [{"id": "q1", "group": "q", "text": "a"}])


def test_c13_completion_cut_away_by_truncation(tmp_path):
    long_prompt = "Please read this long question about many things in turn " * 6
    _expect(tmp_path, DataError, r"record 'q1' has no target token: its completion was cut away by truncation \(raise max_length\)",
            queries=[{"id": "q1", "group": "q", "prompt": long_prompt, "completion": " yes"}])


def test_c14_longer_than_the_model_context_is_clamped(tmp_path, caplog):
    long_query = {"id": "long", "group": "q", "text": " ".join(f"word{i}" for i in range(120))}
    with caplog.at_level(logging.WARNING, logger="untrac_pl.engine"):
        result = _attribute(tmp_path, queries=GOOD_QUERIES + [long_query], data={"max_length": 512})
    assert "data.max_length=512 exceeds the model's context of 64 tokens: clamped to 64" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["max_length"] == 64 and summary["max_length_requested"] == 512 and summary["truncated"]["queries"] == 1
    assert torch.isfinite(result.table.scores).all()


def test_c15_tokenizer_without_pad_token(tmp_path, saved_model_dir):
    # (a) no pad but an eos: eos is reused as pad
    with_eos = tmp_path / "with_eos"
    shutil.copytree(saved_model_dir, with_eos)
    cfg = json.loads((with_eos / "tokenizer_config.json").read_text())
    (with_eos / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "pad_token"}))
    tok = load_tokenizer(ModelSpec(tokenizer=str(with_eos)))
    assert tok.pad_token == tok.eos_token and len(tok) == 300
    # (b) neither pad nor eos: a <pad> token is added and the embeddings grow to match
    bare = tmp_path / "bare"
    shutil.copytree(saved_model_dir, bare)
    (bare / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("pad_token", "eos_token")}))
    net, tok = load_model_and_tokenizer(ModelSpec(name_or_path=str(bare)))
    assert tok.pad_token == "<pad>" and len(tok) == 301 and net.get_input_embeddings().num_embeddings == 301
    result = _attribute(tmp_path, spec=ModelSpec(name_or_path=str(bare)))
    assert torch.isfinite(result.table.scores).all()


def test_c16_file_not_found(tmp_path):
    _expect(tmp_path, DataError, r"nope\.jsonl: file not found", train=tmp_path / "nope.jsonl")


def test_c17_unknown_file_suffix(tmp_path):
    odd = tmp_path / "train.xml"
    odd.write_text("<text>hi</text>")
    _expect(tmp_path, DataError, r"train\.xml: cannot infer the format from suffix '\.xml'; set format: jsonl\|json\|csv\|text\|hf", train=odd)


def test_c18_csv_row_with_extra_columns(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("id,text\n1,hello there\n2,hello,again\n")
    _expect(tmp_path, DataError, r"train\.csv, line 3: row has more columns than the header", train=bad)


# -- model and weights ----------------------------------------------------------------------------------


def test_c19_model_path_does_not_exist(tmp_path):
    _expect(tmp_path, ModelLoadError, r"tokenizer path '\./no/such/model' does not exist", spec=ModelSpec(name_or_path="./no/such/model"))


def test_c20_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _expect(tmp_path, ModelLoadError, r"'gpt2' is not a local directory and the Hugging Face Hub is offline", spec=ModelSpec(name_or_path="gpt2"))


def test_c21_corrupt_safetensors_weights(tmp_path, saved_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(saved_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    _expect(tmp_path, ModelLoadError, r"could not load model '.*broken': a weights file is corrupt or truncated \(safetensors:", spec=ModelSpec(name_or_path=str(broken)))


class _Payload:
    """A pickle that would run a command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_c22_pickle_weights_with_code_are_refused(tmp_path, saved_model_dir):
    evil = tmp_path / "evil"
    shutil.copytree(saved_model_dir, evil)
    net = build_model(ModelSpec(config=_tiny()), load_tokenizer(ModelSpec(tokenizer=str(saved_model_dir))))
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({**net.state_dict(), "payload": _Payload(marker)}, evil / "pytorch_model.bin")
    _expect(tmp_path, ModelLoadError, r"pickle weights \(\.bin/\.pt\) hold more than tensors and were refused \(loaded with torch\.load\(weights_only=True\)",
            spec=ModelSpec(name_or_path=str(evil)))
    assert not marker.exists()  # the payload never ran


def test_c23_custom_code_is_never_run_without_trust_remote_code(tmp_path, saved_model_dir):
    marker = tmp_path / "PWNED"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"

    def repo(name, model_type):
        path = tmp_path / name
        shutil.copytree(saved_model_dir, path)
        config = json.loads((path / "config.json").read_text())
        config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XLM"})
        (path / "config.json").write_text(json.dumps(config))
        (path / "configuration_x.py").write_text(code)
        (path / "modeling_x.py").write_text(code)
        return path

    # a known architecture: the built-in class is used, the repository's code ignored
    net, _ = load_model_and_tokenizer(ModelSpec(name_or_path=str(repo("known", "gpt2"))))
    assert type(net).__name__ == "GPT2LMHeadModel"
    # an architecture only the repository's code knows: refused
    _expect(tmp_path, ModelLoadError, r"(?s)contains custom code which must be executed.*trust_remote_code=True", spec=ModelSpec(name_or_path=str(repo("custom", "xgpt"))))
    assert not marker.exists()


def test_c24_corrupt_score_file(tmp_path):
    from untrac_pl.scores import ScoreTable

    bad = tmp_path / "scores.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"scores\.safetensors: not a readable score file"):
        ScoreTable.load(bad)


# -- configuration --------------------------------------------------------------------------------------


def test_c25_config_typo(tmp_path, capsys):
    rc, err = _cli(["--attribution.methd", "untrac", "--attribution.output_dir", str(tmp_path / "out")], capsys)
    assert rc == 2
    assert err == "untrac-pl attribute: error: unrecognized arguments: --attribution.methd untrac (did you mean --attribution.method?)"
    assert_no_complete_output(tmp_path / "out")


@pytest.mark.parametrize("args, pattern", [
    (["--attribution.method", "untracc"], r"error: .*attribution\.method 'untracc' is unknown; choose one of untrac, untrac_inv, "
                                          r"graddot, gradcos, tracin, hif_lissa, hif_arnoldi, ekfac \(did you mean 'untrac'\?\)"),
    # Literal fields: the flag, the value, the choices and the nearest one, not jsonargparse's "Expected a typing.Literal[...]"
    (["--model.optimizer.name", "adamm"], r"error: --model\.optimizer\.name: 'adamm' is not one of adam, adamw, sgd, "
                                          r"sgd_momentum, rmsprop, adafactor, adam8bit, adamw8bit \(did you mean 'adam'\?\)$"),
    (["--attribution.target_unit", "groupp"], r"error: --attribution\.target_unit: 'groupp' is not one of example, group "
                                              r"\(did you mean 'group'\?\)$"),
    (["--model.model.dtype", "float33"], r"error: --model\.model\.dtype: 'float33' is not one of auto, float32, bfloat16, "
                                         r"float16 \(did you mean 'float32'\?\)$"),
    (["--model.unlearning.loss_reduction", "token"], r"error: --model\.unlearning\.loss_reduction: 'token' is not one of "
                                                     r"example_mean, token_mean \(did you mean 'token_mean'\?\)$"),
])
def test_c26_invalid_choice(tmp_path, capsys, args, pattern):
    rc, err = _cli([*args, "--attribution.output_dir", str(tmp_path / "out")], capsys)
    assert rc == 2 and "\n" not in err
    assert re.search(pattern, err), err
    assert "typing.Literal" not in err
    assert_no_complete_output(tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["--model.optimizer.lr", "-1"], "optimizer.lr must be > 0, got -1.0"),
    (["--model.optimizer.betas", "[0.9, 1.5]"], "optimizer.betas must lie in [0, 1), got (0.9, 1.5)"),
    (["--model.unlearning.num_steps", "0"], "unlearning.num_steps must be >= 1, got 0"),
    (["--model.unlearning.num_epochs", "2"], "unlearning: set exactly one of num_steps and num_epochs"),
    (["--model.unlearning.batch_size", "0"], "unlearning.batch_size must be >= 1, got 0"),
    (["--model.unlearning.max_loss", "-3"], "unlearning.max_loss must be a finite number > 0"),
    (["--data.eval_batch_size", "0"], "field 'data.eval_batch_size': must be >= 1, got 0"),
    (["--data.samples_per_group", "0"], "field 'samples_per_group': must be >= 1, got 0"),
    (["--attribution.top_k", "0"], "attribution.top_k must be an integer >= 1, got 0"),
    (["--attribution.targets_per_pass", "0"], "attribution.targets_per_pass must be an integer >= 1, got 0"),
])
def test_c27_out_of_range_hyperparameters(tmp_path, capsys, args, message):
    rc, err = _cli([*args, "--attribution.output_dir", str(tmp_path / "out")], capsys)
    assert rc == 2 and "\n" not in err and message in err, err
    assert_no_complete_output(tmp_path / "out")


def test_c28_output_dir_exists(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"output directory '.*out' exists; set overwrite: true"):
        _attribute(tmp_path)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "out.partial").exists()


# -- writing and numerics ---------------------------------------------------------------------------------


def _disk_full_on(monkeypatch, predicate):
    """Make io._sync raise ENOSPC (after writing a few bytes) for files matching ``predicate``."""
    import untrac_pl.io as io_module

    original = io_module._sync
    calls = {"n": 0}

    def sync(handle):
        name = Path(handle.name)
        if predicate(name, calls):
            handle.write(b"\0" * 7 if "b" in handle.mode else "\0" * 7)
            raise OSError(errno.ENOSPC, "No space left on device")
        original(handle)

    monkeypatch.setattr(io_module, "_sync", sync)


def test_c29_disk_full_while_writing_a_target(tmp_path, monkeypatch):
    queries = GOOD_QUERIES + [{"id": "q1", "group": "q", "text": "A dog sat on the rug."}]

    def second_target(name, calls):
        if name.parent.name == "targets":
            calls["n"] += 1
            return calls["n"] == 2
        return False

    _disk_full_on(monkeypatch, second_target)
    with pytest.raises(OutputWriteError, match=r"could not write '.*targets/q1-\w+\.safetensors': no space left on device .*; 1 finished targets are kept in '.*out\.partial': free space and re-run the same command to resume"):
        _attribute(tmp_path, queries=queries)
    assert_no_complete_output(tmp_path / "out")
    assert [p.name.split("-")[0] for p in (tmp_path / "out.partial" / "progress" / "targets").iterdir()] == ["q0"]
    monkeypatch.undo()  # space freed: the same command resumes
    result = _attribute(tmp_path, queries=queries)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_targets"] == 1
    assert torch.isfinite(result.table.scores).all()


def test_c30_disk_full_while_writing_final_outputs(tmp_path, monkeypatch):
    _disk_full_on(monkeypatch, lambda name, calls: name.name.startswith(".rankings.json."))
    with pytest.raises(OutputWriteError, match=r"rankings\.json': no space left on device.*1 finished targets are kept"):
        _attribute(tmp_path)
    assert_no_complete_output(tmp_path / "out")
    monkeypatch.undo()
    _attribute(tmp_path)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_targets"] == 1
    assert (tmp_path / "out" / "rankings.json").exists() and not (tmp_path / "out.partial").exists()


def test_c37_non_finite_theta0_losses(tmp_path, tiny_tokenizer):
    net = build_model(ModelSpec(config=_tiny()), tiny_tokenizer)
    with torch.no_grad():
        net.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")  # e.g. an fp16 overflow in the checkpoint
    module = UnTracModule(model=ModelSpec(config=_tiny()), unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    module.attach(net, tiny_tokenizer)
    _expect(tmp_path, NonFiniteBaseLossError, r"losses before any unlearning \(θ0\) are NaN/inf or missing for evaluation examples \[0, 1, 2, 3\]", module=module)



@pytest.mark.parametrize("extra, message", [
    ({"weights_only": False}, r"extra_kwargs\.weights_only=false would unpickle arbitrary objects; convert the checkpoint to safetensors"),
    ({"trust_remote_code": True}, r"set model\.trust_remote_code, not model\.extra_kwargs\.trust_remote_code"),
])
def test_c40_unsafe_loading_through_extra_kwargs(tmp_path, saved_model_dir, extra, message):
    _expect(tmp_path, ModelLoadError, message, spec=ModelSpec(name_or_path=str(saved_model_dir), extra_kwargs=extra))

@pytest.mark.parametrize("option", ["--trainer.max_epochs=3", "--trainer.max_steps=2", "--trainer.limit_predict_batches=0.5"])
def test_c41_trainer_options_that_would_change_the_ascent_plan(tmp_path, capsys, option):
    out = tmp_path / "out"
    rc, err = _cli([option, f"--attribution.output_dir={out}"], capsys)
    key, value = option[len("--trainer."):].split("=")
    assert rc == 2 and f"trainer.{key}={value}" in err and "model.unlearning.num_steps" in err
    assert_no_complete_output(out)


@pytest.mark.parametrize("option", ["--trainer.gradient_clip_val=1.0", "--trainer.gradient_clip_algorithm=norm"])
def test_c47_trainer_gradient_clipping_points_to_the_unlearning_option(tmp_path, capsys, option):
    out = tmp_path / "out"
    rc, err = _cli([option, f"--attribution.output_dir={out}"], capsys)
    key = option[len("--trainer."):].split("=")[0]
    assert rc == 2 and f"trainer.{key}=" in err and "--model.unlearning.max_grad_norm" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert_no_complete_output(out)
    assert not out.with_name("out.partial").exists()


# -- data: rows, duplicate locations, JSON arrays, synthetic CSVs ----------------------------------------


@pytest.mark.usefixtures("storage")
def test_c42_bad_datasets_row_names_the_row(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["fine text here", "also fine text", "   "]}).save_to_disk(str(saved))
    _expect(tmp_path, DataError, r"saved, row 2, field 'text': text is empty", train=saved)


@pytest.mark.usefixtures("storage")
def test_c43_duplicate_ids_name_both_files_and_lines(tmp_path):
    from untrac_pl.data.records import check_unique_ids

    bad = _jsonl(tmp_path / "train.jsonl", [{"id": "x", "text": "first text"}, {"id": "y", "text": "other text"},
                                            {"id": "x", "text": "third text"}])
    _expect(tmp_path, DataError, r"training data, field 'id': duplicate id 'x' \(records 0 and 2\); ids must be unique "
            r"\(first at .*train\.jsonl, line 1; again at .*train\.jsonl, line 3\)", train=bad)
    # across sources: a JSONL line and a CSV line
    other = tmp_path / "more.csv"
    other.write_text("id,text\nz,some text\nx,clashing text\n")
    records = read_records(str(bad))[:1] + read_records(str(other))
    with pytest.raises(DataError, match=r"\(first at .*train\.jsonl, line 1; again at .*more\.csv, line 3\)"):
        check_unique_ids(records, "training data")


@pytest.mark.usefixtures("storage")
def test_c44_json_array_file_with_a_bad_item(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps([{"text": "fine text here"}, {"text": "more fine text"}, {"text": ""}], indent=2))
    _expect(tmp_path, DataError, r"train\.json, item 2, field 'text': text is empty", train=bad)
    broken = tmp_path / "queries.json"
    broken.write_text('[\n  {"text": "fine text here"},\n  {"text": "broken\n]\n')
    _expect(tmp_path, DataError, r"queries\.json, line 3: not valid JSON", queries=broken)


def test_c45_synthetic_csv_with_a_short_row(tmp_path):
    from untrac_pl.data.synthetic import load_synthetic_csv

    short = tmp_path / "short.csv"
    short.write_text("inputs_pretokenized,targets_pretokenized,dataset\n"
                     "What is one plus one?,two,dataset1\nWhat is two plus two?\n")
    with pytest.raises(DataError, match=r"short\.csv, line 3, field 'targets_pretokenized': row has fewer columns than the header"):
        load_synthetic_csv(short)


def test_c46_synthetic_csv_dir_without_the_files(tmp_path):
    from untrac_pl.data.synthetic import load_synthetic, load_synthetic_csv

    with pytest.raises(DataError, match=r"nowhere: missing synthetic_train00_dataset\.csv, synthetic_eval00_dataset\.csv "
                                        r"\(the directory does not exist\); synthetic dataset A needs "
                                        r"synthetic_train00_dataset\.csv and synthetic_eval00_dataset\.csv"):
        load_synthetic("A", tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "synthetic_train10_dataset.csv").write_text("inputs_pretokenized,targets_pretokenized,dataset\n")
    with pytest.raises(DataError, match=r"half: missing synthetic_eval10_dataset\.csv; synthetic dataset B needs"):
        load_synthetic("B", tmp_path / "half")
    with pytest.raises(DataError, match=r"synthetic_eval10_dataset\.csv: file not found"):
        load_synthetic_csv(tmp_path / "half" / "synthetic_eval10_dataset.csv")


# -- data: generated corpora, explicit formats, removed keys -----------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("{format: generated, generator: quickstrat, split: train}", "field 'generator': unknown generator 'quickstrat'; known generators: quickstart (splits: train, queries"),
    ("{format: generated, generator: quickstart, split: test}", "generated:quickstart/test, field 'split': generator 'quickstart' has no split 'test'; choose one of train, queries"),
    ("{format: generated, generator: quickstart, split: train, options: {n_per_grup: 4}}", "field 'options': unknown option(s) n_per_grup for generator quickstart"),
    ("{format: generated, generator: synthetic, split: train}", "field 'options': generator 'synthetic' needs option(s) dataset"),
])
def test_c48_bad_generated_source(tmp_path, capsys, source, message):
    out = tmp_path / "out"
    rc, err = _cli(["--data.train", f"[{source}]", f"--attribution.output_dir={out}"], capsys)
    assert rc == 2 and "\n" not in err and "Traceback" not in err and message in err, err
    assert_no_complete_output(out)


def test_c49_explicit_format_json(tmp_path, capsys):
    exported = tmp_path / "train.export"  # a JSON array under a suffix the reader cannot infer
    exported.write_text(json.dumps(GOOD_TRAIN), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        _cli(["--data.train=null", "--data.train", f"[{{path: {exported}, format: json}}]", "--print_config"], capsys)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"path: {exported}" in printed and "format: json" in printed
    assert read_records(DataSource(path=str(exported), format="json")) == GOOD_TRAIN


def test_c50_removed_embedded_key(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  embedded: quickstart\n")
    out = tmp_path / "out"
    rc, err = _cli(["-c", str(old), f"--attribution.output_dir={out}"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"error: .*'data'.*'embedded'", err), err
    assert_no_complete_output(out)


def test_c51_command_line_source_list_replaces_the_configs(tmp_path, capsys):
    """``-c configs/quickstart.yaml --data.train='[{path: ...}]'``: the file replaces the generated source (a
    list on the command line replaces the config's; jsonargparse alone would merge the two items)."""
    data = _jsonl(tmp_path / "mine.jsonl", GOOD_TRAIN)
    for args in ([f"--data.train=[{{path: {data}}}]"], ["--data.train", f"[{{path: {data}}}]"],
                 ["--data.train=null", f"--data.train=[{{path: {data}}}]"]):
        with pytest.raises(SystemExit):
            _cli([*args, "--print_config"], capsys)
        resolved = yaml.safe_load(capsys.readouterr().out)["data"]
        assert [(s["path"], s["generator"], s["format"]) for s in resolved["train"]] == [(str(data), None, "auto")], args
        assert [(s["generator"], s["split"]) for s in resolved["queries"]] == [("quickstart", "queries")]  # the config's, unchanged


# -- the catalogue itself ---------------------------------------------------------------------------------


def _catalogue_rows() -> list[tuple[str, str]]:
    rows = []
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(C\d\d)\s*\|.*\|\s*`?(tests/[\w/]+\.py::\w+(?:\[[^\]]*\])?)`?\s*\|\s*$", line)
        if match:
            rows.append((match.group(1), match.group(2)))
    return rows


def test_catalogue_rows_are_backed_by_tests():
    rows = _catalogue_rows()
    assert len(rows) >= 20 and len({r for r, _ in rows}) == len(rows)
    functions: dict[str, set[str]] = {}
    for row, ref in rows:
        path, name = ref.split("::")
        if path not in functions:
            tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
            functions[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name.split("[")[0] in functions[path], f"{row}: {ref} does not exist"
    here = {n for n in functions.get("tests/test_input_catalogue.py", set()) if re.match(r"test_c\d\d_", n)}
    referenced = {ref.split("::")[1] for _, ref in rows if ref.startswith("tests/test_input_catalogue.py")}
    assert here <= referenced, f"catalogue tests missing from the table: {sorted(here - referenced)}"
    for row, ref in rows:
        name = ref.split("::")[1]
        if ref.startswith("tests/test_input_catalogue.py"):
            assert name.startswith(f"test_{row.lower()}_"), f"{row} is backed by {name}"
