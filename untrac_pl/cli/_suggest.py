"""The nearest valid key for a mistyped one, from the command's own parser.

``--attribution.methd untrac`` → ``unrecognized arguments: --attribution.methd untrac (did you mean
--attribution.method?)``; in a config file, ``attribution: {methd: untrac}`` → ``Group 'attribution' does
not accept option 'methd' (did you mean attribution.method?)``. The candidates are the parser's own
option strings (every ``--section.key`` jsonargparse knows), matched with :mod:`difflib`. A value outside a
``Literal`` field's choices (``--model.optimizer.name adamm``) reads ``--model.optimizer.name: 'adamm' is not one
of adam, adamw, ... (did you mean 'adam'?)`` instead of jsonargparse's ``Expected a typing.Literal[...]``.
"""
from __future__ import annotations

import ast
import difflib
import re
from argparse import ArgumentError
from typing import Iterable, Optional

__all__ = ["known_keys", "nearest_key", "parse_args", "with_suggestion"]

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)$", re.S)
_GROUP_OPTION = re.compile(r"Group '([^']+)' does not accept (?:nested )?(?:option|key) '([^']+)'")
_LITERAL = re.compile(r'Parser key "([^"]+)":.*?Expected a typing\.Literal\[(.*?)\]\. Got value: ([^\n]*)', re.S)
_SUFFIXES = (".help", "+")  # jsonargparse's helper options (--data.train.help, --data.train+)


def known_keys(parser) -> list[str]:
    """The parser's long options without the leading ``--`` (``attribution.method``, ``model.optimizer.lr``, ...)."""
    keys = []
    for option in getattr(parser, "_option_string_actions", {}):
        if option.startswith("--") and not option.endswith(_SUFFIXES) and option not in ("--help", "--print_shtab"):
            keys.append(option[2:])
    return keys


def nearest_key(key: str, keys: Iterable[str]) -> Optional[str]:
    """The valid key nearest to ``key``, or ``None`` if none is close: a key of the same section whose
    last part is spelled nearly alike (``attribution.methd`` → ``attribution.method``), else a key of
    another section nearly alike as a whole (``atribution.method`` → ``attribution.method``)."""
    keys = [k for k in keys if k != key]
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if match:
        return siblings[match[0]]
    others = [k for k in keys if k.rpartition(".")[0] != section]
    match = difflib.get_close_matches(key, others, n=1, cutoff=0.8)
    return match[0] if match else None


def literal_message(message: str) -> Optional[str]:
    """jsonargparse's error for a value outside a ``Literal`` field's choices, in one line that names the flag,
    the value, the choices and the nearest one; ``None`` for any other message."""
    match = _LITERAL.search(message)
    if not match:
        return None
    key, choices, value = match.group(1), match.group(2), match.group(3).strip()
    try:
        choices = [str(c) for c in ast.literal_eval(f"[{choices}]")]
    except (ValueError, SyntaxError):
        return None
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"--{key}: '{value}' is not one of {', '.join(choices)}{hint}"


def with_suggestion(exc: ArgumentError, parser) -> ArgumentError:
    """``exc`` with ``(did you mean ...?)`` appended when it names an unknown key that has a near valid one,
    or a value outside a ``Literal`` field's choices that is near one of them."""
    message = str(exc)
    literal = literal_message(message)
    if literal is not None:
        return ArgumentError(None, literal)
    keys = known_keys(parser)
    hints = []
    unknown = _UNRECOGNIZED.search(message)
    if unknown:
        for token in unknown.group(1).split():
            if token.startswith("--"):
                near = nearest_key(token[2:].split("=", 1)[0], keys)
                if near is not None:
                    hints.append(f"--{near}")
    else:
        for group, option in _GROUP_OPTION.findall(message):
            near = nearest_key(f"{group}.{option}", keys)
            if near is not None:
                hints.append(near)
    if not hints:
        return exc
    hints = list(dict.fromkeys(hints))
    return ArgumentError(None, f"{message} (did you mean {' / '.join(hints)}?)")


def parse_args(parser, argv: list[str]):
    """``parser.parse_args(argv)``; an unknown key's error names the nearest valid one."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise with_suggestion(exc, parser) from None
