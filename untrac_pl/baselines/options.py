"""Which options each baseline accepts, checked before any work is done.

An option a method does not take used to reach a constructor as a bare ``TypeError`` (or, for EK-FAC,
be dropped silently). :func:`check_options` refuses it up front with a :class:`BaselineOptionError`
(a ``ValueError``, so ``untrac-pl`` reports it in one line) that names the config field the user wrote
(``attribution.baseline.<key>`` or ``methods[<label>].options.<key>``) and lists the method's options.

The accepted names are read from the scoring functions' signatures (plus, for the ``_Setup``-based
methods, the shared ``_Setup`` options), so they cannot drift from what the code takes. An option of
another baseline set to ``null`` is accepted and dropped: ``null`` asks for the default, which every
method honours (configs keep ``projection_dim: null`` / ``params: null`` when switching methods).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Iterable, Optional

from untrac_pl.errors import UnTracError

__all__ = ["BaselineOptionError", "RUNNER_OPTIONS", "accepted_options", "check_options", "canonical_method"]


class BaselineOptionError(UnTracError, ValueError):
    """A baseline option the method does not accept (a typo, or an option of another method)."""


# passed by the callers themselves, never through the options
_RESERVED = ("self", "model", "train", "queries", "train_groups", "query_groups")
# options handled by the runners (untrac_pl.baseline_runner, untrac_pl.experiments.methods), per method
RUNNER_OPTIONS = {"hif_lissa": ("hessian_samples_per_group",), "hif_arnoldi": ("hessian_samples_per_group",)}
_DESCRIPTION = {"ekfac": "EK-FAC (kronfluence)"}


def canonical_method(method: str) -> str:
    from untrac_pl.baselines.scores import _ALIASES, METHODS

    key = _ALIASES.get(str(method).lower(), str(method).lower())
    if key not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {METHODS}")
    return key


def _keywords(fn) -> tuple[list[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _RESERVED]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def accepted_options(method: str, runner: bool = False) -> tuple[str, ...]:
    """The option names ``method`` takes (``runner=True``: plus those the runners handle)."""
    from untrac_pl.baselines import scores

    key = canonical_method(method)
    if key == "ekfac":
        from untrac_pl.baselines.ekfac import ekfac_scores

        names, _ = _keywords(ekfac_scores)  # its **unused only collects options to refuse
    else:
        names, forwards = _keywords(scores._DISPATCH[key])
        if forwards:  # **opts go to _Setup
            names += [n for n in _keywords(scores._Setup.__init__)[0] if n not in names]
    if runner:
        names += [n for n in RUNNER_OPTIONS.get(key, ()) if n not in names]
    return tuple(names)


def _all_known() -> set:
    return {n for m in _methods() for n in accepted_options(m, runner=True)}


def _field(where: Optional[str], key: str) -> str:
    return f"{where}.{key}" if where else f"baseline option '{key}'"


def check_options(method: str, options: Optional[dict], where: Optional[str] = None, runner: bool = False) -> dict:
    """``options`` checked against what ``method`` accepts; returns them without ``null`` options of other methods.

    ``where``: the config field holding the options (``"attribution.baseline"``,
    ``"methods[hif_lissa].options"``), named in the error. ``runner``: also accept the options the
    runners handle themselves (``hessian_samples_per_group``). Raises :class:`BaselineOptionError`.
    """
    key = canonical_method(method)
    options = dict(options or {})
    accepted = accepted_options(key, runner=runner)
    known: Optional[set] = None
    out = {}
    for name, value in options.items():
        name = str(name)
        if name in accepted:
            out[name] = value
            continue
        known = _all_known() if known is None else known
        if name in known and value is None:
            continue  # null = the default: nothing to honour
        what = _DESCRIPTION.get(key, key)
        owners = [m for m in _methods() if name in accepted_options(m, runner=True)]
        if owners:
            reason = f"{what} cannot honour '{name}' (an option of {', '.join(owners)})"
        else:
            reason = f"{what} has no option '{name}'"
            close = difflib.get_close_matches(name, accepted, n=1)
            if close:
                reason += f" (did you mean '{close[0]}'?)"
        raise BaselineOptionError(f"{_field(where, name)}: {reason}; {key} accepts: {', '.join(accepted)}")
    if key == "hif_arnoldi" and out.get("projection_dim"):
        raise BaselineOptionError(f"{_field(where, 'projection_dim')}: hif_arnoldi already scores in the top_k-dimensional "
                                  "eigenbasis; drop projection_dim")
    return out


def _methods() -> Iterable[str]:
    from untrac_pl.baselines.scores import METHODS

    return METHODS
