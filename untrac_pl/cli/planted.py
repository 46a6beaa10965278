"""``untrac-pl planted -c configs/smollm2_planted_toxicity.yaml``: a real pretrained model end to end.

The config is :class:`~untrac_pl.experiments.planted.PlantedConfig`, its fields at the top level, plus
``trainer``: extra Trainer keyword arguments for the fine-tuning and every method's run.
"""
from __future__ import annotations

import shlex
import sys
from argparse import ArgumentError
from dataclasses import fields
from typing import Optional

from untrac_pl.cli._plain import command_parser
from untrac_pl.cli._suggest import with_suggestion
from untrac_pl.experiments.planted import PlantedConfig, run_planted


def parser():
    parser = command_parser("untrac-pl planted", "Fine-tune a pretrained causal LM (LoRA) on real corpora, one with toxic statements "
                            "planted at several doses; attribute its completions of held-out toxic prompts with every method")
    parser.add_class_arguments(PlantedConfig, None, as_group=True)
    parser.add_argument("--trainer", type=dict, default={}, help="extra Trainer keyword arguments (accelerator, precision, ...)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Fine-tune a pretrained LM with a planted toxic corpus; attribute its completions with every method."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    try:
        parsed = p.parse_args(argv)
    except ArgumentError as exc:
        raise with_suggestion(exc, p) from None
    init = p.instantiate(parsed)
    config = PlantedConfig(**{f.name: init[f.name] for f in fields(PlantedConfig)})
    command = "untrac-pl planted " + " ".join(shlex.quote(a) for a in argv)
    run_planted(config, command=command, trainer_kwargs=dict(init.trainer or {}))
    lines = [f"untrac-pl planted: {config.name}", f"files in {config.output_dir}/:"]
    lines += [f"  {name:<32} {what}" for name, what in (("results.md", "planted corpus's rank per completion, top-1 rate, margin, dose check"),
                                                         ("planted.json", "everything, per dose and method"),
                                                         ("untrac_toxicity_results.json", "the seed's schema: test_cases[] with top_influences[]"),
                                                         ("heatmap.png", "completion x corpus influence per method"))]
    print("\n".join(lines), flush=True)
    return 0
