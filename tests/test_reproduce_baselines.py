"""Baselines inside the reproduction (methods registry -> compute_baseline_scores) and resuming a seed
folder that lacks some methods (the ground truth is reused, only the missing methods run)."""
from __future__ import annotations

import pytest
import torch

from dataclasses import replace

from untrac_pl.experiments.methods import MethodSpec
from untrac_pl.experiments.reproduce import run_setting_seed
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec

from test_reproduce import _cfg, _planted_data, _top_group

BASELINES = [
    MethodSpec(name="graddot", samples_per_group=12),
    MethodSpec(name="tracin", samples_per_group=12),
    MethodSpec(name="hif_lissa", samples_per_group=12,
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
