"""The LightningCLI that ``attribute`` and ``fit`` share: it parses the ``trainer:`` group but builds no Trainer.

The engine builds its own Trainer per target (``fit``: one per training run) from those arguments, so the
Trainer that ``LightningCLI(run=False)`` would instantiate (accelerator and logger set up for nothing)
is skipped: :meth:`KwargsTrainerCLI.instantiate_trainer` keeps the instantiated ``trainer:`` arguments
(callbacks, logger, plugins already built by jsonargparse) as :attr:`KwargsTrainerCLI.trainer_kwargs`.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from argparse import ArgumentError
from typing import Any, Optional

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from untrac_pl.cli._plain import add_verbose_argument
from untrac_pl.cli._suggest import with_suggestion
from untrac_pl.console import is_verbose


class RawDescriptionDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with the description and epilog kept as written (the method list)."""


# list-valued data-source options: a list given on the command line replaces the config's list
SOURCE_LISTS = ("data.train", "data.queries")


def replace_source_lists(args: Optional[list[str]]) -> Optional[list[str]]:
    """``--data.train=[...]`` after ``-c config.yaml`` replaces the config's sources (jsonargparse would merge
    a list of the same length item by item, e.g. a file path into the config's generated source): each such
    option is preceded by ``--data.train=null``, which resets the list first."""
    if args is None:
        return None
    out: list[str] = []
    for arg in args:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in SOURCE_LISTS and not (out and out[-1] == f"--{key}=null") and arg != f"--{key}=null":
            out.append(f"--{key}=null")
        out.append(arg)
    return out


class KwargsTrainerCLI(LightningCLI):
    """``LightningCLI(run=False)`` for one model class and one datamodule class, with ``trainer_kwargs``
    instead of ``trainer``; parse errors raise ``ArgumentError`` (``untrac_pl.cli.main`` reports them in one line)."""

    trainer_kwargs: dict[str, Any]

    def __init__(self, model_class, datamodule_class, args: Optional[list[str]], prog: str, description: str, epilog: Optional[str] = None) -> None:
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        seed_logger = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to 0" before every run or error
        level = seed_logger.level
        if not is_verbose():  # untrac-pl --verbose: Lightning's messages stay
            seed_logger.setLevel(logging.WARNING)
        try:
            self._build(model_class, datamodule_class, replace_source_lists(args), prog, description, epilog)
        except ArgumentError as exc:  # a mistyped key: name the nearest valid one
            parser = getattr(self, "parser", None)
            raise (with_suggestion(exc, parser) if parser is not None else exc) from None
        finally:
            seed_logger.setLevel(level)

    def add_default_arguments_to_parser(self, parser) -> None:
        super().add_default_arguments_to_parser(parser)
        add_verbose_argument(parser)

    def add_tool_arguments(self, parser) -> None:
        """The command's own sections (``attribution``; ``fit``, ``output``): listed first in ``--help``."""

    def add_core_arguments_to_parser(self, parser) -> None:
        """The tool's options before the Trainer's: ``--help`` lists the groups in the order they are added,
        here the command's sections, ``model``, ``data``, then ``trainer`` (LightningCLI's own order is
        ``trainer``, ``model``, ``data``, the command's sections: ~500 lines of Trainer flags first)."""
        self.add_tool_arguments(parser)
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def _build(self, model_class, datamodule_class, args, prog: str, description: str, epilog: Optional[str]) -> None:
        super().__init__(
            model_class,
            datamodule_class,
            run=False,
            args=args,
            save_config_callback=None,
            subclass_mode_model=False,
            subclass_mode_data=False,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": prog, "description": description, "exit_on_error": False, "epilog": epilog,
                           "formatter_class": RawDescriptionDefaultsHelpFormatter},
        )

    def instantiate_trainer(self, **kwargs: Any) -> None:
        """Keep the ``trainer:`` arguments (those set, i.e. not None) for the engine; build no Trainer."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        self.trainer_kwargs = {k: v for k, v in config.items() if v is not None}
        return None

    def config_text(self) -> str:
        """The resolved config as YAML (every option, None included): the run directory's ``config.yaml``."""
        return self.parser.dump(self.config, skip_none=False)
