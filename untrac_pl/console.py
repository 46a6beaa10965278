"""What a person sees of a run: quiet by default, progress on stderr, one bar per phase.

* **Verbosity.** Lightning's banners ("GPU available: ...", "TPU available: ...", "Seed set to 0",
  "💡 Tip: ... litlogger") are off by default; ``untrac-pl --verbose`` (:func:`set_verbose`) brings them
  back. :class:`quiet_command` is the command line's switch, :class:`untrac_pl.runtime.quiet_lightning`
  the engine's (it does nothing while verbose).
* **Progress** (:class:`Progress`) goes to stderr, so stdout keeps only what a command found. In a
  terminal each phase is one tqdm bar (θ0 scoring, the targets, the training steps, a baseline's
  gradient pass); when stderr is redirected to a file a phase writes a few plain lines instead of
  hundreds of carriage-return updates: one at each of its ``lines`` milestones and a heartbeat when a
  minute passes without one.

Importing this module loads neither torch nor Lightning (``untrac-pl --help`` stays instant).
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import IO, Optional

__all__ = ["VERBOSE_HELP", "Progress", "is_verbose", "no_transformers_bars", "quiet_command", "set_verbose", "status", "stderr_is_terminal"]

_verbose = False

#: how every command's ``--help`` describes ``--verbose``
VERBOSE_HELP = "show Lightning's messages (devices, seed, tips), hidden by default"

#: Lightning's loggers: their INFO messages are the banners and adverts
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
#: Lightning's warnings that say nothing to act on (``-c`` without ``seed_everything``)
LIGHTNING_NOISE = (".*No seed found, seed set to.*",)


def set_verbose(on: bool) -> None:
    """Show (``True``) or hide (``False``, the default) Lightning's banners and adverts."""
    global _verbose
    _verbose = bool(on)


def is_verbose() -> bool:
    return _verbose


def stderr_is_terminal(stream: Optional[IO] = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or a stream without isatty
        return False


def status(message: str, stream: Optional[IO] = None) -> None:
    """One line on stderr (between bars: tqdm keeps the bars intact)."""
    stream = sys.stderr if stream is None else stream
    if stderr_is_terminal(stream):
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)


class quiet_command:
    """For one ``untrac-pl`` command: Lightning's INFO messages (banners, tips, "Seed set to") and its
    "No seed found" warning off unless ``verbose``; restored afterwards (``main`` may run in-process)."""

    def __init__(self, verbose: bool = False):
        self.verbose = bool(verbose)

    def __enter__(self):
        self._previous = _verbose
        set_verbose(self.verbose)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        self._levels = {}
        if not self.verbose:
            for message in LIGHTNING_NOISE:
                warnings.filterwarnings("ignore", message=message)
            # lightning.pytorch sets its logger to INFO when first imported: import it first, so the level holds
            import lightning.pytorch  # noqa: F401

            for name in LIGHTNING_LOGGERS:
                logger = logging.getLogger(name)
                self._levels[name] = logger.level
                logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)
        set_verbose(self._previous)


class no_transformers_bars:
    """transformers' bars off for the block: saving a model is no phase of its own ("Writing model shards"
    next to the run's bars); downloads and loading keep theirs. Does nothing while verbose."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled() and not _verbose
        if self._was:
            hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self._was:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One phase's progress on stderr.

    In a terminal: one tqdm bar (``leave=True``: the finished bar stays as the phase's line). Otherwise
    (a file, a pipe, a notebook): ``desc: n/total unit (elapsed; note)`` at each of ``lines`` milestones
    (``lines=1``: only at the end), and at most every ``heartbeat_s`` seconds while a note changes, so a
    log file gets a few lines per phase. ``enabled=False``: silent. ``note`` is what the phase is doing
    now (``query-3: step 2/5``); in a terminal it is the bar's postfix.
    """

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it", initial: int = 0, lines: int = 10,
                 enabled: bool = True, stream: Optional[IO] = None, heartbeat_s: float = 60.0):
        self.desc, self.total, self.unit = desc, (int(total) if total is not None else None), unit
        self.n = int(initial)
        self.lines = max(1, int(lines))
        self.enabled = bool(enabled)
        self.stream = sys.stderr if stream is None else stream
        self.heartbeat_s = heartbeat_s
        self.started = self._last_line = self._last_refresh = time.perf_counter()
        self._milestone = self._milestone_of(self.n)
        self._note: Optional[str] = None
        self._printed = self.n  # the count the last plain line showed
        self.closed = False
        self.bar = None
        if self.enabled and stderr_is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.stream, leave=True,
                            dynamic_ncols=True, mininterval=0.2, smoothing=0.1)

    def _milestone_of(self, n: int) -> int:
        if not self.total:
            return 0
        return min(self.lines, n * self.lines // self.total)

    def _line(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        note = f"; {self._note}" if self._note else ""
        unit = self.unit + ("es" if self.unit.endswith(("ch", "sh", "x")) else "" if self.unit.endswith("s") else "s")
        print(f"{self.desc}: {self.n}{total} {unit} ({_clock(time.perf_counter() - self.started)}{note})",
              file=self.stream, flush=True)
        self._last_line = time.perf_counter()
        self._printed = self.n

    def note(self, text: Optional[str]) -> None:
        """What the phase is doing now (the bar's postfix; in a file, part of the next line)."""
        self._note = text
        if not self.enabled or self.closed:
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(text or "", refresh=False)
            if now - self._last_refresh >= 0.2:
                self.bar.refresh()
                self._last_refresh = now
        elif now - self._last_line >= self.heartbeat_s:
            self._line()

    def update(self, n: int = 1, note: Optional[str] = None) -> None:
        """``n`` more units done."""
        self.n += int(n)
        if note is not None:
            self._note = note
        if not self.enabled or self.closed:
            return
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(int(n))
        else:
            milestone = self._milestone_of(self.n)
            if milestone > self._milestone or time.perf_counter() - self._last_line >= self.heartbeat_s:
                self._milestone = milestone
                self._line()
        if self.total is not None and self.n >= self.total:
            self.close()  # a finished phase lets go of the terminal line at once

    def write(self, message: str) -> None:
        """A line of its own, above the bar."""
        if self.enabled:
            status(message, self.stream)

    def close(self, note: Optional[str] = None) -> None:
        if self.closed:
            return
        if note is not None:
            self._note = note
        self.closed = True
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.close()
        elif self.enabled and self.n > 0 and self.n != self._printed and (self.total is None or self.n < self.total):
            self._line()  # stopped short (interrupted, failed): say where
