"""RestoreWeights: every target starts from θ0, bit-exactly, with a fresh optimizer."""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class RestoreWeights(Callback):
    """Snapshots the trainable tensors once and copies them back in place before each target.

    No deep copy of the model and no reload from disk: only tensors that can change during ascent
    (parameters with ``requires_grad`` — for LoRA, just the adapters — plus buffers) are kept, on
    ``offload_device`` if given (e.g. ``"cpu"`` to save accelerator memory). The optimizer is
    rebuilt by ``configure_optimizers`` at each ``fit``, so its state never leaks between targets.
    """

    def __init__(self, offload_device: Optional[str] = None):
        self.offload_device = offload_device
        self._snapshot: Optional[dict[str, torch.Tensor]] = None

    @property
    def snapshot_tensors(self) -> Optional[dict[str, torch.Tensor]]:
        """θ0's tensors by ``param:<name>`` / ``buffer:<name>`` (``None`` before the first target)."""
        return self._snapshot

    @staticmethod
    def _tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        tensors = {f"param:{n}": p for n, p in net.named_parameters() if p.requires_grad}
        tensors.update({f"buffer:{n}": b for n, b in net.named_buffers() if b is not None})
        return tensors

    def snapshot(self, pl_module: pl.LightningModule) -> None:
        if self._snapshot is None:
            self._snapshot = {
                name: t.detach().to(self.offload_device or t.device, copy=True)
                for name, t in self._tensors(pl_module.net).items()
            }

    @torch.no_grad()
    def restore(self, pl_module: pl.LightningModule) -> None:
        if self._snapshot is None:
            return
        live = self._tensors(pl_module.net)
        if live.keys() != self._snapshot.keys():
            raise RuntimeError("the model's tensors changed since the θ0 snapshot; cannot restore")
        for name, tensor in live.items():
            tensor.copy_(self._snapshot[name])
        for p in pl_module.net.parameters():
            p.grad = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._snapshot is None:
            self.snapshot(pl_module)
        else:
            self.restore(pl_module)
