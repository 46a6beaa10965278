"""UnTracModule + engine: sign, brute-force equality, first-order identity, restore, order independence."""
from __future__ import annotations

import copy

import pytest
import torch

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.losses import model_per_example_loss
from untrac_pl.optim import OptimizerSpec, build_optimizer
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


def _small_corpus(quickstart, per_group=6):
    train = []
    for group in ("animals", "cooking", "sports", "insults"):
        train += [r for r in quickstart["train"] if r["group"] == group][:per_group]
    return train


def _run(spec, train, queries, *, method="untrac_inv", optimizer=None, schedule=None, target_unit="example", seed=0, module=None):
    module = module or UnTracModule(model=spec, optimizer=optimizer or OptimizerSpec(lr=1e-3), unlearning=schedule or UnlearningSchedule(num_steps=3, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(train, queries, max_length=48, eval_batch_size=7)
    config = AttributionConfig(method=method, target_unit=target_unit, seed=seed)
    return run_attribution(module, dm, config, CPU, write=False), module, dm


def test_unlearning_a_query_raises_its_loss_and_its_duplicate_ranks_first(tiny_spec, quickstart):
    train = _small_corpus(quickstart)
    duplicate = train[7]
    queries = [{"id": "dup", "group": duplicate["group"], "text": duplicate["text"]}, quickstart["queries"][0]]
    result, module, dm = _run(tiny_spec(), train, queries)
    table = result.table
    assert table.row_ids == ["dup", queries[1]["id"]]
    assert table.col_ids == [r["id"] for r in train]
    assert int(table.scores[0].argmax()) == 7  # the verbatim copy of the query is the most influential example
    assert float(table.scores[0, 7]) > 0  # positive = unlearning the query raised this example's loss
    # the unlearned query's own loss rises: score of the duplicate equals the query's own loss increase
    assert (table.scores[0] > 0).float().mean() > 0.5


def test_untrac_inv_equals_brute_force_reference(tiny_spec, quickstart):
    """Per example, batch 1, θ0 losses recomputed per query, model deep-copied per query."""
    train = _small_corpus(quickstart, per_group=4)
    queries = quickstart["queries"][:3]
    opt_spec = OptimizerSpec(name="adam", lr=1e-3)
    result, module, dm = _run(tiny_spec(), train, queries, optimizer=opt_spec)
    model, corpus_train, corpus_q = module.net, dm.train_corpus, dm.query_corpus
    collate = dm.collator
    expected = torch.zeros(len(queries), len(train))
    for q in range(len(queries)):
        reference = copy.deepcopy(model).train()
        base = []
        with torch.no_grad():
            reference.eval()
            for ex in corpus_train.examples:
                base.append(model_per_example_loss(reference, collate([ex]))[0])
        reference.train()
        optimizer = build_optimizer(opt_spec, reference.parameters())
        for _ in range(3):
            optimizer.zero_grad()
            loss = model_per_example_loss(reference, collate([corpus_q.examples[q]])).mean()
            (-loss).backward()
            optimizer.step()
        reference.eval()
        with torch.no_grad():
            for n, ex in enumerate(corpus_train.examples):
                expected[q, n] = model_per_example_loss(reference, collate([ex]))[0] - base[n]
    assert torch.allclose(result.table.scores, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-3  # the comparison is not vacuous


def _train_briefly(module, records, steps=20):
    """A few Adam descent steps on the data, so the identity is checked away from random init."""
    from untrac_pl.data.collate import PadCollator
    from untrac_pl.data.tokenize import tokenize_records

    module.load_model([r.get("text") or r["prompt"] + r["completion"] for r in records])
    corpus = tokenize_records(records, module.tokenizer, 48, "warm-up")
    batch = PadCollator(module.tokenizer.pad_token_id)(corpus.examples)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    module.net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model_per_example_loss(module.net, batch).mean().backward()
        optimizer.step()
    module.net.eval()


def test_one_sgd_step_full_batch_is_lr_times_graddot(tiny_spec, quickstart):
    """Paper: with one SGD step on the whole query batch, UnTrac-Inv ≈ lr × GradDot (first order)."""
    train = _small_corpus(quickstart, per_group=3)
    queries = [dict(r, group="q") for r in quickstart["queries"][:3]]
    lr = 1e-4
    module = UnTracModule(model=tiny_spec(), optimizer=OptimizerSpec(name="sgd", lr=lr), unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    _train_briefly(module, train + queries)
    result, module, dm = _run(None, train, queries, target_unit="group", module=module)
    model = module.net
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_of(batch):
        loss = model_per_example_loss(model, batch).mean()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    g_query = grad_of(dm.collator(dm.query_corpus.examples))
    graddot = torch.stack([grad_of(dm.collator([ex])) @ g_query for ex in dm.train_corpus.examples])
    scores = result.table.scores[0]
    assert result.table.row_ids == ["q"]
    predicted = lr * graddot
    assert torch.corrcoef(torch.stack([scores, graddot]))[0, 1] > 0.999
    # error model: second-order terms (~2 % here) plus the float32 rounding of the two losses the score is the
    # difference of (2 ulps of a ~4-nat loss), which decides an example whose gradient is nearly orthogonal
    # to the query's (its change can round to exactly 0, depending on the CPU that trained θ0)
    ulp = torch.finfo(torch.float32).eps * float(torch.stack([model_per_example_loss(model, dm.collator([ex])) for ex in dm.train_corpus.examples]).max())
    assert ((scores - predicted).abs() <= 0.05 * predicted.abs() + 2 * ulp).all(), (scores, predicted)
    assert (predicted.abs() > 40 * ulp).float().mean() >= 0.5  # and most examples are far above the rounding


def test_theta0_restored_bit_exactly_and_order_independent(tiny_spec, quickstart):
    train = _small_corpus(quickstart, per_group=3)
    queries = quickstart["queries"]
    module = UnTracModule(model=tiny_spec(dropout=0.1), optimizer=OptimizerSpec(lr=5e-3), unlearning=UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None))
    module.load_model([r["text"] for r in train + queries])
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    forward, _, _ = _run(None, train, queries, module=module)
    after = module.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact θ0 after 6 targets
    backward, _, _ = _run(None, train, list(reversed(queries)), module=module)
    order = [backward.table.row_ids.index(q) for q in forward.table.row_ids]
    assert torch.equal(forward.table.scores, backward.table.scores[order])  # dropout seeds follow target ids


def test_untrac_unlearns_each_training_group(tiny_spec, quickstart):
    train = _small_corpus(quickstart, per_group=4)
    queries = quickstart["queries"]
    result, module, dm = _run(
        tiny_spec(), train, queries, method="untrac", optimizer=OptimizerSpec(lr=2e-3),
        schedule=UnlearningSchedule(num_epochs=1, batch_size=1),
    )
    table = result.table
    assert table.col_unit == "group" and table.col_ids == ["animals", "cooking", "sports", "insults"]
    assert table.row_ids == [q["id"] for q in queries]
    assert set(result.table.metadata["optimizer_steps"].values()) == {4}  # one epoch, batch 1, 4 examples
    group = table.group_level()
    # each query subset is influenced most by its own topic group
    for row, name in enumerate(group.row_ids):
        assert group.col_ids[int(group.scores[row].argmax())] == name


def test_untrac_warns_when_groups_get_unequal_step_counts(tiny_spec, quickstart, caplog):
    from untrac_pl.engine import AttributionRunner

    train = _small_corpus(quickstart, per_group=4)[:-1]  # "insults" keeps 3 examples: 3 steps, others 4
    per_epoch = UnlearningSchedule(num_epochs=1, batch_size=1)
    fixed = UnlearningSchedule(num_steps=4, num_epochs=None, batch_size=1)

    def warnings_for(schedule):
        caplog.clear()
        module = UnTracModule(model=tiny_spec(), unlearning=schedule)
        dm = AttributionDataModule.from_records(train, quickstart["queries"], max_length=48)
        with caplog.at_level("WARNING", logger="untrac_pl.engine"):
            AttributionRunner(module, dm, AttributionConfig(method="untrac"), CPU).prepare()
        return [r.getMessage() for r in caplog.records if "unequal ascent step counts" in r.getMessage()]

    (message,) = warnings_for(per_epoch)
    assert "insults: 3" in message and ": 4" in message and "samples_per_group" in message
    assert warnings_for(fixed) == []  # a fixed step count is equal whatever the group sizes


def test_one_step_untrac_inv_is_flagged_as_the_gradcos_regime(tiny_spec, quickstart, caplog):
    from untrac_pl.engine import AttributionRunner

    def messages(schedule):
        caplog.clear()
        dm = AttributionDataModule.from_records(_small_corpus(quickstart, 2), quickstart["queries"][:2], max_length=48)
        with caplog.at_level("WARNING", logger="untrac_pl.engine"):
            AttributionRunner(UnTracModule(model=tiny_spec(), unlearning=schedule), dm, AttributionConfig(), CPU).prepare()
        return [r.getMessage() for r in caplog.records if "GradCos" in r.getMessage()]

    assert len(messages(UnlearningSchedule())) == 1  # the module's default schedule: one epoch at batch 1 = 1 step per query
    assert messages(UnlearningSchedule(num_steps=5, num_epochs=None, batch_size=None)) == []


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "sgd_momentum", "rmsprop", "adafactor", "adam8bit"])
def test_every_optimizer_ascends(tiny_spec, quickstart, name):
    train = _small_corpus(quickstart, per_group=2)
    queries = quickstart["queries"][:1]
    lr = {"sgd": 0.5, "sgd_momentum": 0.2}.get(name, 1e-2)
    result, _, _ = _run(tiny_spec(), train, queries, optimizer=OptimizerSpec(name=name, lr=lr))
    assert torch.isfinite(result.table.scores).all()
    assert result.table.scores.mean() > 0  # ascent on a query raises losses on related text


def test_gradient_accumulation_matches_full_batch(tiny_spec, quickstart):
    train = _small_corpus(quickstart, per_group=2)
    queries = [dict(r, group="all") for r in quickstart["queries"][:4]]
    full, _, _ = _run(tiny_spec(), train, queries, target_unit="group", optimizer=OptimizerSpec(name="sgd", lr=0.1))
    micro, _, _ = _run(
        tiny_spec(), train, queries, target_unit="group", optimizer=OptimizerSpec(name="sgd", lr=0.1),
        schedule=UnlearningSchedule(num_steps=3, num_epochs=None, batch_size=None, micro_batch_size=1),
    )
    assert torch.allclose(full.table.scores, micro.table.scores, atol=1e-6)


def test_dropout_on_while_unlearning_and_eval_mode_while_scoring(saved_model_dir, quickstart):
    """A from_pretrained model arrives in eval mode; ascent must still run with dropout on."""
    from lightning.pytorch.callbacks import Callback

    from untrac_pl.models import ModelSpec

    seen = {"train": set(), "predict": set()}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].add(pl_module.net.training)

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["predict"].add(pl_module.net.training)

    module = UnTracModule(model=ModelSpec(name_or_path=str(saved_model_dir)), unlearning=UnlearningSchedule(num_steps=1, num_epochs=None, batch_size=None))
    dm = AttributionDataModule.from_records(_small_corpus(quickstart, 1), quickstart["queries"][:2], max_length=32)
    run_attribution(module, dm, AttributionConfig(), dict(CPU, callbacks=[Spy()]), write=False)
    assert seen == {"train": {True}, "predict": {False}}


def test_module_stays_on_its_device_while_the_engine_runs():
    """Lightning's teardown calls .cpu() after each fit/predict; the engine pins the module instead."""
    module = UnTracModule()
    module.net = torch.nn.Linear(2, 2, device="meta")
    module.keep_on_device = True
    assert module.cpu() is module and module.net.weight.device.type == "meta"
    module.keep_on_device = False
    module.net = torch.nn.Linear(2, 2)
    module.cpu()
    assert module.net.weight.device.type == "cpu"
