"""Several unlearned targets scored in one pass over the evaluation data (``targets_per_pass``).

With ``attribution.targets_per_pass: k`` the engine unlearns ``k`` targets one after another (each
from θ0, restored by RestoreWeights), keeps each target's changed tensors — the parameters that
require grad (for LoRA: just the adapters) and any buffer that moved — and then runs ONE predict pass
in which every evaluation batch is collated once and evaluated ``k`` times with
``torch.func.functional_call``, once per parameter set. The evaluation corpus is thus read and
collated once per chunk of ``k`` targets instead of once per target. Scores equal ``k = 1``'s: the
same tensors go through the same forward on the same batch.

Memory: ``k - 1`` extra copies of the trainable tensors stay on the model's device (adapters are
small; for a full model ``k - 1`` model copies). Choose ``k`` accordingly.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch

from untrac_pl.errors import NonFiniteLossError
from untrac_pl.losses import LossReduction, model_losses

log = logging.getLogger(__name__)


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


def unlearn_and_score_chunk(runner, plan, chunk: Sequence, eval_loader, logger, schedule) -> dict[str, int]:
    """Unlearn every target of ``chunk`` and score them all in one predict pass; returns optimizer steps.

    ``runner`` is the :class:`~untrac_pl.engine.AttributionRunner` (its module, datamodule, restore
    callback, ranking writer and Trainer factory are used exactly as in the one-target path).
    """
    module = runner.module
    steps: dict[str, int] = {}
    kept: list[tuple] = []
    for position, target in enumerate(chunk):
        pl.seed_everything(target.seed, workers=True, verbose=False)
        module.target = target
        loader = runner.datamodule.ascent_dataloader(plan.target_corpus, target.indices, schedule, target.seed)
        trainer = runner._trainer(logger)
        try:
            trainer.fit(module, train_dataloaders=loader)
        except NonFiniteLossError as exc:
            log.warning("%s; target marked failed, continuing", exc)
            runner.writer.mark_failed(target.id, f"non-finite ascent loss ({exc.value})", exc.step)
            steps[target.id] = exc.step
            continue
        steps[target.id] = trainer.global_step
        last = position == len(chunk) - 1
        # the last target's tensors are the live ones: no copy needed
        kept.append((target, changed_tensors(module.net, runner.restore._snapshot, clone=not last)))
    if not kept:
        return steps
    module.target = kept[-1][0]
    module.pass_targets = [t for t, _ in kept]
    module.pass_parameters = [p for _, p in kept]
    try:
        runner._trainer(logger).predict(module, eval_loader, return_predictions=False)
    finally:
        module.pass_targets = None
        module.pass_parameters = None
    return steps
