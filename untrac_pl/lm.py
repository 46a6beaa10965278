"""CausalLMModule: a plain causal-LM LightningModule for training θ0 and leave-group-out retraining.

The loss is the project's one loss (:func:`untrac_pl.losses.model_per_example_loss`): per-example mean
token NLL over target tokens, averaged over the batch. Optimisation is automatic (Lightning steps the
optimizer); the learning rate follows ``lr_schedule`` (``constant``, or ``linear`` warm-up then
decay to zero at ``max_steps``) and is logged every step as ``train/lr`` so that checkpoints can
record it (TracIn needs the learning rate at every checkpoint).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from untrac_pl.data.collate import LengthSortedBatchSampler, PadCollator
from untrac_pl.lm_base import CausalLMHolder
from untrac_pl.losses import model_per_example_loss
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec, build_optimizer

LRSchedule = Literal["constant", "linear"]


def lr_factor(step: int, schedule: LRSchedule, warmup_steps: int, max_steps: Optional[int]) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not max_steps:
        return 1.0
    remaining = max_steps - step
    return max(0.0, remaining / max(1, max_steps - warmup_steps))


class CausalLMModule(CausalLMHolder):
    """Trains a Hugging Face causal LM on collated batches (``input_ids``/``attention_mask``/``labels``).

    Args:
        model: what to build or load (a tiny ``config`` trains from scratch; ``name_or_path``
            fine-tunes a saved model).
        optimizer: optimizer and base learning rate (AdamW 1e-3 suits tiny models from scratch).
        lr_schedule: ``constant`` or ``linear`` (warm-up, then linear decay to 0 at ``max_steps``).
        warmup_steps: linear warm-up steps.
        max_steps: length of the run (for the linear schedule; the Trainer is told separately).
        grad_clip: max gradient norm (0 disables).
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(name="adamw", lr=1e-3),
        lr_schedule: LRSchedule = "constant",
        warmup_steps: int = 0,
        max_steps: Optional[int] = None,
        grad_clip: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_spec = model
        self.optimizer_spec = optimizer
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.grad_clip = grad_clip
        self.net: Optional[torch.nn.Module] = None
        self.tokenizer = None

    # -- model -----------------------------------------------------------------------------------
    # -- training --------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_spec, self.net.parameters())
        schedule, warmup, max_steps = self.lr_schedule, self.warmup_steps, self.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, warmup, max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.grad_clip and self.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def current_lr(self) -> float:
        """Learning rate of the next optimizer step (what the step that produced a checkpoint used)."""
        return float(self.trainer.optimizers[0].param_groups[0]["lr"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {self.trainer.global_step}")
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.current_lr(), on_step=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"index": batch["index"], "losses": self(batch).detach().float()}


@torch.no_grad()
def example_losses(net: torch.nn.Module, examples: Sequence[dict], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Per-example losses (eval mode, no grad) of tokenised examples, in their order; float64."""
    collate = PadCollator(pad_token_id)
    was_training = net.training
    net.eval()
    out = torch.full((len(examples),), float("nan"), dtype=torch.float64)
    try:
        for positions in LengthSortedBatchSampler([len(e["input_ids"]) for e in examples], batch_size):
            batch = collate([examples[p] for p in positions])
            device = next(net.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            out[torch.as_tensor(positions)] = model_per_example_loss(net, batch).double().cpu()
    finally:
        net.train(was_training)
    return out
