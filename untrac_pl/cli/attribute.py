"""``untrac-pl attribute -c config.yaml``: UnTrac / UnTrac-Inv (and the baselines) through the engine.

The config is the typed signature of four classes: ``attribution``
(:class:`~untrac_pl.engine.AttributionConfig`: method, output directory, top-k, ...), ``model``
(:class:`~untrac_pl.unlearning.UnTracModule`), ``data``
(:class:`~untrac_pl.data.datamodule.AttributionDataModule`) and ``trainer`` (Trainer arguments, from which
the engine builds one Trainer per target).
"""
from __future__ import annotations

import shlex
import sys
from typing import Optional

from untrac_pl.cli._lightning import KwargsTrainerCLI
from untrac_pl.cli._report import attribution_report
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.methods import methods_help
from untrac_pl.outputs import CONFIG
from untrac_pl.unlearning import UnTracModule


class AttributionCLI(KwargsTrainerCLI):
    """The LightningCLI of ``attribute``: model, data, trainer and an ``attribution`` section."""

    def add_tool_arguments(self, parser) -> None:
        parser.add_class_arguments(AttributionConfig, "attribution")

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1, "trainer.logger": True})


def main(argv: Optional[list[str]] = None) -> int:
    """Unlearn targets with UnTrac or UnTrac-Inv and write score files and rankings."""
    cli = AttributionCLI(UnTracModule, AttributionDataModule, argv, prog="untrac-pl attribute",
                         description="UnTrac / UnTrac-Inv training-data attribution", epilog=methods_help())
    config: AttributionConfig = cli.config_init["attribution"]
    # the resolved config is written inside the run directory before it is renamed into place
    command = "untrac-pl attribute " + shlex.join(sys.argv[1:] if argv is None else argv)  # recorded in summary.json
    result = run_attribution(cli.model, cli.datamodule, config, cli.trainer_kwargs, extra_files={CONFIG: cli.config_text()}, command=command)
    if result.output_dir is not None:  # under DDP only rank 0 writes (and reports)
        print(attribution_report(result))  # the findings, the files, the TensorBoard command
    return 1 if result.failed else 0
