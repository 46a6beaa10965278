"""Baselines behind `untrac-pl attribute`: same score files as UnTrac, scores equal to compute_baseline_scores."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from conftest import REPO

from untrac_pl.cli import main
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.records import DataSource
from untrac_pl.engine import AttributionConfig
from untrac_pl.methods import compute_baseline_scores
from untrac_pl.models import ModelSpec, load_model_and_tokenizer
from untrac_pl.scores import ScoreTable

CONFIG = REPO / "configs" / "quickstart_graddot.yaml"


@pytest.fixture(scope="module")
def graddot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("graddot") / "run"
    code = main(["attribute", "-c", str(CONFIG), f"--attribution.output_dir={out}", "--trainer.enable_progress_bar=false"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def direct(graddot_run):
    """The same model and data built by hand, scored by compute_baseline_scores directly."""
    cfg = yaml.safe_load(CONFIG.read_text())
    dm = AttributionDataModule(train=[DataSource(**s) for s in cfg["data"]["train"]],
                               queries=[DataSource(**s) for s in cfg["data"]["queries"]], max_length=cfg["data"]["max_length"])
    dm.load_records()
    spec = ModelSpec(**cfg["model"]["model"], attn_implementation="eager")
    net, tokenizer = load_model_and_tokenizer(spec, dm.all_texts())
    dm.tokenize(tokenizer)
    train, queries = dm.train_corpus, dm.query_corpus
    out = compute_baseline_scores(
        "graddot", net, train.examples, queries.examples,
        train_groups=[r["group"] for r in train.records], query_groups=[r["group"] for r in queries.records],
        batch_size=16, pad_token_id=tokenizer.pad_token_id,
    )
    return out, train, queries


def test_cli_scores_equal_compute_baseline_scores(graddot_run, direct):
    out, train, queries = direct
    table = ScoreTable.load(graddot_run / "scores.safetensors")
    assert table.method == "graddot"
    assert (table.row_unit, table.col_unit) == ("example", "example")
    assert table.row_ids == list(queries.ids) and table.col_ids == list(train.ids)  # query-major
    assert table.col_groups == [r["group"] for r in train.records]
    assert table.scores.shape == out["example_scores"].shape
    torch.testing.assert_close(table.scores, out["example_scores"], rtol=1e-4, atol=1e-6)
    for name in ("rankings.json", "group_scores.csv", "group_scores.md", "summary.json", "memory.json", "config.yaml"):
        assert (graddot_run / name).exists(), name
    summary = json.loads((graddot_run / "summary.json").read_text())
    assert summary["completed"] and summary["method"] == "graddot" and summary["num_failed"] == 0
    assert summary["model"]["attn_implementation"] == "eager"  # set automatically for vmap
    assert "baseline" in json.loads((graddot_run / "memory.json").read_text())


def test_duplicate_query_ranks_its_training_copy_first(graddot_run, direct):
    _, train, queries = direct
    dup = queries.records[-1]
    copy_id = next(r["id"] for r in train.records if r["text"] == dup["text"])
    rankings = json.loads((graddot_run / "rankings.json").read_text())
    entry = next(q for q in rankings["queries"] if q["query_id"] == dup["id"])
    assert entry["top"][0]["id"] == copy_id
    assert entry["top"][0]["score"] > entry["top"][1]["score"]


def test_group_scores_are_consistent(graddot_run, direct):
    out, _, _ = direct
    table = ScoreTable.load(graddot_run / "scores.safetensors").group_level()
    with open(graddot_run / "group_scores.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == table.col_ids
    # the csv lists the query groups that are also training groups first, in the column order
    shared = [g for g in table.col_ids if g in table.row_ids]
    assert [row[0] for row in rows[1:]] == shared + [g for g in table.row_ids if g not in shared]
    from_csv = torch.tensor([[float(v) for v in row[1:]] for row in rows[1:]])
    order = [table.row_ids.index(row[0]) for row in rows[1:]]
    torch.testing.assert_close(from_csv, table.scores[order], rtol=1e-4, atol=1e-6)
    # GradDot is bilinear: mean of example scores = score of the mean (group) gradients
    assert table.row_ids == [str(g) for g in out["query_groups"]] and table.col_ids == [str(g) for g in out["train_groups"]]
    torch.testing.assert_close(table.scores, out["group_scores"], rtol=1e-3, atol=1e-5)
    native = ScoreTable.load(graddot_run / "baseline_group_scores.safetensors")
    torch.testing.assert_close(native.scores, out["group_scores"], rtol=1e-4, atol=1e-6)


def test_unknown_method_errors_clearly(tmp_path, capsys):
    code = main(["attribute", "-c", str(CONFIG), "--attribution.method=gradfoo", f"--attribution.output_dir={tmp_path / 'x'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "gradfoo" in err and "method" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="unknown; choose one of .*graddot"):
        AttributionConfig(method="gradfoo")


def test_tracin_without_checkpoints_errors(tmp_path, capsys):
    code = main(["attribute", "-c", str(CONFIG), "--attribution.method=tracin", f"--attribution.output_dir={tmp_path / 'y'}",
                 "--trainer.enable_progress_bar=false"])
    assert code == 2
    assert "checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.partial").exists()


@pytest.mark.parametrize("method, option, expected", [
    ("graddot", "projecton_dim", "attribution.baseline.projecton_dim: graddot has no option 'projecton_dim' (did you mean 'projection_dim'?); graddot accepts: params, projection_dim"),
    ("ekfac", "hessian_samples_per_group", "attribution.baseline.hessian_samples_per_group: EK-FAC (kronfluence) cannot honour 'hessian_samples_per_group' (an option of hif_lissa, hif_arnoldi); ekfac accepts: batch_size, pad_token_id, damping, strategy, output_dir"),
])
def test_baseline_option_errors_in_one_line_before_any_work(tmp_path, capsys, method, option, expected):
    """A typo (or another method's option) used to reach _Setup as a TypeError traceback (or be ignored by EK-FAC)."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["attribution"].update(method=method, output_dir=str(tmp_path / "z"))
    cfg["attribution"]["baseline"][option] = 4  # params: null / projection_dim: null stay: null is the default
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["attribute", "-c", str(path), "--trainer.enable_progress_bar=false"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"untrac-pl attribute: error: {expected}")
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "z").exists() and not (tmp_path / "z.partial").exists()


def test_baseline_options_with_an_unlearning_method_are_refused(tiny_spec, quickstart):
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.errors import BaselineOptionError
    from untrac_pl.unlearning import UnTracModule

    dm = AttributionDataModule.from_records(quickstart["train"][:4], quickstart["queries"][:1], max_length=32)
    config = AttributionConfig(method="untrac_inv", baseline={"damping": 0.1, "params": None})
    with pytest.raises(BaselineOptionError, match=r"attribution\.baseline\.damping: baseline options do nothing for method untrac_inv"):
        run_attribution(UnTracModule(model=tiny_spec()), dm, config, {"accelerator": "cpu"}, write=False)
