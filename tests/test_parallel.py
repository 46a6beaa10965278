"""``parallel_targets``: K targets unlearned at once (vmap over stacked parameter sets) give the sequential scores.

The reference is the ordinary engine path (one Trainer.fit per target, the model's own parameters,
Lightning's gradient clipping). Dropout is off, so the two differ by float rounding alone (the
parallel batches are padded to a common length). Scores are made large (lr 1e-2 / 1e-3, several
steps) and distinct per target, so that mixing targets up, averaging instead of summing the K
losses (SGD would then step 1/K as far), clipping the K targets by one joint norm or sharing the
padding into a target's loss would all move them far outside the tolerance.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import interrupt_after_targets

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import ParallelAscentDataset, UnlearningSchedule, plan_micro_batches
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.optim import OptimizerSpec
from untrac_pl.parallel import clip_per_target, parallel_chunks
from untrac_pl.quantization import ScaleConfigError
from untrac_pl.unlearning import Target, UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
GROUPS = ("animals", "cooking", "sports")


def _run(spec, quickstart, k, method="untrac", optimizer=None, schedule=None, hook=None, per_group=4, **config):
    schedule = schedule or (UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1) if method == "untrac"
                            else UnlearningSchedule(num_steps=3, num_epochs=None, batch_size=None))
    module = UnTracModule(spec, optimizer or OptimizerSpec(name="sgd", lr=1e-2), schedule)
    if hook:
        hook(module)
    train = [r for g in GROUPS for r in [r for r in quickstart["train"] if r["group"] == g][:per_group]]
    queries = quickstart["queries"][:6] if method == "untrac" else [dict(q, group=f"subset{i % 3}") for i, q in enumerate(quickstart["queries"][:6])]
    dm = AttributionDataModule.from_records(train, queries, max_length=32, eval_batch_size=4)
    target_unit = "group"
    return run_attribution(module, dm, AttributionConfig(method=method, target_unit=target_unit, parallel_targets=k, **config), CPU, write=False)


def _assert_same(a, b, atol=2e-6):
    assert a.table.row_ids == b.table.row_ids and a.table.col_ids == b.table.col_ids
    scores = a.table.scores
    assert torch.isfinite(scores).all()
    # the scores are far from 0 and differ between targets: a wrong parallel path cannot hide in atol
    spread = float((scores - scores.mean(dim=0 if a.table.col_ids == list(GROUPS) else 1, keepdim=True)).abs().max())
    assert float(scores.abs().min()) > 50 * atol and spread > 50 * atol, (float(scores.abs().min()), spread)
    assert torch.allclose(b.table.scores, scores, atol=atol, rtol=1e-4), float((b.table.scores - scores).abs().max())


@pytest.mark.parametrize("optimizer", [OptimizerSpec(name="sgd", lr=1e-2), OptimizerSpec(name="adam", lr=1e-3)], ids=["sgd", "adam"])
def test_untrac_three_groups_at_once_equal_one_at_a_time(tiny_spec, quickstart, optimizer):
    """UnTrac at the paper's regime (batch 1, one epoch), every group of a different text length."""
    chunks = []

    def record(module):
        original = module.set_parallel

        def set_parallel(targets, stacked):
            if targets:
                chunks.append(([t.id for t in targets], {n: tuple(t.shape) for n, t in stacked.items()}))
            original(targets, stacked)

        module.set_parallel = set_parallel

    sequential = _run(tiny_spec(), quickstart, 1, optimizer=optimizer, hook=record)
    assert chunks == []
    parallel = _run(tiny_spec(), quickstart, 3, optimizer=optimizer, hook=record)
    assert [ids for ids, _ in chunks] == [list(GROUPS)]  # one fit for the three groups
    assert all(shape[0] == 3 for shape in chunks[0][1].values())
    _assert_same(sequential, parallel)


def test_untrac_inv_subsets_in_chunks_and_a_remainder(tiny_spec, quickstart):
    """UnTrac-Inv, whole subset in one batch for 3 steps, subsets of 2 queries; K=2 over 3 targets: a pair and a single."""
    sequential = _run(tiny_spec(), quickstart, 1, method="untrac_inv")
    parallel = _run(tiny_spec(), quickstart, 2, method="untrac_inv")
    _assert_same(sequential, parallel)


def test_per_target_clipping_and_token_mean_equal_the_sequential_path(tiny_spec, quickstart):
    """``max_grad_norm`` clips each target by its own norm (Lightning clips the sequential one); token-mean losses."""
    schedule = lambda: UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=2, max_grad_norm=0.05, loss_reduction="token_mean")  # noqa: E731
    sequential = _run(tiny_spec(), quickstart, 1, schedule=schedule())
    parallel = _run(tiny_spec(), quickstart, 3, schedule=schedule())
    _assert_same(sequential, parallel)
    unclipped = _run(tiny_spec(), quickstart, 1, schedule=UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=2, loss_reduction="token_mean"))
    assert float((unclipped.table.scores - sequential.table.scores).abs().max()) > 1e-3  # the clipping is active


def test_clip_per_target_is_clip_grad_norm_of_each_slice():
    torch.manual_seed(0)
    stacked = {"a": torch.randn(3, 4, 5, requires_grad=True), "b": torch.randn(3, 7, requires_grad=True)}
    for t in stacked.values():
        t.grad = torch.randn_like(t) * torch.tensor([0.01, 1.0, 10.0]).view(3, *([1] * (t.dim() - 1)))
    expected = []
    for i in range(3):
        slices = [stacked[n].grad[i].clone() for n in stacked]
        params = [torch.nn.Parameter(torch.zeros_like(s)) for s in slices]
        for p, s in zip(params, slices):
            p.grad = s
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        expected.append((norm, [p.grad for p in params]))
    norms = clip_per_target(stacked, 1.0)
    for i, (norm, grads) in enumerate(expected):
        assert torch.allclose(norms[i], norm, rtol=1e-6)
        for name, g in zip(stacked, grads):
            assert torch.allclose(stacked[name].grad[i], g, rtol=1e-6, atol=0)
    assert float(norms[0]) < 1.0 and float(norms[2]) > 1.0  # one slice left alone, one clipped


def test_a_non_finite_target_is_marked_failed_and_the_others_keep_their_scores(tiny_spec, quickstart):
    reference = _run(tiny_spec(), quickstart, 1)

    def hook(module):
        original = module._ascent_loss

        def poisoned(batch):
            losses = original(batch)
            if module.stacked is not None and module.trainer.global_step == 2:
                losses = torch.where(torch.arange(len(losses)) == 1, torch.full_like(losses, float("nan")), losses)
            return losses

        module._ascent_loss = poisoned

    result = _run(tiny_spec(), quickstart, 3, hook=hook)
    failing = result.table.col_ids[1]
    assert list(result.failed) == [failing] and result.failed[failing]["step"] == 2
    keep = [i for i, g in enumerate(result.table.col_ids) if g != failing]
    assert torch.isnan(result.table.scores[:, 1]).all()
    assert torch.allclose(result.table.scores[:, keep], reference.table.scores[:, keep], atol=2e-6, rtol=1e-4)


def test_targets_are_chunked_by_step_structure_and_batches_padded_without_loss():
    schedule = UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=2)
    targets = [Target("a", [0, 1, 2, 3], 1), Target("b", [4, 5, 6], 2), Target("c", [7, 8, 9, 10], 3), Target("d", [11, 12], 4)]
    plans = {t.id: plan_micro_batches(len(t.indices), schedule, t.seed) for t in targets}
    # a, c: 2 steps of 2; b: 2 steps (2 + 1); d: 1 step — b steps like a and c, d alone
    assert [[t.id for t in c] for c in parallel_chunks(targets, plans, 2)] == [["a", "b"], ["c"], ["d"]]
    from untrac_pl.data.collate import PadCollator

    examples = [{"input_ids": list(range(1, 3 + i)), "labels": list(range(1, 3 + i)), "index": i} for i in range(13)]
    ds = ParallelAscentDataset(examples, [targets[0].indices, targets[1].indices], [plans["a"], plans["b"]], PadCollator(0))
    item = ds[1]
    assert item["input_ids"].shape[:2] == (2, 2) and item["step_end"] is True
    assert item["denominator"].tolist() == [2.0, float(plans["b"][1]["denominator"])]
    if plans["b"][1]["denominator"] == 1:  # b's last step holds one example: its second row is all ignored
        assert (item["labels"][1, 1] == -100).all()
    with pytest.raises(ValueError, match="same micro-batch structure"):
        ParallelAscentDataset(examples, [targets[0].indices, targets[3].indices], [plans["a"], plans["d"]], PadCollator(0))


def test_refusals_name_the_setting(tiny_spec, quickstart):
    with pytest.raises(ScaleConfigError, match="targets_per_pass: 1"):
        _run(tiny_spec(), quickstart, 2, targets_per_pass=2)
    with pytest.raises(ScaleConfigError, match="max_loss"):
        _run(tiny_spec(), quickstart, 2, schedule=UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1, max_loss=20.0))
    with pytest.raises(ValueError, match="attribution.parallel_targets must be an integer >= 1"):
        AttributionConfig(parallel_targets=0)
    from untrac_pl.parallel import check_parallel_options

    with pytest.raises(ScaleConfigError, match="16-mixed"):
        check_parallel_options(AttributionConfig(parallel_targets=2), UnlearningSchedule(), {"precision": "16-mixed"})


def test_lora_adapters_alone_are_stacked_and_the_base_is_never_written(tiny_spec, quickstart):
    spec = lambda: tiny_spec(lora={"r": 2})  # noqa: E731
    shapes, kept = [], {}

    def record(module):
        original, load = module.set_parallel, module.load_model

        def set_parallel(targets, stacked):
            if targets:
                shapes.append(sorted(stacked))
            original(targets, stacked)

        def load_and_keep(texts=None):
            load(texts)
            kept.update({n: t.clone() for n, t in module.net.state_dict().items()})
            kept["module"] = module

        module.set_parallel, module.load_model = set_parallel, load_and_keep

    sequential = _run(spec(), quickstart, 1, optimizer=OptimizerSpec(name="adam", lr=1e-2))
    parallel = _run(spec(), quickstart, 3, optimizer=OptimizerSpec(name="adam", lr=1e-2), hook=record)
    assert shapes and all("lora_" in name for name in shapes[0])
    _assert_same(sequential, parallel, atol=1e-6)
    state = kept.pop("module").net.state_dict()
    assert all(torch.equal(state[n], t) for n, t in kept.items())  # neither base nor adapters of the model moved


def test_an_interrupted_parallel_run_resumes_chunk_by_chunk(tmp_path, tiny_spec, quickstart, monkeypatch):
    """K=2 over 4 groups = 2 chunks; stopped once the first chunk is persisted, the resume redoes only the second
    and ends with the uninterrupted run's scores, bit for bit."""
    groups = ("animals", "cooking", "sports", "insults")
    train = [r for g in groups for r in [r for r in quickstart["train"] if r["group"] == g][:3]]

    def run(out, stop_after=None):
        module = UnTracModule(tiny_spec(), OptimizerSpec(name="adam", lr=1e-3), UnlearningSchedule(num_epochs=1, num_steps=None, batch_size=1))
        dm = AttributionDataModule.from_records(train, quickstart["queries"][:4], max_length=32, eval_batch_size=4)
        stop = interrupt_after_targets(stop_after) if stop_after is not None else contextlib.nullcontext()
        with stop:
            return run_attribution(module, dm, AttributionConfig(method="untrac", target_unit="group", parallel_targets=2,
                                                                 output_dir=str(out)), CPU)

    reference = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", stop_after=2)  # both targets of the first chunk recorded
    fitted = []
    monkeypatch.setattr(UnTracModule, "set_parallel", lambda self, targets, stacked, _orig=UnTracModule.set_parallel: (
        fitted.append([t.id for t in targets]) if targets else None, _orig(self, targets, stacked))[1])
    result = run(tmp_path / "out")
    assert fitted == [list(groups[2:])]  # only the second chunk was unlearned again
    assert torch.equal(result.table.scores, reference.table.scores)
