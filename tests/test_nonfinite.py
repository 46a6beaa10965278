"""Non-finite guard: diverging ascent and NaN scores mark the target failed (with its step), the run
goes on from θ0 with the next target, the summary counts failures, the CLI exits 1; ``max_loss``."""
from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


def _records(quickstart, n_queries=3):
    train = [r for g in ("animals", "cooking", "sports") for r in [x for x in quickstart["train"] if x["group"] == g][:2]]
    return train, quickstart["queries"][:n_queries]


def _run(spec, train, queries, out=None, *, optimizer=None, schedule=None, trainer=None):
    module = UnTracModule(model=spec, optimizer=optimizer or OptimizerSpec(lr=1e-3),
                          unlearning=schedule or UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(train, queries, max_length=40, eval_batch_size=8)
    config = AttributionConfig(output_dir=str(out) if out else "unused", overwrite=True)
    return run_attribution(module, dm, config, {**CPU, **(trainer or {})}, write=out is not None)


def test_diverging_learning_rate_fails_every_target_and_the_cli_exits_1(tmp_path, quickstart, capsys):
    """SGD with lr 1e6 on gradient ascent: the loss turns NaN/inf within 3 steps for every query."""
    from untrac_pl.cli import main

    train, queries = _records(quickstart)
    for name, records in (("train", train), ("queries", queries)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""\
attribution: {{output_dir: {tmp_path / 'out'}}}
model:
  model: {{config: {{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}}, train_tokenizer_vocab: 300}}
  optimizer: {{name: sgd, lr: 1.0e6}}
  unlearning: {{num_steps: 3, num_epochs: null, batch_size: null}}
data: {{train: [{{path: {tmp_path / 'train.jsonl'}}}], queries: [{{path: {tmp_path / 'queries.jsonl'}}}], max_length: 40}}
trainer: {{accelerator: cpu, devices: 1, logger: false, enable_progress_bar: false}}
""")
    assert main(["attribute", "-c", str(cfg)]) == 1  # finished, but with failed targets
    assert "3 failed targets" in capsys.readouterr().out
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_failed"] == 3 and summary["num_succeeded"] == 0 and summary["completed"]
    assert list(summary["failed_targets"]) == [q["id"] for q in queries]  # every target was tried, in order
    for info in summary["failed_targets"].values():
        assert "non-finite" in info["reason"] and isinstance(info["step"], int) and 0 <= info["step"] <= 3
    assert summary["optimizer_steps"] == {q: info["step"] for q, info in summary["failed_targets"].items()}
    rankings = json.loads((out / "rankings.json").read_text())
    assert all(q["failed"] and q["top"] == [] for q in rankings["queries"])
    from untrac_pl.scores import ScoreTable

    table = ScoreTable.load(out / "scores.safetensors")
    assert torch.isnan(table.scores).all() and set(table.metadata["failed_targets"]) == {q["id"] for q in queries}


class PoisonAfterAscent(Callback):
    """Sets one weight to NaN when target ``victim``'s ascent ends: its scores become NaN."""

    def __init__(self, victim: str):
        self.victim = victim

    def on_train_end(self, trainer, pl_module):
        if pl_module.target.id == self.victim:
            with torch.no_grad():
                pl_module.net.transformer.wte.weight[0, 0] = math.nan


def test_nan_scores_fail_one_target_and_the_next_starts_from_theta0(tmp_path, tiny_spec, quickstart):
    train, _ = _records(quickstart)
    queries = [quickstart["queries"][i] for i in (0, 4, 1)]  # the victim shares its group with query 0
    victim = queries[1]["id"]
    one_step = UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None)
    clean = _run(tiny_spec(), train, queries, schedule=one_step)
    result = _run(tiny_spec(), train, queries, tmp_path / "out", schedule=one_step, trainer={"callbacks": [PoisonAfterAscent(victim)]})
    assert result.failed == {victim: {"reason": "non-finite or missing scores after unlearning", "step": 1}}
    scores = result.table.scores
    assert torch.isnan(scores[1]).all()
    # the other targets (before AND after the failure) are exactly those of a clean run
    assert torch.equal(scores[[0, 2]], clean.table.scores[[0, 2]])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_failed"] == 1 and summary["num_succeeded"] == 2
    # group level: the failed query is left out of its own group's mean and nowhere else
    group = result.table.group_level()
    assert torch.isfinite(group.scores).all()
    victim_group = queries[1]["group"]
    kept = [i for i, q in enumerate(queries) if q["id"] != victim]
    t = result.table
    without_victim = ScoreTable(t.scores[kept], [t.row_ids[i] for i in kept], [t.row_groups[i] for i in kept], t.col_ids, t.col_groups, t.row_unit, t.col_unit, t.method).group_level()
    for name in without_victim.row_ids:  # every group mean is what it would be without the failed query
        assert torch.allclose(group.scores[group.row_ids.index(name)], without_victim.scores[without_victim.row_ids.index(name)], atol=1e-7, rtol=0)
    rankings = json.loads((tmp_path / "out" / "rankings.json").read_text())
    by_group = {g["query_group"]: g for g in rankings["query_groups"]}
    assert by_group[victim_group]["excluded_failed"] == [victim] and by_group[victim_group]["top"]
    assert all("excluded_failed" not in g for name, g in by_group.items() if name != victim_group)
    assert "nan" not in (tmp_path / "out" / "group_scores.csv").read_text()


def test_a_failed_untrac_group_is_a_nan_column_named_in_every_query_entry(tmp_path, tiny_spec, quickstart):
    """UnTrac: targets are training groups, so a failed target is a column; it must not poison the
    query-group means and each query's ranking says which group is missing."""
    train, queries = _records(quickstart)
    module = UnTracModule(model=tiny_spec(), optimizer=OptimizerSpec(lr=1e-3), unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(train, queries, max_length=40, eval_batch_size=8)
    config = AttributionConfig(method="untrac", output_dir=str(tmp_path / "out"), overwrite=True)
    result = run_attribution(module, dm, config, {**CPU, "callbacks": [PoisonAfterAscent("cooking")]}, write=True)
    assert list(result.failed) == ["cooking"]
    column = result.table.col_ids.index("cooking")
    assert torch.isnan(result.table.scores[:, column]).all()
    assert torch.isfinite(torch.cat([result.table.scores[:, :column], result.table.scores[:, column + 1 :]], 1)).all()
    group = result.table.group_level()
    assert torch.isnan(group.scores[:, column]).all() and torch.isfinite(group.scores[:, [c for c in range(group.scores.shape[1]) if c != column]]).all()
    rankings = json.loads((tmp_path / "out" / "rankings.json").read_text())
    for entry in rankings["queries"] + rankings["query_groups"]:
        assert entry["excluded_failed"] == ["cooking"] and entry.get("failed", False) is False
        assert entry["top"] and all(item["id"] != "cooking" for item in entry["top"])


def test_max_loss_stops_the_ascent_early(tiny_spec, quickstart, tmp_path):
    train, queries = _records(quickstart, n_queries=2)
    # every per-example NLL of a random tiny model is ~log(300) ≈ 5.7 > 1: stop after the first step
    result = _run(tiny_spec(), train, queries, tmp_path / "out", schedule=UnlearningSchedule(num_steps=4, num_epochs=None, batch_size=None, max_loss=1.0))
    assert result.failed == {}
    assert result.table.metadata["optimizer_steps"] == {q["id"]: 1 for q in queries}
    assert torch.isfinite(result.table.scores).all()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stopped_early"] == [q["id"] for q in queries]


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_max_loss_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="max_loss must be a finite number > 0"):
        UnlearningSchedule(max_loss=value)


class _NaNAtStep(UnTracModule):
    """The ascent loss turns NaN from optimizer step ``bad`` on; the guard is read every ``every`` steps
    (as on an accelerator, where reading it per step would stall the device)."""

    def __init__(self, *args, bad: int, every: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.every, self.steps_run = bad, every, []

    def finite_check_every(self, device):
        return self.every

    def _ascent_loss(self, batch):
        loss = super()._ascent_loss(batch)
        self.steps_run.append(self.trainer.global_step)
        return loss * float("nan") if self.trainer.global_step >= self.bad else loss


@pytest.mark.parametrize("bad, every, steps, ran", [(2, 4, 6, 4), (1, 32, 3, 3), (1, 1, 3, 2)])
def test_a_deferred_guard_still_names_the_first_non_finite_step(tiny_spec, quickstart, bad, every, steps, ran):
    """Read every 4 steps: the NaN of step 2 is found at step 3 and reported as step 2; read every 32 steps
    over a 3-step target: found at the target's end; read every step: the ascent stops at once."""
    train, queries = _records(quickstart, n_queries=1)
    module = _NaNAtStep(model=tiny_spec(), optimizer=OptimizerSpec(lr=1e-3), bad=bad, every=every,
                        unlearning=UnlearningSchedule(num_steps=steps, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(train, queries, max_length=40, eval_batch_size=8)
    result = run_attribution(module, dm, AttributionConfig(output_dir="unused", overwrite=True), CPU, write=False)
    assert {q: info["step"] for q, info in result.failed.items()} == {queries[0]["id"]: bad}
    assert module.steps_run == list(range(ran))
