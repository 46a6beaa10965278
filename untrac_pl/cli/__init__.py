"""``untrac-pl``: the command line. ``untrac-pl <command> -c config.yaml [--key value ...]``.

One module per command, ``untrac_pl/cli/<command>.py``, each with ``main(argv) -> int`` and its config
classes; ``untrac-pl <command> --print_config`` shows every option with its default. ``attribute`` and
``fit`` are LightningCLIs (a LightningModule, a LightningDataModule and the ``trainer:`` arguments, which
go to the engine's own Trainers), ``reproduce``, ``toxicity`` and ``scaling`` plain typed jsonargparse
parsers. This root parser imports neither torch nor Lightning (``untrac-pl --help`` and ``--version``
answer at once); a command's module is imported when the command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from untrac_pl import __version__
from untrac_pl.errors import UnTracError

#: command -> its one-line description, for ``untrac-pl --help`` without importing the command (each is
#: the first line of ``untrac_pl.cli.<command>.main.__doc__``; tests/test_cli.py checks they agree)
COMMANDS: dict[str, str] = {
    "attribute": "Unlearn targets with UnTrac or UnTrac-Inv and write score files and rankings.",
    "fit": "Train a causal LM (from scratch or fine-tuning) on grouped corpora; checkpoints with lr.",
    "reproduce": "Reproduce the paper end to end: train, leave-group-out GT, UnTrac(-Inv), correlations, report.",
    "toxicity": "Generate from toxicity prompts and attribute each completion (the seed's experiment).",
    "scaling": "Run the same attribution across model sizes; record parameters, runtime and peak memory.",
}


def root_parser() -> argparse.ArgumentParser:
    """``untrac-pl [--version] <command> [args ...]``; the command's own parser reads ``args``."""
    listing = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="untrac-pl",
        usage="untrac-pl [-h] [--version] {" + ",".join(COMMANDS) + "} [-c CONFIG] [--print_config] [--key value ...]",
        description="UnTrac and UnTrac-Inv training-data attribution (Isonuma & Titov, ACL 2024) on PyTorch Lightning.",
        epilog=f"commands:\n{listing}\n\n'untrac-pl <command> --help' lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"untrac-pl {__version__}")
    # the commands are listed in the epilog, with their descriptions
    parser.add_argument("command", choices=list(COMMANDS), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``untrac-pl <command> ...`` (``argv`` defaults to ``sys.argv[1:]``); returns the exit status. Input errors
    are reported in one line, ``untrac-pl <command>: error: ...``, with status 2; an interrupt has status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = root_parser()
    if not argv:
        parser.print_help()
        return 0
    try:
        parsed = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or an unknown command (2, after argparse's message)
        return exc.code if isinstance(exc.code, int) else 0
    command = parsed.command
    rest = argv[argv.index(command) + 1:]  # verbatim (argparse would drop a '--')
    try:
        # lazy: each command pulls in torch, Lightning and transformers; only the one that runs is imported
        module = importlib.import_module(f"untrac_pl.cli.{command}")
        return module.main(rest) or 0
    except (UnTracError, FileExistsError, ValueError) as exc:
        print(f"untrac-pl {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as exc:  # config typos, wrong types, unknown keys (jsonargparse)
        print(f"untrac-pl {command}: error: {' '.join(str(exc).split())} (see untrac-pl {command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"untrac-pl {command}: interrupted; finished targets are kept: re-run the same command to resume", file=sys.stderr)
        return 130
