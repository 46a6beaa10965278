"""The run's progress bars: one per phase across all of a run's Trainers, on stderr (:mod:`untrac_pl.console`).

:class:`TargetProgressBar` is the engine's (one instance per run, shared by its per-target Trainers, in
place of Lightning's TQDM bar, whose "Predicting: 0/?", "Training:", "Epoch 0:" and "Predicting
DataLoader 0" bars would appear twice per target): a bar over the θ0 scoring batches, then one bar
over the targets whose postfix says which target is unlearned or scored and at which step.
:class:`StepProgress` is ``fit``'s (training steps; a plain callback next to ``enable_progress_bar=False``).
"""
from __future__ import annotations

import time
from typing import Optional

from lightning.pytorch.callbacks import Callback, ProgressBar

from untrac_pl.console import Progress
from untrac_pl.data.schedule import num_optimizer_steps, plan_micro_batches
from untrac_pl.errors import NonFiniteLossError


class TargetProgressBar(ProgressBar):
    """``θ0: n/N batches``, then ``targets: k/T`` with ``<target id>: unlearn step s/S`` or ``score b/B``.

    The engine tells it how many targets there are and how many a resumed run already has
    (:meth:`begin_targets`); without that call the targets bar starts at the first target's ``fit``.
    A target whose ascent diverges counts as done (marked failed); an interrupt closes the bars where they are.
    """

    NOTE_EVERY_S = 0.1  # the ascent step shown at most this often

    def __init__(self) -> None:
        super().__init__()
        self._noted = 0.0
        self._enabled = True
        self.theta0: Optional[Progress] = None
        self.targets: Optional[Progress] = None
        self._step_total: Optional[int] = None

    # -- ProgressBar's interface ---------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        bar = self.targets or self.theta0
        if bar is not None and self._enabled:
            bar.write(" ".join(str(a) for a in args))
        else:
            super().print(*args, **kwargs)

    # -- the engine's calls --------------------------------------------------------------------------
    def begin_targets(self, total: int, done: int = 0) -> None:
        """The targets phase: ``total`` targets, ``done`` of them finished by an earlier (resumed) run."""
        self._close_theta0()
        if self._trainer is None:  # never given to a Trainer (trainer.enable_progress_bar: false): no bar
            return
        if self.targets is None:
            self.targets = Progress("targets", total=total, unit="target", initial=done, enabled=self._enabled)
            if done:
                self.targets.write(f"resuming: {done} of {total} targets already finished")
            if done >= total:
                self.targets.close()

    def close(self) -> None:
        self._close_theta0()
        if self.targets is not None:
            self.targets.close()

    def _close_theta0(self) -> None:
        if self.theta0 is not None:
            self.theta0.close()

    # -- Lightning's hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        target = pl_module.target
        if target is None:
            return
        if self.targets is None:
            self.begin_targets(target.total)
        self._step_total = _planned_steps(pl_module)
        self.targets.note(f"{target.id}: unlearn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        target = pl_module.target
        now = time.perf_counter()
        if target is not None and self.targets is not None and now - self._noted >= self.NOTE_EVERY_S:  # a bounded rate, not per step
            self._noted = now
            total = f"/{self._step_total}" if self._step_total else ""
            self.targets.note(f"{target.id}: unlearn step {trainer.global_step}{total}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        batches = _num_batches(trainer.num_predict_batches, dataloader_idx)
        if pl_module.target is None:  # θ0: the evaluation set's losses before any unlearning
            if self.theta0 is None:
                self.theta0 = Progress("θ0 losses", total=batches, unit="batch", lines=1, enabled=self._enabled)
            self.theta0.update(1)
        elif self.targets is not None:
            ids = ", ".join(t.id for t in pl_module.scored_targets())
            self.targets.note(f"{ids}: score {batch_idx + 1}/{batches}" if batches else f"{ids}: score")

    def on_predict_end(self, trainer, pl_module) -> None:
        if pl_module.target is None:
            self._close_theta0()
        elif self.targets is not None:
            scored = pl_module.scored_targets()
            self.targets.update(len(scored), note=f"{scored[-1].id} done" if scored else None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, NonFiniteLossError) and self.targets is not None:  # marked failed; the run goes on
            self.targets.update(1, note=f"{exception.target_id} failed")
            return
        if not isinstance(exception, NonFiniteLossError):
            self.close()


def _num_batches(value, dataloader_idx: int) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[dataloader_idx] if dataloader_idx < len(value) else None
    try:
        return int(value) if value is not None and value != float("inf") else None
    except (TypeError, ValueError, OverflowError):
        return None


def _planned_steps(pl_module) -> Optional[int]:
    try:
        target, schedule = pl_module.target, pl_module.schedule
        return num_optimizer_steps(plan_micro_batches(len(target.indices), schedule, target.seed))
    except Exception:  # a display nicety only
        return None


class StepProgress(Callback):
    """``train: s/S steps`` (with the loss) for :func:`untrac_pl.training.fit_lm`; in a file: 2 lines per run."""

    def __init__(self, desc: str, total_steps: int, lines: int = 2):
        self.desc, self.total_steps, self.lines = desc, int(total_steps), lines
        self.progress: Optional[Progress] = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.progress = Progress(self.desc, total=self.total_steps, unit="step", initial=trainer.global_step, lines=self.lines)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is None:
            return
        advance = trainer.global_step - self.progress.n
        if advance > 0:
            loss = trainer.callback_metrics.get("train/loss")
            self.progress.update(advance, note=f"loss {float(loss):.3f}" if loss is not None else None)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.progress is not None:
            self.progress.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.progress is not None:
            self.progress.close()
