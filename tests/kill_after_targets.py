"""A test-only Lightning callback that simulates a crash: SIGKILL once N targets are finished.

The engine persists each finished target before the next target's ``fit`` starts, so killing the
process at the (N+1)-th ``on_fit_start`` leaves exactly N persisted targets (tests/test_resume.py
passes it through ``trainer.callbacks``, with ``tests/`` on ``PYTHONPATH``).
"""
from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAfterTargets(Callback):
    """``steps``: kill after that many ascent micro-batches of the next target instead (mid-target)."""

    def __init__(self, targets: int, steps: int = 0):
        self.targets, self.steps, self.started = int(targets), int(steps), 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started += 1
        if self.started > self.targets and not self.steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.started > self.targets and self.steps and batch_idx + 1 >= self.steps:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAfterTargets(Callback):
    """Ctrl-C (a ``KeyboardInterrupt`` inside the Trainer, as SIGINT raises it) once N targets are finished."""

    def __init__(self, targets: int):
        self.targets, self.started = int(targets), 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started += 1
        if self.started > self.targets:
            raise KeyboardInterrupt
