"""Errors with enough context to fix the input: they name the file, line or field at fault."""
from __future__ import annotations


class UnTracError(Exception):
    """Base class of every error the package raises on purpose."""


class DataError(UnTracError, ValueError):
    """Bad training or query data. The message names the source and, where known, line and field."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None, field: str | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)
        self.source, self.line, self.field = source, line, field


class ModelLoadError(UnTracError, OSError):
    """A model or tokenizer could not be loaded; the message says from where and why."""


class NonFiniteLossError(UnTracError, FloatingPointError):
    """Gradient ascent produced a NaN/inf loss (ascent is unbounded: a high learning rate diverges)."""

    def __init__(self, target_id: str, step: int, value: float):
        super().__init__(f"non-finite ascent loss {value} for target '{target_id}' at optimizer step {step}")
        self.target_id, self.step, self.value = target_id, step, value


class OutputWriteError(UnTracError, OSError):
    """An output file could not be written (disk full, quota, permissions); nothing half-written is left."""


class ResumeConflictError(UnTracError, ValueError):
    """``<output_dir>.partial`` holds results that must not be mixed with this run (or another run holds it)."""


class NonFiniteBaseLossError(UnTracError, FloatingPointError):
    """The model's losses at θ0 (before any unlearning) are NaN/inf: the checkpoint or dtype is broken."""


class MethodOptionError(UnTracError, ValueError):
    """An unknown method, or an option the method does not take (a typo, or an option of another
    method); the message names the field the user wrote and lists what the method accepts."""


# the name the gradient baselines' option errors had before the method registry
BaselineOptionError = MethodOptionError
