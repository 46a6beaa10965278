"""Per-example causal-LM loss: the one loss every method, baseline and ground truth uses.

Convention (docs/conventions): the loss of one example is the mean negative log-likelihood over its
target tokens, i.e. positions whose label is not ``IGNORE_INDEX`` (prompt tokens and padding are
masked). Labels are aligned with ``input_ids``; the shift happens here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per example, shape ``[batch]``, computed in float32.

    ``logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` with ``IGNORE_INDEX`` on masked positions.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).to(token_nll.dtype)
    return (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def model_per_example_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Run a Hugging Face causal LM on a collated batch and return per-example losses."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_example_loss(out.logits, batch["labels"])
