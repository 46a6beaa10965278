"""``untrac-pl reproduce -c configs/reproduce_synthetic.yaml [--num_seeds 1] [--output_dir DIR]``: the paper end to end.

The config is :class:`~untrac_pl.experiments.reproduce.ReproduceConfig`, its fields at the top level (in
YAML ``seeds: [0, 1]``, on the command line ``--seeds [0,1]``, ``--fit.max_steps 80``), plus ``trainer``:
extra Trainer keyword arguments (accelerator, precision, ...) for every run of the reproduction.
"""
from __future__ import annotations

import shlex
import sys
from argparse import ArgumentError
from dataclasses import fields
from typing import Optional

from jsonargparse import ArgumentParser

from untrac_pl.cli._plain import command_parser
from untrac_pl.cli._report import reproduce_report
from untrac_pl.cli._suggest import with_suggestion
from untrac_pl.experiments.reproduce import ReproduceConfig, reproduce


def parser() -> ArgumentParser:
    """``reproduce``'s parser: ``-c``, every ReproduceConfig field, ``--trainer``."""
    parser = command_parser("untrac-pl reproduce", "Reproduce the paper's experiments end to end (training, leave-group-out ground truth, "
                            "UnTrac / UnTrac-Inv, correlations, tables, figures)")
    parser.add_class_arguments(ReproduceConfig, None, as_group=True)
    parser.add_argument("--trainer", type=dict, default={}, help="extra Trainer keyword arguments (accelerator, precision, ...)")
    return parser


def parse(argv: list[str]) -> tuple[ReproduceConfig, dict]:
    """The reproduction and the extra Trainer arguments that ``argv`` (``-c FILE``, ``--key value``) describes."""
    p = parser()
    try:
        parsed = p.parse_args(argv)
    except ArgumentError as exc:
        if "'reproduce." in str(exc):  # a config of the earlier layout, whose fields sat under `reproduce:`
            raise ArgumentError(None, f"{exc}; the fields of a reproduce config are top-level keys: remove the "
                                "'reproduce:' line and dedent the rest") from None
        raise with_suggestion(exc, p) from None
    init = p.instantiate(parsed)
    config = ReproduceConfig(**{f.name: init[f.name] for f in fields(ReproduceConfig)})
    return config, dict(init.trainer or {})


def main(argv: Optional[list[str]] = None) -> int:
    """Reproduce the paper end to end: train, leave-group-out GT, UnTrac(-Inv), correlations, report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, trainer_kwargs = parse(argv)
    command = "untrac-pl reproduce " + " ".join(shlex.quote(a) for a in argv)
    written = reproduce(config, command=command, trainer_kwargs=trainer_kwargs)
    print(reproduce_report(written, log_dir=config.log_dir), flush=True)
    return 0
