"""The nearest valid key for a mistyped one, from the command's own parser.

``--attribution.methd untrac`` → ``unrecognized arguments: --attribution.methd untrac (did you mean
--attribution.method?)``; in a config file, ``attribution: {methd: untrac}`` → ``Group 'attribution' does
not accept option 'methd' (did you mean attribution.method?)``. The candidates are the parser's own
option strings (every ``--section.key`` jsonargparse knows), matched with :mod:`difflib`.
"""
from __future__ import annotations

import difflib
import re
from argparse import ArgumentError
from typing import Iterable, Optional

__all__ = ["known_keys", "nearest_key", "parse_args", "with_suggestion"]

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)$", re.S)
_GROUP_OPTION = re.compile(r"Group '([^']+)' does not accept (?:nested )?(?:option|key) '([^']+)'")
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


def with_suggestion(exc: ArgumentError, parser) -> ArgumentError:
    """``exc`` with ``(did you mean ...?)`` appended when it names an unknown key that has a near valid one."""
    message = str(exc)
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
