"""``untrac-pl scaling -c configs/scaling.yaml``: the same attribution across model sizes.

The config is :class:`~untrac_pl.experiments.scaling.ScalingExperimentConfig`, its fields at the top level
(``models_to_test``, ``sample_size``, ``untrac``, ``output_dir``, ...); the run is
:class:`~untrac_pl.experiments.scaling.ScalingExperiment`, then its plot.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

from untrac_pl.cli._plain import command_parser
from untrac_pl.cli._suggest import parse_args
from untrac_pl.experiments.scaling import (
    RESULTS_FILE,
    ScalingExperiment,
    ScalingExperimentConfig,
)
from untrac_pl.vocabulary import UNTRAC_SECTION, speaking


def parser() -> ArgumentParser:
    """``scaling``'s parser: ``-c`` and every ScalingExperimentConfig field."""
    parser = command_parser("untrac-pl scaling", "Scaling experiment: the same UnTrac-Inv attribution across a list of models")
    parser.add_class_arguments(ScalingExperimentConfig, None, as_group=True)
    return parser


def parse(argv: list[str]) -> ScalingExperimentConfig:
    p = parser()
    init = p.instantiate(parse_args(p, argv))
    return ScalingExperimentConfig(**{f.name: init[f.name] for f in fields(ScalingExperimentConfig)})


def main(argv: Optional[list[str]] = None) -> int:
    """Run the same attribution across model sizes; record parameters, runtime and peak memory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse(argv)
    command = "untrac-pl scaling " + " ".join(shlex.quote(a) for a in argv)
    experiment = ScalingExperiment(config, command=command)
    with speaking(UNTRAC_SECTION):  # warnings name untrac.* keys (not UnTracConfig's Python fields)
        results = experiment.run_scaling_experiment()
    plot = experiment.plot_results()
    summary = results["summary"]
    print(f"wrote {Path(config.output_dir) / RESULTS_FILE}{' and ' + str(plot) if plot else ''} "
          f"({summary['successful_models']}/{summary['total_models_tested']} models succeeded)")
    for row in summary["comparison"]:
        print(f"  {row['model']:<24} {row['parameters']:>13,} params  {row['runtime_seconds'] or float('nan'):8.2f} s  {row['memory_gb'] or float('nan'):7.3f} GiB")
    return 0 if summary["successful_models"] == summary["total_models_tested"] else 1
