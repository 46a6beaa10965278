"""``untrac-pl``: the command line. ``untrac-pl <command> -c config.yaml [--key value ...]``.

One module per command, ``untrac_pl/cli/<command>.py``, each with ``main(argv) -> int`` and its config
classes; ``untrac-pl <command> --print_config`` shows every option with its default. ``attribute`` and
``fit`` are LightningCLIs (a LightningModule, a LightningDataModule and the ``trainer:`` arguments, which
go to the engine's own Trainers), ``reproduce``, ``toxicity``, ``scaling`` and ``planted`` plain typed jsonargparse
parsers. This root parser imports neither torch nor Lightning (``untrac-pl --help`` and ``--version``
answer at once); a command's module is imported when the command runs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import sys
from typing import Optional

from untrac_pl import __version__
from untrac_pl.console import VERBOSE_HELP, quiet_command, stderr_is_terminal
from untrac_pl.errors import UnTracError
from untrac_pl.vocabulary import CLI, speaking

#: command -> its one-line description, for ``untrac-pl --help`` without importing the command (each is
#: the first line of ``untrac_pl.cli.<command>.main.__doc__``; tests/test_cli.py checks they agree)
COMMANDS: dict[str, str] = {
    "attribute": "Unlearn targets with UnTrac or UnTrac-Inv and write score files and rankings.",
    "fit": "Train a causal LM (from scratch or fine-tuning) on grouped corpora; checkpoints with lr.",
    "reproduce": "Reproduce the paper end to end: train, leave-group-out GT, UnTrac(-Inv), correlations, report.",
    "toxicity": "Generate from toxicity prompts and attribute each completion (the seed's experiment).",
    "scaling": "Run the same attribution across model sizes; record parameters, runtime and peak memory.",
    "planted": "Fine-tune a pretrained LM with a planted toxic corpus; attribute its completions with every method.",
}

#: the LightningCLI commands, whose keys are the CLI vocabulary's (untrac_pl.vocabulary.CLI: model.model.*, attribution.*)
LIGHTNING_COMMANDS = ("attribute", "fit")


def root_parser() -> argparse.ArgumentParser:
    """``untrac-pl [--version] <command> [args ...]``; the command's own parser reads ``args``."""
    listing = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="untrac-pl",
        usage="untrac-pl [-h] [--version] [--verbose] {" + ",".join(COMMANDS) + "} [-c CONFIG] [--print_config] [--key value ...]",
        description="UnTrac and UnTrac-Inv training-data attribution (Isonuma & Titov, ACL 2024) on PyTorch Lightning.",
        epilog=f"commands:\n{listing}\n\n'untrac-pl <command> --help' lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"untrac-pl {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + " (before or after the command)")
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
    rest, verbose = _without_verbose(argv[argv.index(command) + 1:])  # verbatim (argparse would drop a '--')
    verbose = verbose or parsed.verbose
    if stderr_is_terminal():
        # a first line at once (for --help and --print_config too: stderr, stdout stays clean): importing
        # torch, Lightning and transformers takes seconds
        print(f"untrac-pl {command}: loading ...", file=sys.stderr, flush=True)
    try:
        # Lightning's banners and tips off unless --verbose; errors name attribute's / fit's flags (--model.model.config)
        with quiet_command(verbose), (speaking(CLI) if command in LIGHTNING_COMMANDS else contextlib.nullcontext()):
            # lazy: each command pulls in torch, Lightning and transformers; only the one that runs is imported
            module = importlib.import_module(f"untrac_pl.cli.{command}")
            return module.main(rest) or 0
    except (UnTracError, FileExistsError, ValueError) as exc:
        print(f"untrac-pl {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as exc:  # config typos, wrong types, unknown keys (jsonargparse)
        message = " ".join(str(exc).split())
        see = "" if "(did you mean" in message else f" (see untrac-pl {command} --help)"
        print(f"untrac-pl {command}: error: {message}{see}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.__context__, KeyboardInterrupt):
            raise  # --help, --print_config; Lightning's sys.exit(1) after a Ctrl-C is an interrupt
        # attribute: UnTrac / UnTrac-Inv keep their finished targets (the line above says how many); a
        # one-pass baseline keeps nothing, and the same command simply runs it again
        what = {"attribute": "to go on, run the same command again (finished targets, if any were kept, are reused)",
                "reproduce": "to resume"}.get(command, "to run it again")
        print(f"untrac-pl {command}: interrupted; {what}:\n  {resume_command(command, argv)}", file=sys.stderr)
        return 130


def _without_verbose(args: list[str]) -> tuple[list[str], bool]:
    """``args`` without ``--verbose`` (a command accepts it anywhere before a ``--``) and whether it was there."""
    end = args.index("--") if "--" in args else len(args)
    kept = [a for a in args[:end] if a != "--verbose"] + args[end:]
    return kept, len(kept) != len(args)


#: what an interrupted command needs added to go on: reproduce reuses finished seeds only with --resume true;
#: fit starts over in its (now non-empty) output directory
RESUME_FLAGS = {"reproduce": ("--resume", "true"), "fit": ("--output.overwrite", "true")}


def resume_command(command: str, argv: list[str]) -> str:
    """The command line that goes on after an interrupt (``attribute``: the same one, its finished targets are kept)."""
    argv = list(argv)
    flag = RESUME_FLAGS.get(command)
    if flag and not any(a == flag[0] or a.startswith(flag[0] + "=") for a in argv):
        argv += list(flag)
    return "untrac-pl " + shlex.join(argv)
