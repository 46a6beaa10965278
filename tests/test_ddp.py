"""DDP: three CPU processes (gloo) score shards of the evaluation set; the merged scores equal a
single process's bit for bit, and every rank unlearns every target identically. Three, not two: a
world size that is not a power of two is where averaging identical gradients is inexact, which the
rank-0 gradient hook (untrac_pl.distributed.take_rank0_gradient) avoids.

The DDP run happens in a subprocess (Lightning's launcher re-runs that script as rank 1), once with
one target per pass and once with ``targets_per_pass: 2``; the single-process reference runs here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from untrac_pl.distributed import (
    ShardedBatchSampler,
    may_be_distributed,
    merge_across_ranks,
)

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    '''
    import hashlib, json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from untrac_pl.data.datamodule import AttributionDataModule
    from untrac_pl.data.embedded import quickstart_corpus
    from untrac_pl.data.schedule import UnlearningSchedule
    from untrac_pl.engine import AttributionConfig, run_attribution
    from untrac_pl.models import ModelSpec
    from untrac_pl.optim import OptimizerSpec
    from untrac_pl.unlearning import UnTracModule

    CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
              "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


    class Checksums(pl.Callback):
        """sha256 of the trainable weights at the end of every target's ascent, on this rank."""

        def __init__(self):
            self.sums, self.rank = {}, 0

        def on_train_end(self, trainer, pl_module):
            self.rank = trainer.global_rank
            digest = hashlib.sha256()
            for _, p in pl_module.net.named_parameters():
                if p.requires_grad:
                    digest.update(p.detach().cpu().numpy().tobytes())
            self.sums[pl_module.target.id] = digest.hexdigest()


    class ScoredIndices(pl.Callback):
        """The evaluation indices this rank's model actually ran on: one list of batches per predict pass
        (the θ0 pass, then one per target or chunk of targets)."""

        def __init__(self):
            self.passes = []

        def on_predict_start(self, trainer, pl_module):
            self.passes.append([])

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.passes[-1].append(batch["index"].tolist())


    class RowsRead:
        """The training-corpus rows this rank's evaluation loaders fetched (storage: arrow)."""

        rows = set()

        @classmethod
        def install(cls):
            from untrac_pl.data import collate, store

            original = collate.ExampleDataset.__getitems__

            def getitems(self, indices):
                if isinstance(self.examples, store.ExampleRows) and len(self.examples) == 37:
                    cls.rows.update(indices)
                return original(self, indices)

            collate.ExampleDataset.__getitems__ = getitems


    def write_files(out):
        """The same records as JSONL files, for the storage: arrow run (written once, by the launching process)."""
        qs = quickstart_corpus(seed=0)
        for name, records in (("train", qs["train"][:37]), ("queries", qs["queries"][:3])):
            path = os.path.join(out, f"{name}.jsonl")
            if not os.path.exists(path):
                with open(path + ".tmp", "w") as handle:
                    handle.writelines(json.dumps(dict(r)) + "\\n" for r in records)
                os.replace(path + ".tmp", path)


    def run(out, devices, k, write, storage="memory"):
        qs = quickstart_corpus(seed=0)
        module = UnTracModule(ModelSpec(config=CONFIG, train_tokenizer_vocab=300), OptimizerSpec(lr=1e-3),
                              UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None))
        # 37 evaluation examples in batches of 8: 5 batches, an uneven split over 3 ranks (2, 2, 1)
        dm = AttributionDataModule.from_records(qs["train"][:37], qs["queries"][:3], max_length=32, eval_batch_size=8)
        if storage == "arrow":  # memory-mapped files read by every rank through one shared cache
            from untrac_pl.data.records import DataSource

            dm = AttributionDataModule(train=[DataSource(path=os.path.join(out, "train.jsonl"))],
                                       queries=[DataSource(path=os.path.join(out, "queries.jsonl"))], max_length=32,
                                       eval_batch_size=8, storage="arrow", cache_dir=os.path.join(out, "cache"))
            RowsRead.rows = set()
        checks, scored = Checksums(), ScoredIndices()
        # use_distributed_sampler=True as the CLI passes it: the engine must still never shard the ascent
        trainer = {"accelerator": "cpu", "devices": devices, "enable_progress_bar": False, "logger": False,
                   "callbacks": [checks, scored], "use_distributed_sampler": True}
        if devices > 1:
            trainer["strategy"] = "ddp"
        config = AttributionConfig(output_dir=os.path.join(out, f"run-k{k}" + ("-arrow" if storage == "arrow" else "")),
                                   overwrite=True, targets_per_pass=k)
        result = run_attribution(module, dm, config, trainer, write=write)
        return {"rank": checks.rank, "sums": checks.sums, "scores": result.table.scores.tolist(), "scored": scored.passes,
                "row_ids": result.table.row_ids, "output_dir": str(result.output_dir) if result.output_dir else None,
                "rows_read": sorted(RowsRead.rows)}


    if __name__ == "__main__":
        out, devices = sys.argv[1], int(sys.argv[2])
        if os.environ.get("LOCAL_RANK") is None:
            write_files(out)
        RowsRead.install()
        reports = [run(out, devices, k, write=devices > 1) for k in (1, 2)]
        reports.append(run(out, devices, 1, write=devices > 1, storage="arrow"))
        with open(os.path.join(out, f"rank{reports[0]['rank']}-of-{devices}.json"), "w") as handle:
            json.dump(reports, handle)
    '''
)


from untrac_pl.data.collate import ExampleDataset  # noqa: E402

_GETITEMS = ExampleDataset.__getitems__


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(out), "3"], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, script


@pytest.fixture(scope="module")
def single_run(ddp_run):
    """The same script's ``run`` in this process, one device (the reference), for k = 1 and 2."""
    out, script = ddp_run
    namespace: dict = {"__name__": "ddp_reference"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    namespace["RowsRead"].install()
    try:
        runs = [namespace["run"](str(out), 1, k, write=False) for k in (1, 2)]
        return runs + [namespace["run"](str(out), 1, 1, write=False, storage="arrow")]
    finally:
        from untrac_pl.data import collate

        collate.ExampleDataset.__getitems__ = _GETITEMS


def test_sharded_scores_merge_to_the_single_process_result(ddp_run, single_run):
    out, script = ddp_run
    ranks = [_load(out / f"rank{r}-of-3.json") for r in range(3)]
    single = single_run
    for k_index in range(2):
        ref = single[k_index]
        for report in ranks:
            # unlearning is deterministic on every rank and bit-identical to one process's
            assert report[k_index]["sums"] == ref["sums"] and len(ref["sums"]) == 3
            # merged scores, on every rank, equal the single-process scores exactly (goal: 1e-6)
            assert torch.equal(torch.tensor(report[k_index]["scores"]), torch.tensor(ref["scores"]))
            assert report[k_index]["row_ids"] == ref["row_ids"]
    rank0 = ranks[0]
    # k=2 under DDP equals k=1 under DDP too
    assert torch.allclose(torch.tensor(rank0[1]["scores"]), torch.tensor(rank0[0]["scores"]), atol=1e-6, rtol=0)
    # only rank 0 wrote the run directory
    assert rank0[0]["output_dir"] and ranks[1][0]["output_dir"] is None and ranks[2][0]["output_dir"] is None
    summary = json.loads((Path(rank0[0]["output_dir"]) / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["completed"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("run-")) == ["run-k1", "run-k1-arrow", "run-k2"]


def test_arrow_storage_ranks_read_only_their_shard_and_match_one_process(ddp_run, single_run):
    """data.storage: arrow under 3 gloo ranks: the same scores, bit for bit, as one process with the in-memory
    records; every rank's evaluation loaders fetched only the rows of its own batches from the mapped files."""
    out, _ = ddp_run
    ranks = [_load(out / f"rank{r}-of-3.json") for r in range(3)]
    reference, arrow_single = single_run[0], single_run[2]
    assert torch.equal(torch.tensor(arrow_single["scores"]), torch.tensor(reference["scores"]))
    assert arrow_single["rows_read"] == list(range(37))
    batches = reference["scored"][0]
    for rank, report in enumerate(ranks):
        arrow = report[2]
        assert torch.equal(torch.tensor(arrow["scores"]), torch.tensor(reference["scores"])), rank
        assert arrow["sums"] == reference["sums"]
        assert arrow["rows_read"] == sorted({i for b in batches[rank::3] for i in b}), rank
        assert reference["rows_read"] == []  # the in-memory runs read no Arrow rows
    assert sum(len(r[2]["rows_read"]) for r in ranks) == 37


def test_each_rank_scores_only_its_shard(ddp_run, single_run):
    """Merged scores equal one process's even if every rank scored everything; here each rank must have run
    its model on batches r, r+3, ... of the single process's batch list only, in every predict pass."""
    out, _ = ddp_run
    ranks = [_load(out / f"rank{r}-of-3.json") for r in range(3)]
    for k_index, passes in enumerate((4, 3)):  # θ0 + 3 targets; θ0 + 2 chunks (targets_per_pass: 2)
        batches = single_run[k_index]["scored"]
        assert len(batches) == passes and all(b == batches[0] for b in batches)
        batches = batches[0]
        assert len(batches) == 5 and sorted(i for b in batches for i in b) == list(range(37))
        for rank, report in enumerate(ranks):
            scored = report[k_index]["scored"]
            assert len(scored) == passes
            for one_pass in scored:
                assert one_pass == batches[rank::3], (rank, one_pass)
        # disjoint shards that cover the evaluation set once, none of them the whole set
        shards = [{i for b in report[k_index]["scored"][0] for i in b} for report in ranks]
        assert [len(s) for s in shards] == [len({i for b in batches[r::3] for i in b}) for r in range(3)]
        assert sum(len(s) for s in shards) == 37 and set().union(*shards) == set(range(37))
        assert max(len(s) for s in shards) < 37


def test_sharded_batch_sampler_covers_every_batch_once():
    batches = [[0, 1], [2, 3], [4, 5], [6]]
    shards = [list(ShardedBatchSampler(batches, r, 3)) for r in range(3)]
    assert shards == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]
    # more ranks than batches: the extra rank repeats batch 0 (dropped by the index merge)
    assert list(ShardedBatchSampler(batches[:1], 1, 2)) == [[0, 1]]
    with pytest.raises(ValueError):
        ShardedBatchSampler(batches, 2, 2)


def test_merge_without_process_group_is_identity_and_single_device_is_not_distributed():
    values = torch.tensor([1.0, float("nan"), 3.0])
    assert merge_across_ranks(values) is values
    assert not may_be_distributed({"accelerator": "cpu", "devices": 1})
    assert may_be_distributed({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    assert may_be_distributed({"devices": 1, "num_nodes": 2})


def test_a_resume_refused_by_rank_0_stops_every_rank_at_once(ddp_run, tmp_path):
    """Rank 0 alone reads the resume state; when it refuses (θ0 losses changed behind an unchanged
    configuration) every rank must stop with that reason instead of waiting on a collective."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from untrac_pl.resume import ResumeState

    _, script = ddp_run
    namespace: dict = {"__name__": "ddp_partial"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    original, calls = ResumeState.record, {"n": 0}

    def record_then_interrupt(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt  # one target persisted, then the run stops

    ResumeState.record = record_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            namespace["run"](str(tmp_path), 1, 1, write=True)
    finally:
        ResumeState.record = original
    base_file = tmp_path / "run-k1.partial" / "progress" / "base_losses.safetensors"
    assert calls["n"] == 1 and base_file.exists()
    with safe_open(str(base_file), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"losses": load_file(str(base_file))["losses"] + 0.5}, str(base_file), metadata=metadata)

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "2"], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "the θ0 losses differ from those of the interrupted run" in proc.stderr  # rank 0
    assert "rank 0 refused to resume" in proc.stderr, proc.stderr[-3000:]  # rank 1, told by rank 0
    assert not (tmp_path / "run-k1").exists() and base_file.exists()  # nothing finished-looking, partial kept
