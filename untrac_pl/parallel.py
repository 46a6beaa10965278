"""Several unlearning targets ascended at once (``attribution.parallel_targets: K``).

The paper's UnTrac takes one batch-1 step after another for each target; such a step leaves most of
the hardware idle. Here K targets (training groups for UnTrac, queries for UnTrac-Inv) are unlearned
in ONE batched computation: each target gets its own copy of the trainable tensors, stacked to
``[K, ...]`` (:func:`stack_trainable`); every step evaluates each target's own micro-batch under its
own copy through ``torch.func.vmap`` over ``torch.func.functional_call`` (:func:`parallel_step_losses`),
and one optimizer over the stacked tensors updates all K. Adam, AdamW and SGD act element by
element, so one optimizer over a stacked tensor is K independent optimizers with the same step
count; ``unlearning.max_grad_norm`` is applied per target (:func:`clip_per_target`). The model's own
parameters stay at θ0 throughout; the K unlearned parameter sets are then scored in one pass
(:mod:`untrac_pl.multiquery`).

What makes it equal to the sequential run (to float rounding; the padded shapes differ, tested):

* right padding on a causal LM: no attention mask is passed (vmap cannot trace Hugging Face's mask
  checks); a real token never attends to the padding after it, and positions start at 0 as unpadded;
* the K targets of one chunk share their step structure (number of micro-batches and step ends,
  :func:`plan_signature`); :func:`parallel_chunks` groups them so;
* dropout: vmap draws independent masks per target (``randomness="different"``), not the masks of the
  sequential run's per-target seed, so with dropout on the two agree in distribution, not run by run.

Memory: K copies of the trainable tensors, their gradients and optimizer state, and K micro-batches'
activations at once (LoRA: K copies of the adapters only). Refused: ``16-mixed`` (one loss scale
would skip every target's step when one overflows), ``unlearning.max_loss`` (a per-target early
stop) and several processes.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from untrac_pl.data.schedule import plan_signature
from untrac_pl.losses import IGNORE_INDEX, LossReduction, no_cache_accepted, per_example_loss
from untrac_pl.quantization import ScaleConfigError
from untrac_pl.runtime import canonical_precision


def check_parallel_options(config, schedule, trainer_kwargs: Optional[dict] = None) -> None:
    """Refuse what K targets stepped together cannot do, naming the setting to change (before any output)."""
    k = config.parallel_targets
    if config.targets_per_pass > 1:
        raise ScaleConfigError(f"attribution.parallel_targets={k} already scores its targets in one pass; "
                               f"set attribution.targets_per_pass: 1 (got {config.targets_per_pass})")
    if schedule.max_loss is not None:
        raise ScaleConfigError(f"model.unlearning.max_loss stops one target early, which {k} targets stepped together cannot; "
                               "remove max_loss or set attribution.parallel_targets: 1")
    if canonical_precision((trainer_kwargs or {}).get("precision")) == "16-mixed":
        raise ScaleConfigError(f"trainer.precision=16-mixed has one loss scale for all {k} parallel targets (an overflow in one "
                               "would skip every target's step); use bf16-mixed or 32-true, or attribution.parallel_targets: 1")


def parallel_chunks(targets: Sequence, plans: dict, k: int) -> list[list]:
    """``targets`` in chunks of at most ``k`` that share a :func:`plan_signature`, in order of first appearance."""
    groups: dict[tuple, list] = {}
    for target in targets:
        groups.setdefault(plan_signature(plans[target.id]), []).append(target)
    return [members[i : i + k] for members in groups.values() for i in range(0, len(members), k)]


def stack_trainable(net: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
    """``{name: [k, *shape]}`` copies of the trainable parameters (θ0 each), leaves that require grad."""
    return {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())).requires_grad_(True)
            for n, p in net.named_parameters() if p.requires_grad}


def unstack(stacked: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Target ``i``'s parameter set (views of the stacked tensors, detached)."""
    return {n: t.detach()[i] for n, t in stacked.items()}


def parallel_step_losses(net: torch.nn.Module, stacked: dict[str, torch.Tensor], batch: dict,
                         reduction: LossReduction = "example_mean") -> torch.Tensor:
    """Each target's share of its step's loss, ``[K]`` (the sequential ``_ascent_loss``, per target)."""

    extra = {"use_cache": False} if no_cache_accepted(net) else {}  # a loss builds no key/value cache

    def one(params, input_ids, labels, denominator, micro_batches):
        logits = functional_call(net, params, args=(), kwargs={"input_ids": input_ids, **extra}, strict=False).logits
        if reduction == "token_mean":  # the model's own loss: token mean of the shifted labels
            shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            return nll / (shift_labels != IGNORE_INDEX).sum().clamp_min(1) / micro_batches
        return per_example_loss(logits, labels).sum() / denominator

    with _without_padding_check(net), warnings.catch_warnings():
        # CPU flash attention has no vmap batching rule: torch loops over the K targets for that one op (measured
        # speed-ups in benchmarks/README.md include it); the warning would repeat every step
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
        return vmap(one, randomness="different")(stacked, batch["input_ids"], batch["labels"], batch["denominator"], batch["micro_batches"])


@contextmanager
def _without_padding_check(net: torch.nn.Module):
    """Hugging Face models look for a pad token in ``input_ids`` when no attention mask is given (to warn);
    that test is data-dependent, which vmap cannot trace. The padding is on the right, where a causal model
    needs no mask, so the check is switched off (``config.pad_token_id``, read by nothing else in a forward)."""
    config = getattr(net, "config", None)
    saved = getattr(config, "pad_token_id", None)
    if saved is None:
        yield
        return
    config.pad_token_id = None
    try:
        yield
    finally:
        config.pad_token_id = saved


@torch.no_grad()
def clip_per_target(stacked: dict[str, torch.Tensor], max_norm: float) -> Optional[torch.Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` for each target's slice of the stacked gradients; the norms ``[K]``."""
    grads = [t.grad for t in stacked.values() if t.grad is not None]
    if not grads:
        return None
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).float().norm(2, dim=1) for g in grads], dim=1).norm(2, dim=1)
    coef = (float(max_norm) / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(k, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms
