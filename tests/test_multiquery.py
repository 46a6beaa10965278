"""``targets_per_pass``: k targets unlearned one after another, scored in one pass — same scores as k=1."""
from __future__ import annotations

import pytest
import torch

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.errors import NonFiniteLossError
from untrac_pl.losses import model_per_example_loss
from untrac_pl.multiquery import changed_tensors, losses_with_parameter_sets
from untrac_pl.optim import OptimizerSpec
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


class CountingDataModule(AttributionDataModule):
    """Counts evaluation batches collated (θ0 pass + scoring passes)."""

    collated = 0

    def evaluation_dataloader(self, corpus, loss_reduction="example_mean"):
        loader = super().evaluation_dataloader(corpus, loss_reduction)
        inner = loader.collate_fn

        def counting(examples):
            CountingDataModule.collated += 1
            return inner(examples)

        loader.collate_fn = counting
        return loader


def _run(spec, quickstart, k, method="untrac_inv", module_hook=None, groups=("animals", "cooking", "sports")):
    module = UnTracModule(spec, OptimizerSpec(lr=1e-3), UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=None))
    if module_hook:
        module_hook(module)
    train = [r for g in groups for r in [r for r in quickstart["train"] if r["group"] == g][:5]]
    dm = CountingDataModule.from_records(train, quickstart["queries"][:4], max_length=32, eval_batch_size=6)
    CountingDataModule.collated = 0
    result = run_attribution(module, dm, AttributionConfig(method=method, targets_per_pass=k), CPU, write=False)
    return result, CountingDataModule.collated


@pytest.fixture(scope="module")
def one_per_pass(quickstart):
    from conftest import tiny_gpt2_config

    from untrac_pl.models import ModelSpec

    result, collated = _run(ModelSpec(config=tiny_gpt2_config(0.1), train_tokenizer_vocab=300), quickstart, 1)
    return result, collated


def test_k_targets_per_pass_give_the_same_scores_and_collate_once_per_chunk(tiny_spec, quickstart, one_per_pass):
    reference, collated_1 = one_per_pass
    result, collated_3 = _run(tiny_spec(dropout=0.1), quickstart, 3)  # 4 targets: chunks of 3 and 1
    assert not result.failed and not reference.failed
    assert torch.allclose(result.table.scores, reference.table.scores, atol=1e-6, rtol=0)
    batches = collated_1 // 5  # k=1: θ0 pass + 4 scoring passes
    assert collated_1 == 5 * batches and collated_3 == 3 * batches  # θ0 pass + 2 chunk passes


def test_lora_adapters_untrac_groups_k2_equals_k1(tiny_spec, quickstart):
    """UnTrac (targets = training groups, score columns) on LoRA adapters: only adapters are stashed."""
    spec = lambda: tiny_spec(dropout=0.1, lora={"r": 2})  # noqa: E731
    a, _ = _run(spec(), quickstart, 1, method="untrac", groups=("animals", "cooking"))
    kept = {}

    def snapshot_base(module):
        load = module.load_model

        def load_and_keep(texts=None):
            load(texts)
            kept.update({n: t.clone() for n, t in module.net.state_dict().items() if "lora_" not in n})
            kept["module"] = module

        module.load_model = load_and_keep

    b, _ = _run(spec(), quickstart, 2, method="untrac", groups=("animals", "cooking"), module_hook=snapshot_base)
    assert a.table.col_ids == b.table.col_ids == ["animals", "cooking"]
    assert torch.allclose(a.table.scores, b.table.scores, atol=1e-6, rtol=0)
    state = kept.pop("module").net.state_dict()
    assert all(torch.equal(state[n], t) for n, t in kept.items())  # the frozen base was never written


def test_a_failed_target_inside_a_chunk_leaves_the_others_intact(tiny_spec, quickstart, one_per_pass):
    reference, _ = one_per_pass
    failing = reference.table.row_ids[1]

    def hook(module):
        original = module.training_step

        def training_step(batch, batch_idx):
            if module.target.id == failing:
                raise NonFiniteLossError(failing, 0, float("nan"))
            return original(batch, batch_idx)

        module.training_step = training_step

    result, _ = _run(tiny_spec(dropout=0.1), quickstart, 4, module_hook=hook)
    assert list(result.failed) == [failing]
    keep = [i for i, rid in enumerate(result.table.row_ids) if rid != failing]
    assert torch.isnan(result.table.scores[1]).all()
    assert torch.allclose(result.table.scores[keep], reference.table.scores[keep], atol=1e-6, rtol=0)


def test_functional_parameter_sets_match_in_place_weights(tiny_spec, quickstart):
    from untrac_pl.models import load_model_and_tokenizer

    texts = [r["text"] for r in quickstart["train"][:20]]
    net, tokenizer = load_model_and_tokenizer(tiny_spec(), texts)
    net.eval()
    enc = tokenizer(texts[:4], return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    theta0 = changed_tensors(net)
    shifted = {n: t + 0.01 * torch.randn_like(t) for n, t in theta0.items()}
    with torch.no_grad():
        rows = losses_with_parameter_sets(net, [theta0, shifted], batch)
        base = model_per_example_loss(net, batch)
        for name, p in net.named_parameters():
            p.copy_(shifted[name])
        moved = model_per_example_loss(net, batch)
    assert rows.shape == (2, 4)
    assert torch.equal(rows[0], base) and torch.allclose(rows[1], moved, atol=1e-6)
