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
    def __init__(self, targets: int):
        self.targets, self.started = int(targets), 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started += 1
        if self.started > self.targets:
            os.kill(os.getpid(), signal.SIGKILL)
