"""MemoryMonitor: peak memory per phase (unlearning, scoring); CUDA peak on GPU, process RSS on CPU."""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from untrac_pl.runtime import current_rss_bytes


class MemoryMonitor(Callback):
    """Records the peak memory of each phase over all targets.

    On CUDA: ``torch.cuda.max_memory_allocated`` with the peak counter reset at each phase start and
    read once at its end (the allocator keeps the peak itself: nothing is read per step).
    On CPU: the process RSS (a ``/proc`` read) sampled every ``cpu_sample_every`` batches and at each
    phase end — a lower bound of the true peak; each step of a phase allocates the same, so a sparser
    sample misses little and keeps the syscall out of the ascent loop.
    ``report()`` gives ``{phase: {"peak_bytes", "peak_gb", "device"}}``, which the engine writes to
    ``memory.json``; the run's TensorBoard gets them once, at the end (:mod:`untrac_pl.board`: one
    value per tag, not one per Trainer). ``report()["model"]`` adds the model's
    static footprint (parameter, buffer and trainable bytes; quantised weights at their packed size).
    """

    PHASES = {"fit": "unlearning", "predict": "scoring"}

    def __init__(self, cpu_sample_every: int = 16):
        self.cpu_sample_every = max(1, int(cpu_sample_every))
        self.peaks: dict[str, int] = {}
        self.device_kind = "cpu"
        self.model: dict = {}
        self.measures: dict[str, str] = {}  # phase -> how it was measured, where it differs from the default

    @staticmethod
    def footprint(net: torch.nn.Module) -> dict:
        """Bytes held by the model's tensors (quantised weights count at their packed size)."""
        params = list(net.parameters())
        trainable = [p for p in params if p.requires_grad]
        return {
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in net.buffers()),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "quantized": any(p.dtype in (torch.int8, torch.uint8) for p in params),
        }

    def set_model(self, net: torch.nn.Module) -> None:
        self.model = self.footprint(net)

    def record_peak(self, phase: str, value: int, device_kind: str, measure: Optional[str] = None) -> None:
        """A peak measured outside the Trainer hooks (a gradient method's one pass)."""
        self.device_kind = device_kind
        self.peaks[phase] = max(self.peaks.get(phase, 0), int(value))
        if measure is not None:
            self.measures[phase] = measure

    def _start(self, pl_module: pl.LightningModule) -> None:
        if not self.model and pl_module.net is not None:
            self.model = self.footprint(pl_module.net)
        if pl_module.device.type == "cuda":
            self.device_kind = "cuda"
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _sample(self, phase: str, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            value = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            value = current_rss_bytes()
        self.peaks[phase] = max(self.peaks.get(phase, 0), int(value))

    def _sample_now(self, pl_module: pl.LightningModule, batch_idx: int) -> bool:
        return pl_module.device.type != "cuda" and batch_idx % self.cpu_sample_every == 0

    def on_train_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._sample_now(pl_module, batch_idx):
            self._sample("unlearning", pl_module)

    def on_train_end(self, trainer, pl_module):
        self._sample("unlearning", pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._sample_now(pl_module, batch_idx):
            self._sample("scoring", pl_module)

    def on_predict_end(self, trainer, pl_module):
        self._sample("scoring", pl_module)

    def report(self) -> dict:
        measure = "torch.cuda.max_memory_allocated" if self.device_kind == "cuda" else f"process RSS sampled every {self.cpu_sample_every} batches and at each phase end"
        report = {
            phase: {"peak_bytes": value, "peak_gb": round(value / 2**30, 4), "device": self.device_kind,
                    "measure": self.measures.get(phase, measure)}
            for phase, value in self.peaks.items()
        }
        if self.model:
            report["model"] = dict(self.model)  # static footprint: parameters, adapters, quantisation
        return report
