"""Outputs at corpus scale (issue 14): a memory-mapped score matrix written in slices, group scores
accumulated as targets finish, exact top-k without sorting a whole row, and ScoreTable.open (lazy)."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from conftest import interrupt_after_targets
from safetensors import safe_open

from untrac_pl.callbacks import rankings
from untrac_pl.scores import top_columns
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.io import save_safetensors_atomic
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
FILES = ("scores.safetensors", "rankings.json", "group_scores.csv", "group_scores.md")


class _Stop(Exception):
    pass


def _run(tiny_spec, quickstart, out, method="untrac_inv", unit="example", stop_after=None):
    train = [dict(r) for r in quickstart["train"]]
    queries = [dict(r) for r in quickstart["queries"]]
    module = UnTracModule(model=tiny_spec(), optimizer=OptimizerSpec(lr=1e-3),
                          unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(train, queries, max_length=40, eval_batch_size=8)
    stop = interrupt_after_targets(stop_after, _Stop) if stop_after is not None else contextlib.nullcontext()
    with stop:
        return run_attribution(module, dm, AttributionConfig(method=method, target_unit=unit, output_dir=str(out), seed=2), CPU)


@pytest.mark.parametrize("method, unit", [("untrac_inv", "example"), ("untrac_inv", "group"), ("untrac", "group"), ("graddot", "example")])
def test_memory_mapped_matrix_gives_the_same_bytes(tmp_path, tiny_spec, quickstart, monkeypatch, method, unit):
    reference = _run(tiny_spec, quickstart, tmp_path / "ram", method, unit)
    assert reference.table.scores.numel() < rankings.MEMMAP_MIN_ENTRIES  # the default keeps a small run in memory
    monkeypatch.setattr(rankings, "MEMMAP_MIN_ENTRIES", 1)
    mapped = _run(tiny_spec, quickstart, tmp_path / "mapped", method, unit)
    for name in FILES:
        assert (tmp_path / "ram" / name).read_bytes() == (tmp_path / "mapped" / name).read_bytes(), name
    assert not list((tmp_path / "mapped").rglob("*.npy")) and not (tmp_path / "mapped" / "progress").exists()
    assert torch.equal(mapped.table.scores, reference.table.scores)
    if method != "untrac":  # row targets: the group table was accumulated while scoring, and equals the recomputed one
        assert mapped.table.group is not None
        recomputed = ScoreTable(mapped.table.scores.clone(), mapped.table.row_ids, mapped.table.row_groups, mapped.table.col_ids,
                                mapped.table.col_groups, mapped.table.row_unit, mapped.table.col_unit, method).group_level()
        assert torch.equal(mapped.table.group.scores, recomputed.scores) and mapped.table.group.row_ids == recomputed.row_ids


def test_resume_with_a_memory_mapped_matrix(tmp_path, tiny_spec, quickstart, monkeypatch):
    reference = _run(tiny_spec, quickstart, tmp_path / "ref")
    monkeypatch.setattr(rankings, "MEMMAP_MIN_ENTRIES", 1)
    with pytest.raises(_Stop):
        _run(tiny_spec, quickstart, tmp_path / "out", stop_after=2)
    assert (tmp_path / "out.partial" / "progress" / "score_matrix.npy").exists()
    resumed = _run(tiny_spec, quickstart, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_targets"] == 2
    for name in FILES:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    assert torch.equal(resumed.table.scores, reference.table.scores)


def test_group_means_accumulated_by_row_equal_the_whole_matrix_with_failures():
    from untrac_pl.scores import GroupIndex

    torch.manual_seed(0)
    matrix = torch.randn(5, 40, dtype=torch.float64) * 1e3
    matrix[2] = float("nan")  # a failed target
    matrix[:, 7] = float("nan")
    groups = [f"g{(j * 7) % 3}" for j in range(40)]
    index = GroupIndex(groups)
    whole = index.means(matrix, dim=1)
    by_row = torch.stack([index.means(matrix[r][None], dim=1)[0] for r in range(5)])
    assert torch.equal(whole.isnan(), by_row.isnan()) and torch.equal(whole.nan_to_num(), by_row.nan_to_num())
    # against a brute-force loop over the finite members
    for r in (0, 3):
        for k, name in enumerate(index.names):
            members = [matrix[r, j].item() for j in range(40) if groups[j] == name and np.isfinite(matrix[r, j].item())]
            assert whole[r, k].item() == pytest.approx(sum(members) / len(members), rel=1e-12)
    assert whole[2].isnan().all()


def test_top_columns_equal_a_stable_full_sort():
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        values = torch.randint(-3, 4, (n,), generator=gen).float()  # many ties
        values[torch.rand(n, generator=gen) < 0.2] = float("nan")
        values[torch.rand(n, generator=gen) < 0.05] = float("inf")
        k = int(torch.randint(0, 12, (1,), generator=gen))
        finite = torch.isfinite(values)
        ref = torch.argsort(torch.where(finite, -values, torch.full_like(values, float("inf"))), stable=True)
        expected = [c for c in ref.tolist() if finite[c]][:k]
        assert top_columns(values, k) == expected, (values, k)


def test_score_table_open_maps_the_matrix(tmp_path):
    torch.manual_seed(0)
    scores = torch.randn(3, 10_000)
    ids = [f"d{i}" for i in range(10_000)]
    table = ScoreTable(scores, ["q0", "q1", "q2"], ["a", "a", "b"], ids, [f"g{i % 4}" for i in range(10_000)], "query", "example", "untrac_inv")
    path = table.save(tmp_path / "scores.safetensors")
    lazy = ScoreTable.open(path)
    assert str(path) in open("/proc/self/maps").read()  # the matrix is a mapping of the file, not a copy in memory
    assert torch.equal(lazy.scores, scores) and lazy.col_ids == ids and lazy.row_groups == ["a", "a", "b"]
    assert torch.equal(lazy.group_level().scores, table.group_level().scores)
    assert lazy.top_k(3) == table.top_k(3)
    lazy.scores[0, 0] = 99.0  # copy-on-write: the file is unchanged
    assert torch.equal(ScoreTable.load(path).scores, scores)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:6])
    with pytest.raises(ValueError, match=r"broken\.safetensors: not a readable score file"):
        ScoreTable.open(broken)


def test_safetensors_are_written_in_slices(tmp_path, monkeypatch):
    import untrac_pl.io as io

    slices = []
    original = io._row_slices

    def small(tensor, max_bytes=1 << 24):
        for part in original(tensor, max_bytes=64):
            slices.append(part.shape)
            yield part

    monkeypatch.setattr(io, "_row_slices", small)
    tensors = {"a": torch.arange(300, dtype=torch.float32).reshape(30, 10), "b": torch.tensor(3.5), "c": torch.zeros(0, 4),
               "d": torch.arange(7, dtype=torch.int64), "e": torch.randn(5, 3).to(torch.bfloat16)}
    path = save_safetensors_atomic(tmp_path / "t.safetensors", tensors, {"k": "v"})
    assert len(slices) > 5
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor), name


def test_a_header_over_the_safetensors_limit_is_refused(tmp_path, monkeypatch):
    import untrac_pl.io as io

    monkeypatch.setattr(io, "SAFETENSORS_MAX_HEADER", 2000)
    table = ScoreTable(torch.zeros(1, 300), ["q"], ["q"], [f"doc-{i}" for i in range(300)], ["g"] * 300, "query", "example", "untrac_inv")
    with pytest.raises(ValueError, match=r"safetensors header would be .* over the format's"):
        table.save(tmp_path / "scores.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
