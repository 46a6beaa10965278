"""A progress bar that says which target is being unlearned or scored."""
from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class TargetProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with ``target i/N <id>`` in place of the epoch number."""

    @staticmethod
    def _label(pl_module) -> str:
        target = pl_module.target
        return "θ0" if target is None else f"target {target.position + 1}/{target.total} {target.id}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(f"unlearn {self._label(pl_module)}")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0:
            self.predict_progress_bar.set_description(f"score {self._label(pl_module)}")
