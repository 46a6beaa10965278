"""``untrac-pl``: LightningCLI front end. ``untrac-pl <command> -c config.yaml [--key value ...]``.

Commands: ``attribute`` (UnTrac / UnTrac-Inv). Each command is a ``LightningCLI`` built with
``run=False``; ``--print_config`` shows every option with its default.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Optional

from lightning.pytorch.cli import LightningCLI

from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.errors import UnTracError
from untrac_pl.unlearning import UnTracModule


class AttributionCLI(LightningCLI):
    """LightningCLI with an ``attribution`` section (method, output directory, top-k, seed)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(AttributionConfig, "attribution")
        parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1, "trainer.logger": True})


def _trainer_kwargs(cli: LightningCLI) -> dict:
    """Instantiated Trainer arguments from the CLI, reused for every per-target Trainer."""
    trainer_cfg = cli.config_init["trainer"]
    kwargs = {k: v for k, v in dict(trainer_cfg).items() if v is not None}
    return kwargs


def attribute(args: Optional[list[str]] = None) -> int:
    """Unlearn targets with UnTrac or UnTrac-Inv and write score files and rankings."""
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    cli = AttributionCLI(
        UnTracModule,
        AttributionDataModule,
        run=False,
        args=args,
        save_config_callback=None,
        subclass_mode_model=False,
        subclass_mode_data=False,
        auto_configure_optimizers=False,
        # exit_on_error=False: a config typo raises ArgumentError, reported by main() in one line
        parser_kwargs={"prog": "untrac-pl attribute", "description": "UnTrac / UnTrac-Inv training-data attribution", "exit_on_error": False},
    )
    config = cli.config_init["attribution"]
    # the resolved config is written inside the run directory before it is renamed into place
    config_text = cli.parser.dump(cli.config, skip_none=False)
    result = run_attribution(cli.model, cli.datamodule, config, _trainer_kwargs(cli), extra_files={"config.yaml": config_text})
    if result.output_dir is not None:  # under DDP only rank 0 writes (and reports)
        print(f"wrote {result.output_dir} ({len(result.table.row_ids)} x {len(result.table.col_ids)} scores, "
              f"{len(result.failed)} failed targets, {result.timings['total_s']:.1f} s)")
    return 1 if result.failed else 0


COMMANDS: dict[str, Callable[[Optional[list[str]]], int]] = {"attribute": attribute}

# (module, command functions) registered when importable; each function takes argv and returns an exit code.
OPTIONAL_COMMANDS = (
    ("untrac_pl.experiments.reproduce_cli", ("fit", "reproduce")),
    ("untrac_pl.experiments.toxicity", ("toxicity",)),
    ("untrac_pl.experiments.scaling", ("scaling",)),
)


def _register_optional_commands() -> None:
    """Commands that live in other modules register themselves here if importable."""
    import importlib

    for module_name, names in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            if hasattr(module, name):
                COMMANDS[name] = getattr(module, name)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _register_optional_commands()
    usage = "usage: untrac-pl {" + ",".join(COMMANDS) + "} [-c CONFIG] [--print_config] [--key value ...]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("\n".join(f"  {name:<10} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}" for name, fn in COMMANDS.items()))
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"untrac-pl: unknown command '{command}'\n{usage}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest) or 0
    except (UnTracError, FileExistsError, ValueError) as exc:
        print(f"untrac-pl {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as exc:  # config typos, wrong types, unknown keys (jsonargparse)
        print(f"untrac-pl {command}: error: {' '.join(str(exc).split())} (see untrac-pl {command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"untrac-pl {command}: interrupted; finished targets are kept: re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
