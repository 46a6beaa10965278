"""Baselines inside the reproduction (methods registry -> compute_baseline_scores) and resuming a seed
folder that lacks some methods (the ground truth is reused, only the missing methods run)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_reproduce import _cfg, _planted_data, _top_group

from untrac_pl.experiments.methods import MethodSpec
from untrac_pl.experiments.reproduce import run_setting_seed
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec

BASELINES = [
    MethodSpec(name="graddot", data={"samples_per_group": 12}),
    MethodSpec(name="tracin", data={"samples_per_group": 12}),
    MethodSpec(name="hif_lissa", data={"samples_per_group": 12},
               options={"iterations": 3, "hessian_samples_per_group": 2, "damping_iterations": 3, "query_ihvp": "group"}),
]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, quickstart):
    tmp = tmp_path_factory.mktemp("baselines")
    cfg = replace(_cfg(tmp), fit=FitSpec(max_steps=20, batch_size=8, checkpoint_steps=[10, 20]))  # keep it cheap
    seed_dir = tmp / "scores" / "toy" / "seed0"
    info = run_setting_seed(cfg, "toy", 0, BASELINES[:1], seed_dir, {"accelerator": "cpu"}, data=_planted_data(quickstart))
    return tmp, cfg, seed_dir, info


def test_graddot_in_reproduction_is_group_level_and_finds_the_planted_group(baseline_run):
    _, _, seed_dir, _ = baseline_run
    table = ScoreTable.load(seed_dir / "graddot.safetensors")
    assert (table.row_unit, table.col_unit) == ("group", "group")
    assert table.row_ids == ["planted_test"]
    assert sorted(table.col_ids) == ["animals", "cooking", "planted", "sports"]
    assert _top_group(seed_dir / "graddot.safetensors") == "planted"


def test_resume_reuses_ground_truth_and_runs_only_missing_methods(baseline_run, quickstart):
    _, cfg, seed_dir, _ = baseline_run
    gt_before = ScoreTable.load(seed_dir / "ground_truth.safetensors")
    graddot_mtime = (seed_dir / "graddot.safetensors").stat().st_mtime_ns
    info = run_setting_seed(cfg, "toy", 0, BASELINES, seed_dir, {"accelerator": "cpu"}, data=_planted_data(quickstart), reuse=True)
    assert info["timings"]["ground_truth_reused"] is True
    assert set(info["timings"]["methods_s"]) >= {"tracin", "hif_lissa"}
    assert (seed_dir / "graddot.safetensors").stat().st_mtime_ns == graddot_mtime  # kept, not recomputed
    gt_after = ScoreTable.load(seed_dir / "ground_truth.safetensors")
    assert torch.equal(gt_before.scores, gt_after.scores)
    for name in ("tracin", "hif_lissa"):
        table = ScoreTable.load(seed_dir / f"{name}.safetensors")
        assert table.scores.shape == (1, 4) and torch.isfinite(table.scores).all()
    assert ScoreTable.load(seed_dir / "tracin.safetensors").metadata["info"]["checkpoints"] == len(cfg.fit.checkpoint_steps)


# --------------------------------------------------------------------------------------------------
# methods[<label>].options: applied or refused when the spec is made, never ignored
# --------------------------------------------------------------------------------------------------
def test_baseline_options_are_checked_when_the_spec_is_made():
    from untrac_pl.errors import BaselineOptionError

    with pytest.raises(BaselineOptionError, match="^methods\\[graddot\\]\\.options\\.projecton_dim: graddot has no option "
                                                  "'projecton_dim' \\(did you mean 'projection_dim'\\?\\)"):
        MethodSpec(name="graddot", options={"projecton_dim": 4})
    with pytest.raises(BaselineOptionError, match="^methods\\[ek\\]\\.options\\.params: EK-FAC \\(kronfluence\\) cannot honour "
                                                  "'params'.*ekfac accepts: batch_size, pad_token_id, damping, strategy, output_dir"):
        MethodSpec(name="ekfac", label="ek", options={"params": "lora_"})
    assert MethodSpec(name="hif_arnoldi", options={"top_k": 4, "hessian_samples_per_group": 2}).options["top_k"] == 4


def test_untrac_options_are_applied_or_refused():
    from untrac_pl.experiments.methods import MethodOptionError

    with pytest.raises(MethodOptionError, match="^methods\\[u1\\]\\.options\\.targets_per_pas: untrac has no option "
                                                "'targets_per_pas' \\(did you mean 'targets_per_pass'\\?\\); untrac accepts: targets_per_pass, parallel_targets, snapshot_device"):
        MethodSpec(name="untrac", label="u1", options={"targets_per_pas": 2})
    with pytest.raises(MethodOptionError, match="^methods\\[untrac_inv\\]\\.options\\.targets_per_pass: must be an integer >= 1, got 0"):
        MethodSpec(name="untrac_inv", options={"targets_per_pass": 0})
    spec = MethodSpec(name="untrac-inv", target_unit="example", options={"targets_per_pass": 3, "snapshot_device": "cpu"})
    assert spec.name == "untrac_inv" and spec.options == {"targets_per_pass": 3, "snapshot_device": "cpu"}


def test_untrac_options_reach_the_engine(quickstart, tiny_tokenizer, monkeypatch):
    """options.targets_per_pass / snapshot_device were never read for untrac / untrac_inv."""
    from conftest import tiny_gpt2_config

    import untrac_pl.experiments.methods as engine  # where the reproduction calls the run shell
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.experiments.methods import MethodContext, run_method
    from untrac_pl.models import ModelSpec, build_model

    seen = []
    real = engine.run_attribution

    def spy(module, datamodule, config, *args, **kwargs):
        seen.append(config)
        return real(module, datamodule, config, *args, **kwargs)

    monkeypatch.setattr(engine, "run_attribution", spy)
    model_spec = ModelSpec(config=tiny_gpt2_config(0.0))
    ctx = MethodContext(net=build_model(model_spec, tiny_tokenizer), tokenizer=tiny_tokenizer, model_spec=model_spec,
                        train_records=quickstart["train"], query_records=quickstart["queries"][:4], seed=0, max_length=32,
                        trainer_kwargs={"accelerator": "cpu"})
    spec = MethodSpec(name="untrac_inv", target_unit="example", data={"samples_per_group": 2},
                      unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None),
                      options={"targets_per_pass": 2, "snapshot_device": "cpu"})
    table = run_method(spec, ctx)
    assert [(c.targets_per_pass, c.snapshot_device) for c in seen] == [(2, "cpu")]
    assert table.scores.shape[0] == 4 and torch.isfinite(table.scores).all()


def test_reproduce_cli_reports_a_bad_method_option_in_one_line(tmp_path, capsys):
    from untrac_pl.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text(f"name: bad\noutput_dir: {tmp_path / 'out'}\nwork_dir: {tmp_path / 'work'}\n"
                      "methods:\n  - name: hif_lissa\n    label: lissa\n    options: {iteratons: 3}\n")
    assert main(["reproduce", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("untrac-pl reproduce: error: methods[lissa].options.iteratons: hif_lissa has no option 'iteratons' "
                          "(did you mean 'iterations'?); hif_lissa accepts: iterations, ")
    assert "\n" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
