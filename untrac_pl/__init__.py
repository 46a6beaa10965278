"""UnTrac and UnTrac-Inv training-data attribution (Isonuma & Titov, ACL 2024) on PyTorch Lightning.

    from untrac_pl import attribute, ScoreTable, UnTracModule, AttributionDataModule
    from untrac_pl import UnTracConfig, UnTracInfluenceEstimator          # the seed's API (also untrac_pl.compat)

The public names are imported on first use (module ``__getattr__``): ``import untrac_pl`` itself loads
neither torch nor Lightning, which keeps ``untrac-pl --help`` and ``--version`` instant. The command line
is :mod:`untrac_pl.cli`.
"""
from __future__ import annotations

import importlib

#: the one version number: setup.cfg reads it (``version = attr: untrac_pl.__version__``), ``untrac-pl --version`` prints it
__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "attribute": "untrac_pl.api",
    "ScoreTable": "untrac_pl.scores",
    "UnTracModule": "untrac_pl.unlearning",
    "AttributionDataModule": "untrac_pl.data.datamodule",
    "UnTracConfig": "untrac_pl.estimator",
    "UnTracInfluenceEstimator": "untrac_pl.estimator",
    "MemoryEfficientUnTracEstimator": "untrac_pl.estimator",
    "TracInBaseline": "untrac_pl.estimator",
    "ToxicityAttributionExperiment": "untrac_pl.experiments.toxicity",
    "ScalingExperiment": "untrac_pl.experiments.scaling",
    "ScalingExperimentConfig": "untrac_pl.experiments.scaling",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public name's module on first access (lazy package export: those modules import torch)."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a dependency of that module is missing: say so unchanged
            raise
        raise ImportError(f"untrac_pl.{name} lives in {module_name}, which is not part of this installation", name=module_name) from exc
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"untrac_pl.{name}: {module_name} defines no {name!r}") from None
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
