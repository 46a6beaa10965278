"""Per-example causal-LM loss: the one loss every method, baseline and ground truth uses.

Convention (docs/conventions): the loss of one example is the mean negative log-likelihood over its
target tokens, i.e. positions whose label is not ``IGNORE_INDEX`` (prompt tokens and padding are
masked). Labels are aligned with ``input_ids``; the shift happens here.

``loss_reduction: token_mean`` (the authors' convention, see README "Matching the authors' code")
averages tokens over a whole batch instead: the model's own Hugging Face loss of the batch
(``model(..., labels=...).loss``), given to every example of the batch (:func:`model_losses`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

IGNORE_INDEX = -100

LossReduction = Literal["example_mean", "token_mean"]


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


def lm_inputs(model: torch.nn.Module, batch: dict, labels: bool = False) -> dict:
    """The keyword arguments of a causal-LM forward on a collated batch.

    ``use_cache=False`` where the model has a key/value cache (its config says ``use_cache``) and its
    forward takes the argument: a loss needs no cache, and building one costs every forward.
    """
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if labels:
        kwargs["labels"] = batch["labels"]
    if no_cache_accepted(model):
        kwargs["use_cache"] = False
    return kwargs


def no_cache_accepted(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward can be told ``use_cache=False`` (a Hugging Face LM, or a wrapper such as
    peft's that passes keyword arguments on); a custom module without the argument is called without it."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return False
    return _forward_takes_use_cache(type(model))


@functools.lru_cache(maxsize=None)
def _forward_takes_use_cache(cls: type) -> bool:
    try:
        parameters = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def model_losses(model: torch.nn.Module, batch: dict, reduction: LossReduction = "example_mean", parameters: Optional[dict] = None) -> torch.Tensor:
    """Per-example losses ``[batch]`` of a Hugging Face causal LM on a collated batch.

    ``example_mean``: each example's own mean token NLL (:func:`per_example_loss`). ``token_mean``:
    every example gets the batch's token mean as the model itself computes it
    (``model(..., labels=...).loss``, the loss the authors' Hugging Face Trainer code uses), so group
    means of these values are the authors' per-dataset evaluation losses. ``parameters`` evaluates
    the model with other tensors in place of its own (``torch.func.functional_call``).
    """
    if reduction not in ("token_mean", "example_mean"):
        raise ValueError(f"unknown loss_reduction {reduction!r} (example_mean or token_mean)")
    kwargs = lm_inputs(model, batch, labels=reduction == "token_mean")
    out = model(**kwargs) if parameters is None else functional_call(model, parameters, args=(), kwargs=kwargs, strict=False)
    if reduction == "token_mean":
        return out.loss.float().expand(batch["input_ids"].shape[0]).clone()
    return per_example_loss(out.logits, batch["labels"])


def model_token_mean_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The batch's token-mean loss as a 0-d tensor: the model's own ``loss`` (Hugging Face convention)."""
    return model(**lm_inputs(model, batch, labels=True)).loss


def model_per_example_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Run a Hugging Face causal LM on a collated batch and return per-example losses."""
    return model_losses(model, batch)
