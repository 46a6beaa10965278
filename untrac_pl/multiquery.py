"""Several unlearned targets scored in one pass over the evaluation data (``targets_per_pass``).

With ``attribution.targets_per_pass: k`` UnTrac / UnTrac-Inv (:mod:`untrac_pl.methods.unlearning`)
unlearn ``k`` targets one after another (each from θ0, restored by RestoreWeights), keep each
target's changed tensors (:func:`changed_tensors`: the parameters that require grad — for LoRA just
the adapters — and any buffer that moved), and then run ONE predict pass
in which every evaluation batch is collated once and evaluated ``k`` times with
``torch.func.functional_call``, once per parameter set. The evaluation corpus is thus read and
collated once per chunk of ``k`` targets instead of once per target. Scores equal ``k = 1``'s: the
same tensors go through the same forward on the same batch.

Memory: ``k - 1`` extra copies of the trainable tensors stay on the model's device (adapters are
small; for a full model ``k - 1`` model copies). Choose ``k`` accordingly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from untrac_pl.losses import LossReduction, model_losses


def changed_tensors(net: torch.nn.Module, snapshot: Optional[dict] = None, clone: bool = True) -> dict[str, torch.Tensor]:
    """The tensors a target's ascent can change, by their name in ``net``.

    Parameters that require grad always; buffers only if they differ from the θ0 ``snapshot``
    (RestoreWeights' ``{"buffer:name": tensor}``), since language models rarely change any.
    """
    tensors = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    if snapshot:
        for name, buffer in net.named_buffers():
            saved = snapshot.get(f"buffer:{name}")
            if saved is not None and not torch.equal(saved.to(buffer.device), buffer):
                tensors[name] = buffer.detach()
    if clone:
        tensors = {n: t.clone() for n, t in tensors.items()}
    return tensors


def losses_with_parameter_sets(net: torch.nn.Module, parameter_sets: Sequence[dict], batch: dict,
                               reduction: LossReduction = "example_mean") -> torch.Tensor:
    """Per-example losses ``[k, B]`` of one collated batch under each of ``k`` parameter sets."""
    return torch.stack([model_losses(net, batch, reduction, parameters=params) for params in parameter_sets])

