"""``untrac-pl toxicity -c configs/toxicity.yaml``: generate from toxicity prompts, attribute each completion.

The config has two sections: ``untrac`` (:class:`~untrac_pl.compat.UnTracConfig`: model, ascent, sample
sizes) and ``experiment`` (:class:`~untrac_pl.experiments.toxicity.ToxicityExperimentConfig`: data
sources, generation, classifier, output directory); the run is
:class:`~untrac_pl.experiments.toxicity.ToxicityAttributionExperiment`.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

from untrac_pl.cli._plain import command_parser
from untrac_pl.cli._report import toxicity_report
from untrac_pl.cli._suggest import parse_args
from untrac_pl.compat import UnTracConfig
from untrac_pl.experiments.toxicity import (
    RESULTS_FILE,
    ToxicityAttributionExperiment,
    ToxicityExperimentConfig,
)
from untrac_pl.vocabulary import UNTRAC_SECTION, speaking


def parser() -> ArgumentParser:
    """``toxicity``'s parser: ``-c``, ``untrac.*``, ``experiment.*``."""
    parser = command_parser("untrac-pl toxicity", "Toxicity attribution: generate a completion per prompt, attribute it with UnTrac-Inv")
    parser.add_class_arguments(UnTracConfig, "untrac")
    parser.add_class_arguments(ToxicityExperimentConfig, "experiment")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Generate from toxicity prompts and attribute each completion (the seed's experiment)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    init = p.instantiate(parse_args(p, argv))
    command = "untrac-pl toxicity " + " ".join(shlex.quote(a) for a in argv)
    experiment = ToxicityAttributionExperiment(init.untrac, init.experiment, command=command)
    with speaking(UNTRAC_SECTION):  # warnings name untrac.* keys (not UnTracConfig's Python fields)
        results = experiment.run_experiment()
    path = Path(init.experiment.output_dir) / RESULTS_FILE
    print(toxicity_report(results, path), flush=True)
    return 1 if results["failed_targets"] else 0
