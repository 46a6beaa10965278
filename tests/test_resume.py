"""Resumable runs: SIGKILL mid-run then resume == uninterrupted (bytes), config-hash refusal, restart,
corrupt per-target files, the lock, and a changed checkpoint behind an unchanged config."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import interrupt_after_targets

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.errors import ResumeConflictError
from untrac_pl.optim import OptimizerSpec
from untrac_pl.resume import ResumeState, config_hash, fingerprint_diff, target_key
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
OUTPUTS = ("scores.safetensors", "rankings.json", "group_scores.csv", "group_scores.md")

CONFIG = """\
seed_everything: 0
attribution: {{method: untrac_inv, target_unit: example, output_dir: {out}, top_k: 3, seed: 0}}
model:
  model:
    config: {{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64, resid_pdrop: 0.1, embd_pdrop: 0.1, attn_pdrop: 0.1}}
    train_tokenizer_vocab: 300
  optimizer: {{name: adam, lr: 0.001}}
  unlearning: {{num_steps: 2, num_epochs: null, batch_size: null}}
data:
  train: [{{path: {train}}}]
  queries: [{{path: {queries}}}]
  max_length: 48
  eval_batch_size: 8
trainer: {{accelerator: cpu, devices: 1, logger: false, enable_progress_bar: false}}
"""


def _records(quickstart, per_group=2, n_queries=3):
    train = [r for g in ("animals", "cooking", "sports", "insults") for r in [x for x in quickstart["train"] if x["group"] == g][:per_group]]
    return train, quickstart["queries"][:n_queries]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _finished_files(out: Path) -> list[Path]:
    return sorted((out.with_name(out.name + ".partial") / "progress" / "targets").glob("*.safetensors"))


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, quickstart):
    """``python -m untrac_pl.cli attribute`` is SIGKILLed after 2 of 4 targets (the test-only callback
    tests/kill_after_targets.py, given through ``trainer.callbacks``); the same command run again (here
    through the same ``main`` entry point, in this process, without the callback) resumes; its files
    equal an uninterrupted run's byte for byte. The resumed rows come from two different processes, so
    this also checks cross-process determinism."""
    from untrac_pl.cli import main

    train, queries = _records(quickstart, n_queries=4)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", train=_write_jsonl(tmp_path / "train.jsonl", train), queries=_write_jsonl(tmp_path / "queries.jsonl", queries)))
    # same thread count as this process, so float reductions run in the same order
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    kill = '[{"class_path": "kill_after_targets.KillAfterTargets", "init_args": {"targets": 2}}]'
    killed = subprocess.run([sys.executable, "-m", "untrac_pl.cli", "attribute", "-c", str(cfg), f"--trainer.callbacks={kill}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    assert not out.exists()  # nothing that looks finished
    assert len(_finished_files(out)) == 2 and (partial / "manifest.json").exists()
    assert not list(partial.rglob("*.tmp"))
    lines = (partial / "progress" / "completed.jsonl").read_text().splitlines()
    assert [json.loads(line)["target_id"] for line in lines] == ["query-0", "query-1"]

    assert main(["attribute", "-c", str(cfg)]) == 0  # the same command again: resumes
    assert not partial.exists() and not (out / "progress").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_targets"] == 2 and summary["num_failed"] == 0 and summary["completed"]

    assert main(["attribute", "-c", str(cfg), "--attribution.output_dir", str(tmp_path / "ref")]) == 0
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert ref_summary["resumed_targets"] == 0 and ref_summary["config_hash"] == summary["config_hash"]


# -- in-process resume scenarios ---------------------------------------------------------------------


class _Interrupt(KeyboardInterrupt):
    pass


def _run(spec, train, queries, out, *, lr=1e-3, stop_after=None, net=None, tokenizer=None, **cfg):
    module = UnTracModule(model=spec, optimizer=OptimizerSpec(lr=lr), unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    if net is not None:
        module.attach(net, tokenizer)
    dm = AttributionDataModule.from_records(train, queries, max_length=40, eval_batch_size=8)
    stop = interrupt_after_targets(stop_after, _Interrupt) if stop_after is not None else contextlib.nullcontext()
    with stop:  # interrupt right after the stop_after-th target is persisted
        return run_attribution(module, dm, AttributionConfig(output_dir=str(out), **cfg), CPU)


@pytest.fixture
def interrupted(tmp_path, tiny_spec, quickstart):
    """An output dir whose run stopped after 1 of 3 targets (partial kept)."""
    train, queries = _records(quickstart, per_group=1)
    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        _run(tiny_spec(), train, queries, out, stop_after=1)
    assert not out.exists() and len(_finished_files(out)) == 1
    return out, train, queries


def test_changed_config_refuses_then_resume_false_then_restart(interrupted, tiny_spec):
    out, train, queries = interrupted
    partial = out.with_name("out.partial")
    before = sorted(p.name for p in partial.rglob("*"))
    with pytest.raises(ResumeConflictError, match=r"different configuration.*optimizer\.lr \(0\.001 -> 0\.002\).*restart: true"):
        _run(tiny_spec(), train, queries, out, lr=2e-3)
    with pytest.raises(ResumeConflictError, match="resume is false"):
        _run(tiny_spec(), train, queries, out, resume=False)
    assert sorted(p.name for p in partial.rglob("*")) == before and not out.exists()  # untouched
    result = _run(tiny_spec(), train, queries, out, lr=2e-3, restart=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_targets"] == 0 and summary["optimizer"]["lr"] == 2e-3
    assert torch.isfinite(result.table.scores).all()


def test_resume_skips_finished_and_recomputes_a_corrupt_target_file(interrupted, tiny_spec, caplog):
    out, train, queries = interrupted
    reference = _run(tiny_spec(), train, queries, out.with_name("ref"))  # uninterrupted
    (finished,) = _finished_files(out)
    finished.write_bytes(finished.read_bytes()[:50])  # torn file (as from a broken disk)
    result = _run(tiny_spec(), train, queries, out)
    assert "ignoring unreadable result file" in caplog.text
    assert json.loads((out / "summary.json").read_text())["resumed_targets"] == 0
    assert torch.equal(result.table.scores, reference.table.scores)


def test_resume_refuses_a_changed_checkpoint_behind_the_same_config(tmp_path, tiny_spec, tiny_tokenizer, quickstart):
    """Same spec, different weights (e.g. a checkpoint overwritten in place): the θ0 check refuses."""
    from untrac_pl.models import build_model

    train, queries = _records(quickstart, per_group=1)
    out = tmp_path / "out"
    net = build_model(tiny_spec(), tiny_tokenizer)
    with pytest.raises(_Interrupt):
        _run(tiny_spec(), train, queries, out, net=net, tokenizer=tiny_tokenizer, stop_after=1)
    with torch.no_grad():
        net.transformer.wte.weight.mul_(1.5)
    with pytest.raises(ResumeConflictError, match="θ0 losses differ.*restart: true"):
        _run(tiny_spec(), train, queries, out, net=net, tokenizer=tiny_tokenizer)
    assert not out.exists() and len(_finished_files(out)) == 1


def test_second_writer_is_locked_out(tmp_path):
    first = ResumeState.open(tmp_path / "x.partial", {"a": 1})
    try:
        with pytest.raises(ResumeConflictError, match="another run is writing"):
            ResumeState.open(tmp_path / "x.partial", {"a": 1})
    finally:
        first.close()
    ResumeState.open(tmp_path / "x.partial", {"a": 1}).close()  # free again once released


def test_keys_hashes_and_diffs():
    ids = ["query-0", "a/b", "a_b", "ü" * 80, "", "..", "x" * 300]
    keys = [target_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all(k and "/" not in k and not k.startswith(".") and len(k) < 60 for k in keys)
    fp = {"optimizer": {"lr": 1e-3, "name": "adam"}, "seed": 0}
    assert config_hash(fp) == config_hash(json.loads(json.dumps(fp)))
    changed = dict(fp, optimizer={"lr": 2e-3, "name": "adam"})
    assert config_hash(changed) != config_hash(fp)
    assert fingerprint_diff(fp, changed) == "optimizer.lr (0.001 -> 0.002)"


def test_fingerprint_ignores_presentation_options(tiny_spec, quickstart, tmp_path):
    """top_k, snippet length, output paths and logging do not change the hash; the seed does."""
    from untrac_pl.engine import AttributionRunner
    from untrac_pl.resume import run_fingerprint

    train, queries = _records(quickstart, per_group=1, n_queries=2)
    module = UnTracModule(model=tiny_spec())
    dm = AttributionDataModule.from_records(train, queries, max_length=40)
    base = AttributionConfig(output_dir=str(tmp_path / "a"))
    plan = AttributionRunner(module, dm, base, CPU).prepare()

    def digest(config, kwargs=CPU):
        return config_hash(run_fingerprint(config, module, dm, plan, kwargs))

    same = AttributionConfig(output_dir=str(tmp_path / "b"), top_k=3, snippet_chars=20, overwrite=True, targets_per_pass=2)
    assert digest(base) == digest(same) == digest(base, dict(CPU, logger=True, enable_progress_bar=True, devices=2))
    assert digest(base) != digest(AttributionConfig(seed=1))
    # K targets stepped together round differently: a resume never mixes them with sequential targets
    assert digest(base) == digest(AttributionConfig(parallel_targets=1)) != digest(AttributionConfig(parallel_targets=4))
    assert digest(base) != digest(base, dict(CPU, precision="bf16-true"))
    assert digest(base, dict(CPU, precision=16)) == digest(base, dict(CPU, precision="16-mixed"))  # one precision, two names
    assert digest(base, dict(CPU, precision="32")) == digest(base)
