"""Which options each method accepts, checked before any work is done.

Every method declares its options once, as the fields of its ``Options`` dataclass (the field
docstrings document them). :func:`check_options` refuses an option the method does not take with a
:class:`~untrac_pl.errors.MethodOptionError` (a ``ValueError``, so ``untrac-pl`` reports it in one
line) that names the config field the user wrote (``attribution.baseline.<key>`` or
``methods[<label>].options.<key>``) and lists the method's options. An option of another method set
to ``null`` is accepted and dropped: ``null`` asks for the default, which every method honours.
Fields marked ``metadata={"runner": True}`` are handled by the method's own code before scoring
(``hessian_samples_per_group``), not by the scoring function, so :func:`compute_baseline_scores`
refuses them unless ``runner=True``.
"""
from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Optional

from untrac_pl.errors import MethodOptionError
from untrac_pl.methods.registry import get_method, method_names


def accepted_options(method: str, runner: bool = False) -> tuple[str, ...]:
    """The option names ``method`` takes (``runner=True``: plus those its own code handles)."""
    options = get_method(method).Options
    return tuple(f.name for f in fields(options) if runner or not f.metadata.get("runner"))


def _field(where: Optional[str], key: str) -> str:
    return f"{where}.{key}" if where else f"baseline option '{key}'"


def check_options(method: str, options: Optional[dict], where: Optional[str] = None, runner: bool = False) -> dict:
    """``options`` checked against what ``method`` accepts; returns them without ``null`` options of other methods.

    ``where``: the config field holding the options (``"attribution.baseline"``,
    ``"methods[hif_lissa].options"``), named in the error. Raises :class:`MethodOptionError`.
    """
    target = get_method(method)
    key = target.name
    options = dict(options or {})
    accepted = accepted_options(key, runner=runner)
    others = [m for m in method_names() if m != key]
    out = {}
    for name, value in options.items():
        name = str(name)
        if name in accepted:
            out[name] = value
            continue
        owners = [m for m in others if name in accepted_options(m, runner=True)]
        if owners and value is None:
            continue  # null = the default: nothing to honour
        what = target.description
        if owners:
            reason = f"{what} cannot honour '{name}' (an option of {', '.join(owners)})"
        else:
            reason = f"{what} has no option '{name}'"
            close = difflib.get_close_matches(name, accepted, n=1)
            if close:
                reason += f" (did you mean '{close[0]}'?)"
        raise MethodOptionError(f"{_field(where, name)}: {reason}; {key} accepts: {', '.join(accepted)}")
    target.validate_options(out, lambda option: _field(where, option))
    return out
