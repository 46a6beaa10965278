"""Optimizers for gradient-ascent unlearning (paper default: Adam, constant lr 5e-5, no clipping)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch

OptimizerName = Literal["adam", "adamw", "sgd", "sgd_momentum", "rmsprop", "adafactor", "adam8bit", "adamw8bit"]
LrSchedule = Literal["constant", "linear"]


@dataclass
class OptimizerSpec:
    """Optimizer of the gradient ascent (paper: Adam, constant lr 5e-5).

    An lr schedule and gradient clipping are ``unlearning.lr_schedule`` and
    ``unlearning.max_grad_norm`` (see :class:`~untrac_pl.data.schedule.UnlearningSchedule`).

    Args:
        name: the optimizer (``adam8bit``/``adamw8bit`` need bitsandbytes).
        lr: learning rate (> 0; paper: 5e-5).
        betas: Adam/AdamW betas, each in [0, 1).
        eps: Adam/AdamW/RMSprop epsilon.
        weight_decay: weight decay (>= 0).
        momentum: momentum of ``sgd_momentum``.
        alpha: smoothing constant of ``rmsprop``.
    """

    name: OptimizerName = "adam"
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    alpha: float = 0.99

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


def build_optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to unlearn with")
    name = spec.name
    if name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec.lr, alpha=spec.alpha, eps=spec.eps, weight_decay=spec.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=spec.lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=spec.weight_decay)
    if name in ("adam8bit", "adamw8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.Adam8bit if name == "adam8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer '{name}'")


def build_lr_scheduler(lr_schedule: LrSchedule, warmup_steps: int, optimizer: torch.optim.Optimizer, total_steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """One target's lr schedule over its ``total_steps`` planned optimizer steps (``None``: constant lr).

    ``linear`` is transformers' ``get_linear_schedule_with_warmup``, the Hugging Face Trainer's
    default: ``warmup_steps`` of linear warm-up, then linear decay reaching 0 after the last step
    (the first step after warm-up uses the full lr). Stepped once after every optimizer step.
    """
    if lr_schedule == "constant":
        return None
    if lr_schedule != "linear":
        raise ValueError(f"unknown lr_schedule {lr_schedule!r} (constant or linear)")
    # transformers.optimization imports bitsandbytes, whose CPU backend logs a warning about an optional
    # kernels-hub package on AVX512-BF16 CPUs: not ours to show here
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        from transformers import (
            get_linear_schedule_with_warmup,  # the Hugging Face Trainer's own schedule
        )
    finally:
        bnb_logger.setLevel(level)
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(1, int(total_steps)))
