"""``untrac-pl fit`` (train a causal LM on grouped corpora) and ``untrac-pl reproduce`` (the paper end to end).

Both take ``-c config.yaml``, ``--key value`` overrides and ``--print_config``.
"""
from __future__ import annotations

import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from untrac_pl.lm import CausalLMModule
from untrac_pl.training import FitSpec, LMDataModule


@dataclass
class FitOutput:
    """Where ``untrac-pl fit`` writes: ``<output_dir>/model`` (save_pretrained: loadable by
    ``model.name_or_path``), ``checkpoints/step-N/{model.safetensors,checkpoint.json}``, TensorBoard logs."""

    output_dir: str = "runs/fit"
    overwrite: bool = False


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(FitSpec, "fit")
        parser.add_class_arguments(FitOutput, "output")
        parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1})


def fit(argv: Optional[list[str]] = None) -> int:
    """Train a causal LM (from scratch or fine-tuning) on grouped corpora; checkpoints with lr."""
    import json

    from lightning.pytorch.loggers import TensorBoardLogger

    from untrac_pl.io import write_json_atomic
    from untrac_pl.lm import example_losses
    from untrac_pl.training import fit_lm, save_weights

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    cli = FitCLI(CausalLMModule, LMDataModule, run=False, args=argv, save_config_callback=None,
                 subclass_mode_model=False, subclass_mode_data=False, auto_configure_optimizers=False,
                 parser_kwargs={"prog": "untrac-pl fit", "description": "Train a causal LM on grouped corpora"})
    spec: FitSpec = cli.config_init["fit"]
    out = cli.config_init["output"]
    out_dir = Path(out.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not out.overwrite:
        raise FileExistsError(f"output directory '{out_dir}' exists; set --output.overwrite true or choose another")
    module, dm = cli.model, cli.datamodule
    module.load_model(dm.all_texts())
    corpus = dm.tokenize(module.tokenizer)
    trainer_kwargs = {k: v for k, v in dict(cli.config_init["trainer"]).items() if v is not None}
    logger = TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="", default_hp_metric=False)
    info = fit_lm(module, corpus, spec, trainer_kwargs, logger=logger, checkpoint_dir=out_dir / "checkpoints")
    module.net.save_pretrained(out_dir / "model")
    module.tokenizer.save_pretrained(out_dir / "model")
    save_weights(module.net, out_dir / "final" / "model.safetensors")
    # the lr the last step used (with a decaying schedule it is far below the base lr; TracIn weights by it)
    write_json_atomic(out_dir / "final" / "checkpoint.json", {"step": info["steps"], "lr": info["last_lr"], "seed": spec.seed, "excluded_groups": spec.exclude_groups})
    losses = example_losses(module.net, corpus.examples, module.tokenizer.pad_token_id)
    per_group = {g: float(losses[idx].mean()) for g, idx in corpus.group_members().items()}
    write_json_atomic(out_dir / "fit_summary.json", {**info, "train_loss_per_group": per_group, "num_examples": len(corpus)})
    (out_dir / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False))
    print(f"wrote {out_dir} ({info['steps']} steps in {info['seconds']:.1f} s, final loss {info['final_train_loss']:.3f}); "
          f"per-group train loss: " + json.dumps({g: round(v, 3) for g, v in per_group.items()}))
    return 0


def reproduce_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from untrac_pl.experiments.reproduce import ReproduceConfig

    parser = ArgumentParser(prog="untrac-pl reproduce", description="Reproduce the paper's experiments end to end (training, "
                            "leave-group-out ground truth, UnTrac / UnTrac-Inv, correlations, tables, figures)")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config")
    parser.add_class_arguments(ReproduceConfig, "reproduce", as_group=True)
    parser.add_argument("--trainer", type=dict, default={}, help="extra Trainer keyword arguments (accelerator, precision, ...)")
    return parser


def reproduce(argv: Optional[list[str]] = None) -> int:
    """Reproduce the paper end to end: train, leave-group-out GT, UnTrac(-Inv), correlations, report."""
    from untrac_pl.experiments.reproduce import reproduce as run

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = reproduce_parser()
    cfg = parser.parse_args(_nest(argv))
    init = parser.instantiate_classes(cfg)
    command = "untrac-pl reproduce " + " ".join(shlex.quote(a) for a in argv)
    written = run(init.reproduce, command=command, trainer_kwargs=dict(init.trainer or {}))
    print(f"wrote {written['markdown']}, {written['metrics']} and {len(written['figures'])} figure(s)")
    return 0


def _nest(argv: list[str]) -> list[str]:
    """Let users write ``--seeds ...`` for ``--reproduce.seeds ...`` (config files stay flat too)."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith(("--reproduce.", "--trainer", "--config", "--print_config", "--help")) and a not in ("--",):
            a = "--reproduce." + a[2:]
        out.append(a)
    return out
