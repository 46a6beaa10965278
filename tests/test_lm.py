"""Causal-LM training: mixture sampling, equal step counts, checkpoints with lr, determinism, `untrac-pl fit`."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2_config

from untrac_pl.data.tokenize import tokenize_records
from untrac_pl.lm import CausalLMModule, example_losses, lr_factor
from untrac_pl.models import ModelSpec, load_model_and_tokenizer
from untrac_pl.training import (
    FitSpec,
    MixtureBatchSampler,
    block_records,
    fit_lm,
    load_weights,
    mixture_dataloader,
    read_checkpoints,
)

# the four training tasks of synthetic dataset A, 8 records each
SYNTHETIC_A_8 = "[{format: generated, generator: synthetic, split: train, options: {dataset: A, n_per_task: 8}}]"


def test_mixture_sampler_exact_steps_exclusion_and_determinism():
    allowed = [0, 1, 2, 5, 6]
    a = MixtureBatchSampler(allowed, batch_size=3, num_steps=7, seed=1)
    b = MixtureBatchSampler(allowed, batch_size=3, num_steps=7, seed=1)
    assert len(a) == 7 and list(a) == list(b)
    assert all(len(batch) == 3 and set(batch) <= set(allowed) for batch in a)
    assert list(MixtureBatchSampler(allowed, 3, 7, seed=2)) != list(a)


@pytest.fixture(scope="module")
def toy(quickstart):
    spec = ModelSpec(config=tiny_gpt2_config(0.0), train_tokenizer_vocab=300, init_seed=0)
    texts = [r["text"] for r in quickstart["train"]]
    net, tok = load_model_and_tokenizer(spec, texts)
    corpus = tokenize_records(quickstart["train"], tok, 48, "train")
    return spec, net, tok, corpus


def _fit(toy, tmp_path, **kw):
    spec, net, tok, corpus = toy
    net = type(net)(net.config)
    torch.manual_seed(0)
    net.load_state_dict(toy[1].state_dict())
    module = CausalLMModule(model=spec)
    module.attach(net, tok)
    fit_spec = FitSpec(max_steps=8, batch_size=4, seed=3, checkpoint_steps=[4, 8], **kw)
    info = fit_lm(module, corpus, fit_spec, {"accelerator": "cpu"}, checkpoint_dir=tmp_path / "ckpt")
    return module, info


def test_fit_same_steps_when_a_group_is_left_out_and_checkpoints_record_lr(toy, tmp_path):
    full, info_full = _fit(toy, tmp_path / "full")
    loo, info_loo = _fit(toy, tmp_path / "loo", exclude_groups=["insults"])
    assert info_full["steps"] == info_loo["steps"] == 8
    ckpts = read_checkpoints(tmp_path / "full" / "ckpt")
    assert [lr for _, lr in ckpts] == [pytest.approx(1e-3)] * 2
    meta = json.loads((tmp_path / "full" / "ckpt" / "step-8" / "checkpoint.json").read_text())
    assert meta["step"] == 8 and meta["lr"] == pytest.approx(1e-3)
    # the last checkpoint holds the final weights
    probe = type(full.net)(full.net.config)
    load_weights(probe, ckpts[-1][0])
    for (n, p), (_, q) in zip(full.net.state_dict().items(), probe.state_dict().items()):
        assert torch.equal(p, q), n
    # the left-out group's examples never appear in its batches
    _, _, _, corpus = toy
    loader = mixture_dataloader(corpus, FitSpec(max_steps=8, batch_size=4, seed=3, exclude_groups=["insults"]), 0)
    groups = {corpus.records[int(i)]["group"] for batch in loader for i in batch["index"]}
    assert "insults" not in groups


def test_fit_is_deterministic_and_lowers_loss(toy, tmp_path):
    a, _ = _fit(toy, tmp_path / "a")
    b, _ = _fit(toy, tmp_path / "b")
    for (n, p), (_, q) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(p, q), n
    corpus = toy[3]
    before = example_losses(toy[1], corpus.examples, toy[2].pad_token_id).mean()
    after = example_losses(a.net, corpus.examples, toy[2].pad_token_id).mean()
    assert after < before


def test_block_records_splits_long_documents(tiny_tokenizer):
    doc = " ".join(["the quick fox runs across the meadow"] * 20)
    out = block_records([{"id": "d", "group": "g", "text": doc}, {"id": "p", "group": "g", "prompt": "a", "completion": " b"}], tiny_tokenizer, 16)
    assert len(out) > 3 and out[0]["id"] == "d#0" and all(r["group"] == "g" for r in out)
    assert out[-1]["id"] == "p"


def test_fit_cli_trains_and_saves(tmp_path, capsys):
    from untrac_pl.cli import main

    out = tmp_path / "fit"
    argv = ["fit", "--data.train", SYNTHETIC_A_8, "--data.max_length", "48",
            "--model.model.config", json.dumps(tiny_gpt2_config(0.0)), "--model.model.train_tokenizer_vocab", "300",
            "--fit.max_steps", "4", "--fit.batch_size", "2", "--fit.checkpoint_steps", "[2, 4]",
            "--output.output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    assert main(argv) == 0
    assert (out / "model" / "config.json").exists() and (out / "checkpoints" / "step-4" / "model.safetensors").exists()
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["train_loss_per_group"]) == {"task1", "task2", "task3", "task4"}
    # the final checkpoint records the lr its last step used (TracIn's weight), like the step checkpoints
    final = json.loads((out / "final" / "checkpoint.json").read_text())
    step4 = json.loads((out / "checkpoints" / "step-4" / "checkpoint.json").read_text())
    assert final["step"] == 4 and final["lr"] == step4["lr"]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config"])
    assert exc.value.code == 0
    assert "max_steps" in capsys.readouterr().out


def test_fit_cli_records_the_last_steps_decayed_lr_and_refuses_trainer_max_steps(tmp_path, capsys):
    from untrac_pl.cli import main

    out = tmp_path / "fit"
    argv = ["fit", "--data.train", SYNTHETIC_A_8, "--data.max_length", "48",
            "--model.model.config", json.dumps(tiny_gpt2_config(0.0)), "--model.model.train_tokenizer_vocab", "300",
            "--model.lr_schedule", "linear", "--model.optimizer.lr", "1e-3",
            "--fit.max_steps", "4", "--fit.batch_size", "2", "--output.output_dir", str(out),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    assert main(argv) == 0
    final = json.loads((out / "final" / "checkpoint.json").read_text())
    assert final["step"] == 4 and final["lr"] == pytest.approx(1e-3 * lr_factor(3, "linear", 0, 4))  # not the base 1e-3
    assert final["lr"] < 1e-3
    capsys.readouterr()
    other = [a if a != str(out) else str(tmp_path / "other") for a in argv]
    assert main(other + ["--trainer.max_steps", "2000"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps=2000" in err and "fit.max_steps" in err and not (tmp_path / "other" / "model").exists()


def test_losses_build_no_key_value_cache_and_equal_the_cached_forward(toy):
    """Every loss forward (direct, functional_call per-example gradients, vmap parallel targets) asks a
    Hugging Face LM for no cache (it costs every ascent step); the losses are the default forward's."""
    from untrac_pl.baselines.gradients import batch_losses
    from untrac_pl.data.collate import PadCollator
    from untrac_pl.losses import lm_inputs, model_losses, per_example_loss
    from untrac_pl.parallel import parallel_step_losses, stack_trainable

    _, net, tok, _ = toy
    net.eval()
    assert net.config.use_cache is True  # the default this guards against
    records = tokenize_records([{"id": "a", "group": "g", "text": "the cat sat on the mat"},
                                {"id": "b", "group": "g", "text": "a dog"}], tok, 16, "train")
    batch = PadCollator(tok.pad_token_id)(records.examples)
    seen = []
    original = net.forward
    net.forward = lambda **kw: seen.append(kw.get("use_cache")) or original(**kw)
    try:
        with torch.no_grad():
            losses = {r: model_losses(net, batch, r) for r in ("example_mean", "token_mean")}
            functional = batch_losses(net, dict(net.named_parameters()), batch)  # functional_call runs the instance's forward
            two = {k: torch.stack([batch[k], batch[k]]) for k in ("input_ids", "labels")}
            two.update(denominator=torch.tensor([2.0, 2.0]), micro_batches=torch.tensor([1.0, 1.0]))
            parallel_step_losses(net, stack_trainable(net, 2), two)
            cached = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    finally:
        del net.forward
    assert seen == [False, False, False, False]
    assert cached.past_key_values is not None
    torch.testing.assert_close(losses["token_mean"][0], cached.loss, rtol=0, atol=0)
    want = per_example_loss(cached.logits, batch["labels"])
    torch.testing.assert_close(losses["example_mean"], want, rtol=0, atol=0)
    torch.testing.assert_close(functional, want)

    class NoCacheArgument(torch.nn.Module):  # a custom LM with a config but no use_cache argument
        config = net.config

        def forward(self, input_ids, attention_mask):
            return input_ids

    assert "use_cache" not in lm_inputs(NoCacheArgument(), batch)
