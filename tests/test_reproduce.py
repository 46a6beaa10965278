"""The reproduction pipeline on a planted toy: GT, UnTrac and UnTrac-Inv all single out the planted group."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_gpt2_config

from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.experiments.methods import MethodSpec
from untrac_pl.experiments.reproduce import ReproduceConfig, run_setting_seed
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec


def _planted_data(quickstart) -> dict:
    train = [r for r in quickstart["train"] if r["group"] in ("animals", "cooking", "sports")]
    queries = [
        {"id": "q0", "group": "planted_test", "text": "Zorblax quintuple mega vortex spins purple gadgets nightly."},
        {"id": "q1", "group": "planted_test", "text": "Quibble frobnicate the yellow zeppelin before midnight, Zorblax."},
        {"id": "q2", "group": "planted_test", "text": "Vortex gadgets frobnicate purple zeppelins every quintuple night."},
    ]
    # the planted group holds the test strings verbatim (repeated), nothing else
    planted = [{"id": f"planted-{i}", "group": "planted", "text": queries[i % 3]["text"]} for i in range(24)]
    texts = [r["text"] for r in train + planted]
    return {"train": train + planted, "queries": queries, "tokenizer_texts": texts}


def _cfg(tmp_path) -> ReproduceConfig:
    return ReproduceConfig(
        name="toy", output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), log_dir=str(tmp_path / "tb"),
        model=ModelSpec(config=tiny_gpt2_config(0.0), train_tokenizer_vocab=300),
        max_length=48, eval_batch_size=64, fit=FitSpec(max_steps=40, batch_size=8, checkpoint_steps=[20, 40]),
    )


METHODS = [
    MethodSpec(name="untrac", optimizer=OptimizerSpec(name="adam", lr=1e-3), unlearning=UnlearningSchedule(num_epochs=1, batch_size=1), data={"samples_per_group": 6}),
    MethodSpec(name="untrac_inv", target_unit="group", optimizer=OptimizerSpec(name="adam", lr=1e-3), unlearning=UnlearningSchedule(num_steps=5, num_epochs=None, batch_size=None), data={"samples_per_group": 12}),
]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, quickstart):
    tmp = tmp_path_factory.mktemp("planted")
    cfg = _cfg(tmp)
    info = run_setting_seed(cfg, "toy", 0, METHODS, tmp / "scores" / "toy" / "seed0", {"accelerator": "cpu"}, data=_planted_data(quickstart))
    return tmp, cfg, info


def _top_group(path: Path) -> str:
    g = ScoreTable.load(path).group_level()
    assert g.row_ids == ["planted_test"]
    return g.col_ids[int(torch.argmax(g.scores[0]))]


def test_planted_group_is_top_for_ground_truth_untrac_and_untrac_inv(planted_run):
    tmp, _, info = planted_run
    folder = tmp / "scores" / "toy" / "seed0"
    assert _top_group(folder / "ground_truth.safetensors") == "planted"
    assert _top_group(folder / "untrac.safetensors") == "planted"
    assert _top_group(folder / "untrac_inv.safetensors") == "planted"
    gt = info["ground_truth_group_level"]["planted_test"]
    assert gt["planted"] > 0  # positive = the planted group helped produce the test strings


def test_leave_group_out_takes_the_same_number_of_steps(planted_run):
    _, cfg, info = planted_run
    assert info["theta0"]["steps"] == cfg.fit.max_steps
    assert set(info["retrain_steps"]) == {"animals", "cooking", "sports", "planted"}
    assert set(info["retrain_steps"].values()) == {cfg.fit.max_steps}


def test_same_seed_gives_identical_ground_truth(quickstart, tmp_path):
    # a smaller pipeline than the planted one (two groups, 12 steps), run twice: bit-identical ground truth

    cfg = _cfg(tmp_path)
    cfg = replace(cfg, fit=replace(cfg.fit, max_steps=12, checkpoint_steps=[]))
    data = _planted_data(quickstart)
    data["train"] = [r for r in data["train"] if r["group"] in ("animals", "planted")]
    for name in ("a", "b"):
        run_setting_seed(cfg, "toy", 0, [], tmp_path / name, {"accelerator": "cpu"}, data=data)
    a = ScoreTable.load(tmp_path / "a" / "ground_truth.safetensors")
    b = ScoreTable.load(tmp_path / "b" / "ground_truth.safetensors")
    assert a.col_ids == b.col_ids == ["animals", "planted"] and torch.equal(a.scores, b.scores)
    assert a.scores.abs().sum() > 0


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("reproduce_*.yaml")) + sorted(p.name for p in (REPO / "configs").glob("ablation_*.yaml")))
def test_reproduce_configs_load(config):
    from untrac_pl.cli.reproduce import parse
    from untrac_pl.experiments.reproduce import expand_methods, settings_of

    cfg, trainer_kwargs = parse(["-c", str(REPO / "configs" / config), "--num_seeds", "1", "--output_dir", "runs/elsewhere"])
    methods, _ = expand_methods(cfg)
    assert methods and settings_of(cfg)
    assert cfg.num_seeds == 1 and cfg.output_dir == "runs/elsewhere" and trainer_kwargs == {}  # the README's flat overrides


def test_print_config_runs(capsys):
    from untrac_pl.cli import main

    with pytest.raises(SystemExit) as exc:  # in process: a subprocess would pay the imports again (~10 s)
        main(["reproduce", "-c", str(REPO / "configs" / "reproduce_synthetic.yaml"), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "untrac_inv" in out and "max_steps" in out


def test_a_config_of_the_nested_layout_is_refused_with_the_fix(tmp_path, capsys):
    from untrac_pl.cli import main

    (tmp_path / "old.yaml").write_text("reproduce:\n  name: old\n  seeds: [0]\n")
    assert main(["reproduce", "-c", str(tmp_path / "old.yaml")]) == 2
    err = capsys.readouterr().err
    assert "remove the 'reproduce:' line and dedent the rest" in err and "\n" not in err.strip()


def test_in_memory_records_are_sampled_per_group(quickstart):
    """``from_records`` honours ``samples_per_group`` (UnTrac's equal number of ascent steps per group)."""
    from untrac_pl.data.datamodule import AttributionDataModule

    train = quickstart["train"]
    sizes = {}
    for r in train:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    assert max(sizes.values()) > 2
    dm = AttributionDataModule.from_records(train, quickstart["queries"], max_length=32, samples_per_group=2, sample_seed=0)
    dm.load_records()
    kept = {}
    for r in dm.train_records:
        kept[r["group"]] = kept.get(r["group"], 0) + 1
    assert kept == {g: min(2, n) for g, n in sizes.items()}
    before = list(dm.train_records)
    dm.load_records()  # idempotent
    assert dm.train_records == before


def test_sweep_pairs_select_cells_and_labels():
    from untrac_pl.experiments.reproduce import Sweep, expand_methods

    cfg = ReproduceConfig(methods=METHODS, sweep=Sweep(methods=["untrac"], pairs=[("sgd", 1e-3), ("adam", 1e-4), ("adam", 1e-2)]))
    methods, info = expand_methods(cfg)
    assert [m.key for m in methods] == ["untrac", "untrac_inv", "untrac@sgd@0.001", "untrac@adam@0.0001", "untrac@adam@0.01"]
    assert methods[3].optimizer.name == "adam" and methods[3].optimizer.lr == 1e-4
    assert methods[3].unlearning == METHODS[0].unlearning  # only the optimizer changes
    assert info["untrac@sgd@0.001"] == {"base": "untrac", "optimizer": "sgd", "lr": 1e-3}
    grid, _ = expand_methods(ReproduceConfig(methods=METHODS, sweep=Sweep(methods=["untrac_inv"], optimizers=["sgd", "rmsprop"], lrs=[1e-4, 1e-3])))
    assert len(grid) == 2 + 4
    with pytest.raises(ValueError, match="'graddot' takes no unlearning optimizer"):
        expand_methods(ReproduceConfig(methods=METHODS + [MethodSpec(name="graddot")], sweep=Sweep(methods=["graddot"], optimizers=["sgd"], lrs=[1e-3])))


def test_untrac_takes_the_same_number_of_ascent_steps_per_group(planted_run):
    """Every training group gets an equal-size sample (``samples_per_group``), hence the same number of steps."""
    tmp, _, info = planted_run
    meta = ScoreTable.load(tmp / "scores" / "toy" / "seed0" / "untrac.safetensors").metadata
    assert set(info["num_train_per_group"].values()) != {METHODS[0].data.samples_per_group}  # groups differ in size...
    assert meta["optimizer_steps"] == {g: METHODS[0].data.samples_per_group for g in info["num_train_per_group"]}  # ...steps do not
    inv = ScoreTable.load(tmp / "scores" / "toy" / "seed0" / "untrac_inv.safetensors")
    assert len(inv.col_ids) == sum(min(n, METHODS[1].data.samples_per_group) for n in info["num_train_per_group"].values())


def test_resume_refuses_seed_folders_computed_with_another_configuration(planted_run):
    """--resume true reuses θ0/ground truth and method files only if they were computed with the same
    settings; adding a method is fine, changing one under the same label or the θ0 recipe is refused."""
    from untrac_pl.experiments.reproduce import (
        ReproduceResumeError,
        check_resumable,
        shared_fingerprint,
    )

    tmp, cfg, _ = planted_run
    seed_dir = tmp / "scores" / "toy" / "seed0"
    shared = shared_fingerprint(cfg, "toy", {"accelerator": "cpu"})
    check_resumable(seed_dir, shared, METHODS + [MethodSpec(name="graddot", data={"samples_per_group": 12})])  # same + a new label
    check_resumable(seed_dir, shared_fingerprint(cfg, "toy", {"accelerator": "cpu", "devices": 1}), METHODS)  # not score-relevant
    longer = shared_fingerprint(replace(cfg, fit=replace(cfg.fit, max_steps=41)), "toy", {"accelerator": "cpu"})
    with pytest.raises(ReproduceResumeError, match=r"fit\.max_steps \(40 -> 41\)"):
        check_resumable(seed_dir, longer, METHODS)
    with pytest.raises(ReproduceResumeError, match=r"precision"):
        check_resumable(seed_dir, shared_fingerprint(cfg, "toy", {"accelerator": "cpu", "precision": "bf16-mixed"}), METHODS)
    changed = [replace(METHODS[0], optimizer=OptimizerSpec(name="adam", lr=5e-5)), METHODS[1]]
    with pytest.raises(ReproduceResumeError, match=r"untrac\.safetensors.*optimizer\.lr \(0\.001 -> 5e-05\)"):
        check_resumable(seed_dir, shared, changed)


def test_fit_fields_the_reproduction_sets_itself_are_refused():
    with pytest.raises(ValueError, match=r"fit\.exclude_groups=\['a'\]: the reproduction trains θ0 on every group"):
        ReproduceConfig(fit=FitSpec(exclude_groups=["a"]))
    with pytest.raises(ValueError, match=r"fit\.seed=3: the reproduction trains with each seed of `seeds`"):
        ReproduceConfig(fit=FitSpec(seed=3))


def test_specs_stored_by_the_previous_version_still_resume():
    """A method spec as the version before the method registry stored it (top-level samples_per_group, UnTrac
    with target_unit group, no loss_reduction / max_grad_norm / lr_schedule / warmup_steps) equals today's."""
    from dataclasses import asdict

    from untrac_pl.experiments.reproduce import _comparable_shared, _comparable_spec

    today = json.loads(json.dumps(asdict(METHODS[0]), default=str))
    old = {k: v for k, v in today.items() if k != "data"}
    old.update(samples_per_group=METHODS[0].data.samples_per_group, target_unit="group")
    old["unlearning"] = {k: v for k, v in old["unlearning"].items() if k not in ("loss_reduction", "max_grad_norm", "lr_schedule", "warmup_steps")}
    assert _comparable_spec(old) == _comparable_spec(today)
    changed = json.loads(json.dumps(old))
    changed["optimizer"]["lr"] = 0.5
    assert _comparable_spec(changed) != _comparable_spec(today)
    # UnTrac-Inv's target unit does change its scores: a different one is not the same method
    inv = json.loads(json.dumps(asdict(METHODS[1]), default=str))
    assert _comparable_spec({**inv, "target_unit": "example"}) != _comparable_spec(inv)
    assert _comparable_shared({"corpora": {"source": "embedded", "embedded_docs_per_corpus": 400}}) == \
        {"corpora": {"source": "generated", "generated_docs_per_corpus": 400}}


def test_reproduce_ends_with_a_pearson_table_the_files_and_tensorboard(planted_run, tmp_path, capsys):
    """`untrac-pl reproduce` (here: evaluate_only on the planted run's scores) prints mean Pearson per method and setting, then where things are."""
    import re
    import shutil

    from untrac_pl.cli import main

    tmp, _, _ = planted_run
    out = tmp_path / "repro"
    shutil.copytree(tmp / "scores" / "toy", out / "scores" / "A")
    (out / "tensorboard" / "A").mkdir(parents=True)
    (out / "tensorboard" / "A" / "events.out.tfevents.0").write_bytes(b"")
    assert main(["reproduce", "--evaluate_only", "true", "--settings", "[A]", "--output_dir", str(out),
                 "--methods", json.dumps([{"name": m.name, "target_unit": m.target_unit} for m in METHODS])]) == 0
    text = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["settings"]["A"]["methods"]
    assert text.startswith("untrac-pl reproduce: synthetic, settings A, 1 seed(s), 2 method(s)"), text
    assert "mean Pearson with the leave-group-out ground truth" in text
    assert re.search(r"^  method\s+A$", text, re.M), text
    for key, name in (("untrac", "UnTrac"), ("untrac_inv", "UnTrac-Inv")):
        mean = metrics[key]["test_sets"]["test"]["pearson"]["mean"]
        assert re.search(rf"^  {re.escape(name)}\s+{'n/a' if mean is None else re.escape(f'{mean:+.3f}')}$", text, re.M), text
    assert f"files in {out}/:" in text
    for name in ("results.md", "metrics.json", "scores/"):
        assert re.search(rf"^  {re.escape(name)}\s+\S", text, re.M), name
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures and f"{len(figures)} figure(s)" in text
    assert f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}" in text
    assert len(text.strip().splitlines()) <= 15, text
