"""The ascent-loop benchmark's measurement: lockstep pairs, the statistics, equal scores (tiny, seconds)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ascent_loop as bench  # noqa: E402


def test_lockstep_and_sequential_designs_pair_every_steady_step_and_score_identically(tmp_path, monkeypatch):
    # the script's setup() silences warnings and loggers process-wide: not in the test process
    monkeypatch.setattr(bench, "setup", lambda threads: torch.manual_seed(0))
    bench.main(["--size", "tiny", "--groups", "2", "--group-size", "6", "--queries", "3", "--repeats", "2",
                "--out", str(tmp_path)])  # the engine as a user runs it: logger, progress bar, run directory
    saved = json.loads((tmp_path / "ascent_loop_tiny.json").read_text())
    assert saved["max_score_difference"] == 0.0  # the engine's table = the plain loop's, on both designs
    lock = saved["lockstep"]
    assert lock["paired_steps"] == 2 * 2 * (6 - 1)  # runs x targets x steps, each target's first step left out
    for run in lock["intervals_s"]:
        assert len(run["engine"]) == len(run["plain"]) == 10 and min(run["engine"] + run["plain"]) > 0
    assert lock["goal_verdict"] == bench.verdict([lock["engine_over_plain_ci95"], lock["engine_over_plain_steps_per_s_ci95"]], 0.85)
    assert len(saved["sequential"]["target_phase_s"]["engine"]) == 2


def test_lockstep_intervals_are_the_engine_cycle_and_the_plain_step():
    """Marks: engine end, plain end, engine end, ...; a target's first pair is left out."""
    class Marks:
        def __init__(self):
            self.t = [0.0, 5.0, 6.0, 15.0, 17.0, 30.0]  # engine ends at 0, 6, 17; plain ends at 5, 15, 30

        def mark(self):
            return None

        def seconds(self):
            return self.t

    lock = bench.LockstepPlain(plain=None, marks=Marks())
    lock.pairs = [(1, 2, 3), (3, 4, 5)]  # (previous plain end, engine end, plain end), as on_train_batch_end records them
    engine, plain = lock.intervals()
    assert engine == [1.0, 2.0] and plain == [9.0, 13.0]


def test_steady_intervals_leave_out_each_targets_first_step_and_check_the_count():
    times = [0.0, 1.0, 3.0, 10.0, 10.5, 11.5]  # two targets of 3 steps: 10.0 is the second target's first step end
    assert bench.steady_intervals(times, [3, 3]) == [1.0, 2.0, 0.5, 1.0]
    with pytest.raises(RuntimeError, match="6 step marks for 7 steps"):
        bench.steady_intervals(times, [3, 4])


def test_the_ratio_intervals_follow_the_pairs_and_the_verdict_needs_both():
    rng = np.random.default_rng(0)
    drift = np.repeat(rng.uniform(0.5, 2.0, 20), 10)  # the machine's speed, shared by neighbouring pairs
    engine, plain = list(drift * 1.0), list(drift * 0.9)  # the engine takes 1/0.9 of the plain loop's time
    ci = bench.ratio_intervals([(engine, plain), (engine[::-1], plain[::-1])])
    for low, high in ci.values():  # paired resampling keeps each pair's ratio: the drift cancels
        assert low == pytest.approx(0.9, abs=1e-9) and high == pytest.approx(0.9, abs=1e-9)
    # two runs at different ratios: the interval spans them (runs are resampled, not only steps)
    ci = bench.ratio_intervals([(engine, plain), (engine, list(drift * 1.1))])
    assert ci["mean"][0] < 0.95 and ci["mean"][1] > 1.05
    assert bench.ratios(np.array([1.0, 1.0, 10.0]), np.array([1.0, 1.0, 1.0])) == (1.0, 0.25)  # a periodic cost: mean sees it
    assert bench.verdict([(0.96, 1.02), (0.951, 1.0)], 0.95) == "met"
    assert bench.verdict([(0.96, 1.02), (0.94, 1.0)], 0.95) == "not resolved"
    assert bench.verdict([(0.8, 0.9), (0.85, 0.94)], 0.95) == "missed"
