"""The parser of a command whose config is a typed signature, not a LightningModule (reproduce, toxicity, scaling)."""
from __future__ import annotations

import argparse

from jsonargparse import ActionConfigFile, ArgumentParser

from untrac_pl.console import VERBOSE_HELP


def add_verbose_argument(parser) -> None:
    """``--verbose`` in a command's ``--help`` (``untrac_pl.cli.main`` takes it off the arguments first, so it
    never reaches the config: the default is SUPPRESS)."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def command_parser(prog: str, description: str) -> ArgumentParser:
    """``-c config.yaml``, ``--verbose`` and one-line errors (``exit_on_error=False``: untrac_pl.cli.main reports them)."""
    parser = ArgumentParser(prog=prog, exit_on_error=False, description=description)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config file")
    add_verbose_argument(parser)
    return parser
