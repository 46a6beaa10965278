"""``untrac-pl fit -c config.yaml``: train a causal LM on grouped corpora (θ0 for attribution, TracIn's checkpoints).

The config: ``model`` (:class:`~untrac_pl.lm.CausalLMModule`), ``data``
(:class:`~untrac_pl.training.LMDataModule`), ``fit`` (:class:`~untrac_pl.training.FitSpec`: steps, batch
size, checkpoint steps, seed), ``output`` (:class:`FitOutput`) and ``trainer`` (Trainer arguments for
:func:`~untrac_pl.training.fit_lm`'s Trainer).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lightning.pytorch.loggers import TensorBoardLogger

from untrac_pl.cli._lightning import KwargsTrainerCLI
from untrac_pl.cli._report import FIT_DESCRIPTIONS, files_block, tensorboard_line
from untrac_pl.console import no_transformers_bars
from untrac_pl.io import write_json_atomic
from untrac_pl.lm import CausalLMModule, example_losses
from untrac_pl.training import FitSpec, LMDataModule, fit_lm, save_weights


@dataclass
class FitOutput:
    """Where ``untrac-pl fit`` writes: ``<output_dir>/model`` (save_pretrained: loadable by
    ``model.name_or_path``), ``checkpoints/step-N/{model.safetensors,checkpoint.json}``, TensorBoard logs."""

    output_dir: str = "runs/fit"
    overwrite: bool = False


class FitCLI(KwargsTrainerCLI):
    """The LightningCLI of ``fit``: model, data, trainer, ``fit`` and ``output`` sections."""

    def add_tool_arguments(self, parser) -> None:
        parser.add_class_arguments(FitSpec, "fit")
        parser.add_class_arguments(FitOutput, "output")

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1})


def main(argv: Optional[list[str]] = None) -> int:
    """Train a causal LM (from scratch or fine-tuning) on grouped corpora; checkpoints with lr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli = FitCLI(CausalLMModule, LMDataModule, argv, prog="untrac-pl fit", description="Train a causal LM on grouped corpora")
    spec: FitSpec = cli.config_init["fit"]
    out: FitOutput = cli.config_init["output"]
    out_dir = Path(out.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not out.overwrite:
        raise FileExistsError(f"output directory '{out_dir}' exists; set --output.overwrite true or choose another")
    module, dm = cli.model, cli.datamodule
    module.load_model(dm.all_texts())
    corpus = dm.tokenize(module.tokenizer)
    logger = TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="", default_hp_metric=False)
    info = fit_lm(module, corpus, spec, cli.trainer_kwargs, logger=logger, checkpoint_dir=out_dir / "checkpoints")
    with no_transformers_bars():
        module.net.save_pretrained(out_dir / "model")
        module.tokenizer.save_pretrained(out_dir / "model")
    save_weights(module.net, out_dir / "final" / "model.safetensors")
    # the lr the last step used (with a decaying schedule it is far below the base lr; TracIn weights by it)
    write_json_atomic(out_dir / "final" / "checkpoint.json", {"step": info["steps"], "lr": info["last_lr"], "seed": spec.seed, "excluded_groups": spec.exclude_groups})
    losses = example_losses(module.net, corpus.examples, module.tokenizer.pad_token_id)
    per_group = {g: float(losses[idx].mean()) for g, idx in corpus.group_members().items()}
    write_json_atomic(out_dir / "fit_summary.json", {**info, "train_loss_per_group": per_group, "num_examples": len(corpus)})
    (out_dir / "config.yaml").write_text(cli.config_text())
    print(f"untrac-pl fit: {info['steps']} steps in {info['seconds']:.1f} s, final loss {info['final_train_loss']:.3f}; "
          f"per-group train loss: " + json.dumps({g: round(v, 3) for g, v in per_group.items()}))
    board = tensorboard_line(out_dir)
    print("\n".join(["", *files_block(out_dir, FIT_DESCRIPTIONS), *(["", board] if board else [])]))
    return 0
