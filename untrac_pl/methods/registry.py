"""The one registry of attribution methods: names, aliases and display names.

Every front end — ``untrac-pl attribute``, ``reproduce``, ``toxicity``, the Python API and the reports —
looks a method up here. Registering a new method is one decorated class::

    from untrac_pl.methods import AttributionMethod, register

    @register
    class MyMethod(GradientMethod):
        name, display = "my_method", "My method"
        ...
"""
from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Optional

from untrac_pl.errors import MethodOptionError
from untrac_pl.methods.base import AttributionMethod

_METHODS: dict[str, AttributionMethod] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register(cls: type) -> type:
    """Register a method class (usable as a decorator); its ``name`` and ``aliases`` become valid names."""
    method = cls()
    key = _key(method.name)
    if key != method.name:
        raise ValueError(f"method name {method.name!r} must be lower case with underscores")
    _METHODS[key] = method
    for alias in method.aliases:
        _ALIASES[_key(alias)] = key
    return cls


def defining_modules() -> list[str]:
    """The modules that define the registered methods outside untrac_pl (a spawned worker imports them)."""
    modules = {type(m).__module__ for m in _METHODS.values()}
    return sorted(n for n in modules if n != "__main__" and not n.startswith("untrac_pl."))


def unregister(name: str) -> None:
    """Remove a method (and its aliases) again, e.g. one a test registered."""
    key = canonical_name(name)
    _METHODS.pop(key, None)
    for alias in [a for a, k in _ALIASES.items() if k == key]:
        del _ALIASES[alias]


def canonical_name(name: str, what: str = "method") -> str:
    """The registry key of ``name`` (case, hyphens and aliases resolved); an unknown name raises a
    :class:`MethodOptionError` naming ``what`` (the field the user wrote, e.g. ``attribution.method``)."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        close = difflib.get_close_matches(key, list(_METHODS) + list(_ALIASES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MethodOptionError(f"{what} '{name}' is unknown; choose one of {', '.join(_METHODS)}{hint}")
    return key


def get_method(name: str) -> AttributionMethod:
    return _METHODS[canonical_name(name)]


def method_names(kind: Optional[str] = None) -> tuple[str, ...]:
    """Registered names in registration order (``kind``: only ``unlearning`` or ``gradient`` methods)."""
    return tuple(k for k, m in _METHODS.items() if kind is None or m.kind == kind)


def display_name(name: str) -> str:
    """``UnTrac-Inv`` for ``untrac_inv``; a name the registry does not know is shown as it is."""
    try:
        return get_method(name).display
    except MethodOptionError:
        return name


def methods_help() -> str:
    """Every registered method with its aliases and options (the ``Options`` fields and their docs), for ``--help``."""
    lines = ["methods (attribution.method) and their options (attribution.baseline for gradient methods;",
             "targets_per_pass / snapshot_device are attribution.* fields for UnTrac / UnTrac-Inv):"]
    for name, method in _METHODS.items():
        aliases = f" (also: {', '.join(method.aliases)})" if method.aliases else ""
        lines.append(f"  {name}: {method.display}{aliases}")
        for f in fields(method.Options):
            doc = f.metadata.get("doc", "")
            lines.append(f"      {f.name} = {f.default!r}" + (f": {doc}" if doc else ""))
    return "\n".join(lines)
