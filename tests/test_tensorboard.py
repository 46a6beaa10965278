"""TensorBoard of an attribute run (untrac_pl.board): one event file, the expected tags, HParams with a
real metric, the query texts in the Text tab, baselines logging too, and no step twice after a
SIGKILL-and-resume."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

CONFIG = """\
seed_everything: 0
attribution: {{method: {method}, target_unit: example, output_dir: {out}, top_k: 3, seed: 0}}
model:
  model:
    config: {{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64, resid_pdrop: 0.1, embd_pdrop: 0.1, attn_pdrop: 0.1}}
    train_tokenizer_vocab: 300
  optimizer: {{name: adam, lr: 0.001}}
  unlearning: {{num_steps: 2, num_epochs: null, batch_size: {batch_size}}}
data:
  train: [{{path: {train}}}]
  queries: [{{path: {queries}}}]
  max_length: 48
  eval_batch_size: 8
trainer: {{accelerator: cpu, devices: 1, enable_progress_bar: false, log_every_n_steps: 1}}
"""
GROUPS = ("animals", "cooking", "sports", "insults")


@pytest.fixture(scope="module")
def data(tmp_path_factory, quickstart):
    root = tmp_path_factory.mktemp("tb-data")
    train = [r for g in GROUPS for r in [x for x in quickstart["train"] if x["group"] == g][:2]]
    queries = quickstart["queries"][:4]
    for name, records in (("train.jsonl", train), ("queries.jsonl", queries)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root, queries


def _config(data, tmp_path: Path, method: str, out: Path, batch_size="null") -> Path:
    root, _ = data
    cfg = tmp_path / f"{method}-{out.name}.yaml"
    cfg.write_text(CONFIG.format(method=method, out=out, batch_size=batch_size, train=root / "train.jsonl", queries=root / "queries.jsonl"))
    return cfg


def _attribute(cfg: Path, *extra: str) -> None:
    from untrac_pl.cli import main

    assert main(["attribute", "-c", str(cfg), *extra]) == 0


def _event_files(run: Path) -> list[Path]:
    return sorted((run / "tensorboard").rglob("events.out.tfevents*"))


def _accumulator(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _texts(acc: EventAccumulator) -> dict[str, str]:
    return {tag.split("/text_summary")[0]: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
            for tag in acc.Tags()["tensors"] if tag.endswith("/text_summary")}


def _hparams(run: Path) -> tuple[dict, list[str], list[str]]:
    """The HParams session's values, the experiment's metric names and its headline (listed and
    ticked first), read from the event file."""
    values, metrics, headline = {}, [], []
    for path in _event_files(run):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    for key, v in data.session_start_info.hparams.items():
                        values[key] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                if data.HasField("experiment"):
                    metrics += [m.name.tag for m in data.experiment.metric_infos]
                    headline += [h.name for h in data.experiment.hparam_infos if h.differs]
    return values, metrics, headline


def _steps_written(run: Path) -> collections.Counter:
    """How often each (tag, step) was written, over every event file of the run."""
    counts = collections.Counter()
    for path in _event_files(run):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                counts[(value.tag, event.step)] += 1
    return counts


@pytest.mark.parametrize("method", ["untrac_inv", "untrac", "graddot"])
def test_attribute_writes_one_event_file_with_charts_texts_and_hparams(tmp_path, data, method):
    out = tmp_path / "run"
    _attribute(_config(data, tmp_path, method, out, batch_size="null" if method != "untrac" else 1))
    assert len(_event_files(out)) == 1  # one per run, not one per Trainer
    acc = _accumulator(out)
    tags = acc.Tags()
    scalars, histograms = set(tags["scalars"]), set(tags["histograms"])
    # the target's mean score per group of the scored side (UnTrac: the queries; else the training data)
    eval_groups = {r["group"] for r in data[1]} if method == "untrac" else set(GROUPS)
    assert {f"target/group_score/{g}" for g in eval_groups} <= scalars
    assert {"metrics/mean_top1_margin", "metrics/failed_targets"} <= scalars
    assert "hp_metric" not in scalars and not any(t.startswith("ascent_loss/") for t in scalars)  # no card per target
    assert {"scores/all"} | {f"scores_by_group/{r['group']}" for r in data[1]} <= histograms
    assert any(t.startswith("memory/") for t in scalars)
    if method == "graddot":
        assert "unlearning/ascent_loss" not in scalars
    else:
        assert {"unlearning/ascent_loss", "target/own_loss_first", "target/own_loss_last", "target/optimizer_steps"} <= scalars
        num_targets = len(data[1]) if method == "untrac_inv" else len(GROUPS)
        assert [e.step for e in acc.Scalars("target/optimizer_steps")] == list(range(num_targets))
        steps = [e.step for e in acc.Scalars("unlearning/ascent_loss")]
        assert steps == sorted(set(steps)) and len(steps) == sum(e.value for e in acc.Scalars("target/optimizer_steps"))
    # one histogram step per training group: the Distributions tab has something to show
    assert [e.step for e in acc.Histograms(f"scores_by_group/{data[1][0]['group']}")] == list(range(len(GROUPS)))
    assert "custom_scalars__config__" in tags["tensors"]
    texts = _texts(acc)
    assert {"run/summary", "rankings/group_scores", "rankings/queries", "rankings/top_k"} <= set(texts)
    query_text = " ".join(data[1][0]["text"].split()) if "text" in data[1][0] else None
    if query_text:
        assert query_text in texts["rankings/queries"] and query_text in texts["rankings/top_k"]
    assert "query group" in texts["rankings/group_scores"]

    values, metrics, headline = _hparams(out)
    assert headline == ["method", "target_unit", "optimizer", "lr", "steps"]  # the same columns for every method
    assert values["method"] == method and values["target_unit"] == ("group" if method == "untrac" else "example")
    assert values["data.train"].endswith("train.jsonl") and values["data.train_examples"] == 8
    assert "_instantiator" not in " ".join(values) and not any("pdrop" in k for k in values)
    if method != "graddot":
        assert values["optimizer"] == "adam" and values["lr"] == pytest.approx(1e-3) and values["unlearning.num_steps"] == 2
        assert values["steps"] == 2
    else:
        assert "lr" not in values and "optimizer" not in values  # not a graddot setting: an empty cell
    assert "metrics/mean_top1_margin" in metrics and "hp_metric" not in metrics
    margin = acc.Scalars("metrics/mean_top1_margin")[0].value
    assert margin != -1 and margin >= 0 and torch.isfinite(torch.tensor(margin))


def test_sigkill_mid_target_then_resume_writes_every_step_once(tmp_path, data):
    """Killed in the middle of the third of four targets (after one of its two ascent steps), then the
    same command again: the run has one event file, no (tag, step) twice, and the same series as an
    uninterrupted run."""
    out = tmp_path / "out"
    cfg = _config(data, tmp_path, "untrac_inv", out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    kill = '[{"class_path": "kill_after_targets.KillAfterTargets", "init_args": {"targets": 2, "steps": 1}}]'
    killed = subprocess.run([sys.executable, "-m", "untrac_pl.cli", "attribute", "-c", str(cfg), f"--trainer.callbacks={kill}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = out.with_name("out.partial")
    assert len(_event_files(partial)) == 1  # the killed run's file holds the two finished targets

    _attribute(cfg)  # resumes
    assert len(_event_files(out)) == 1
    counts = _steps_written(out)
    assert not [key for key, n in counts.items() if n > 1]
    acc = _accumulator(out)
    assert [e.step for e in acc.Scalars("unlearning/ascent_loss")] == list(range(8))  # 4 targets x 2 steps
    assert [e.step for e in acc.Scalars("target/optimizer_steps")] == [0, 1, 2, 3]

    ref = tmp_path / "ref"
    _attribute(cfg, "--attribution.output_dir", str(ref))
    ref_acc = _accumulator(ref)
    assert set(acc.Tags()["scalars"]) == set(ref_acc.Tags()["scalars"])
    for tag in ("unlearning/ascent_loss", "target/own_loss_last", "target/group_score/animals"):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(e.step, e.value) for e in ref_acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-7), tag


def test_failed_targets_are_logged_and_counted(tmp_path, data):
    """SGD with lr 1e6: every target's ascent turns non-finite; the run still writes its one event file,
    the curves up to the failure, no group scores or histograms of NaN, and metrics/failed_targets."""
    out = tmp_path / "run"
    cfg = _config(data, tmp_path, "untrac_inv", out)
    cfg.write_text(cfg.read_text().replace("{name: adam, lr: 0.001}", "{name: sgd, lr: 1.0e6}").replace("num_steps: 2", "num_steps: 3"))
    from untrac_pl.cli import main

    assert main(["attribute", "-c", str(cfg)]) == 1  # finished, with failed targets
    assert len(_event_files(out)) == 1
    acc = _accumulator(out)
    scalars = set(acc.Tags()["scalars"])
    assert acc.Scalars("metrics/failed_targets")[0].value == len(data[1])
    assert not any(t.startswith("target/group_score/") for t in scalars) and not acc.Tags()["histograms"]
    assert [e.step for e in acc.Scalars("target/optimizer_steps")] == list(range(len(data[1])))
    assert "Failed targets" in _texts(acc)["run/summary"]


def test_ascent_curve_is_written_every_log_every_n_steps_and_at_each_targets_last_step(tmp_path, data):
    """4 targets x 2 steps = run-level steps 0..7; every 3rd step (0, 3, 6) and each target's last (1, 3, 5, 7)."""
    out = tmp_path / "run"
    _attribute(_config(data, tmp_path, "untrac_inv", out), "--trainer.log_every_n_steps", "3")
    acc = _accumulator(out)
    assert [e.step for e in acc.Scalars("unlearning/ascent_loss")] == [0, 1, 3, 5, 6, 7]
    assert [e.step for e in acc.Scalars("target/optimizer_steps")] == [0, 1, 2, 3]  # per target, whatever the cadence
