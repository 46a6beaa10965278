"""The ascent schedule of one unlearning target: which examples go in which micro-batch."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from untrac_pl.data.collate import PadCollator
from untrac_pl.losses import IGNORE_INDEX, LossReduction
from untrac_pl.optim import LrSchedule


@dataclass
class UnlearningSchedule:
    """How long and with what batches to ascend (paper defaults: UnTrac batch 1, one epoch; UnTrac-Inv whole target, 5 steps).

    Args:
        num_steps: optimizer steps per target (set exactly one of ``num_steps`` and ``num_epochs``).
        num_epochs: passes over the target.
        batch_size: examples per optimizer step (``null``: the whole target in one batch, the paper's
            UnTrac-Inv setting).
        micro_batch_size: examples per forward pass, the rest made up by gradient accumulation.
        shuffle: shuffle the target's examples each epoch (seeded by the target's seed).
        max_loss: stop a target's ascent early once a step's loss exceeds this (a per-example NLL, > 0).
        loss_reduction: ascent and scoring alike. ``example_mean``: a step's loss is the mean of its
            examples' mean token NLLs and every example is scored on its own loss (scores do not depend
            on batching); ``token_mean``: the authors' code (HF Trainer), each micro-batch's loss is its
            token mean divided by the step's number of micro-batches, and losses are the token mean of
            each evaluation batch (``data.eval_batch_size``, 8 there; batches within one group, in data
            order), repeated for its examples.
        max_grad_norm: clip each step's gradient to this global L2 norm (Lightning's ``clip_gradients``
            after AMP unscaling; ``null``/0: off, the paper's setting; the authors' ``arguments.py``
            default is 1.0, their scripts pass 0). Acts per target.
        lr_schedule: ``constant`` (paper) or ``linear`` (HF's default: ``warmup_steps`` of warm-up, then
            linear decay to 0 at the target's last planned step); per target, each being one training run.
        warmup_steps: warm-up steps of ``lr_schedule: linear`` (>= 0).
    """

    num_steps: Optional[int] = None
    num_epochs: Optional[int] = 1
    batch_size: Optional[int] = 1
    micro_batch_size: Optional[int] = None
    shuffle: bool = True
    max_loss: Optional[float] = None
    loss_reduction: LossReduction = "example_mean"
    max_grad_norm: Optional[float] = None
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        if self.max_grad_norm is not None and not (0 <= self.max_grad_norm < math.inf):
            raise ValueError(f"unlearning.max_grad_norm must be a finite number >= 0 (0 or null: no clipping), got {self.max_grad_norm}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"unlearning.lr_schedule must be constant or linear, got {self.lr_schedule!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"unlearning.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps and self.lr_schedule == "constant":
            raise ValueError("unlearning.warmup_steps needs unlearning.lr_schedule: linear (a constant lr has no warm-up)")
        if self.loss_reduction not in ("example_mean", "token_mean"):
            raise ValueError(f"unlearning.loss_reduction must be example_mean or token_mean, got {self.loss_reduction!r}")
        if (self.num_steps is None) == (self.num_epochs is None):
            raise ValueError("unlearning: set exactly one of num_steps and num_epochs")
        for name in ("num_steps", "num_epochs", "batch_size", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"unlearning.{name} must be >= 1, got {value}")
        if self.max_loss is not None and not (math.isfinite(self.max_loss) and self.max_loss > 0):
            raise ValueError(f"unlearning.max_loss must be a finite number > 0 (a per-example NLL), got {self.max_loss}")


def plan_micro_batches(num_examples: int, schedule: UnlearningSchedule, seed: int) -> list[dict]:
    """Micro-batches of positions ``0..num_examples-1`` with their step boundaries.

    Each entry: ``{"positions": [...], "denominator": n, "micro_batches": m, "step_end": bool}`` where
    ``denominator`` is the size of the optimizer batch it belongs to (the step's gradient is the batch
    mean) and ``micro_batches`` the number of micro-batches of that step (``token_mean`` divides each
    micro-batch's token mean by it, as Hugging Face's gradient accumulation does).
    """
    if num_examples < 1:
        raise ValueError("an unlearning target has no examples")
    rng = random.Random(seed)
    batch = schedule.batch_size or num_examples
    batch = min(batch, num_examples)
    micro = min(schedule.micro_batch_size or batch, batch)

    def epoch_order() -> list[int]:
        order = list(range(num_examples))
        if schedule.shuffle:
            rng.shuffle(order)
        return order

    steps: list[list[int]] = []
    if schedule.num_epochs is not None:
        for _ in range(schedule.num_epochs):
            order = epoch_order()
            steps.extend(order[i : i + batch] for i in range(0, num_examples, batch))
    else:
        stream: list[int] = []
        while len(steps) < schedule.num_steps:
            if len(stream) < batch:
                # the batch straddles two epochs: complete it with next-epoch examples it does not
                # already hold (each epoch stays a permutation; no example twice in one step)
                upcoming, held = epoch_order(), set(stream)
                fill = [i for i in upcoming if i not in held][: batch - len(stream)]
                taken = set(fill)
                stream = stream + fill + [i for i in upcoming if i not in taken]
            steps.append(stream[:batch])
            stream = stream[batch:]
    plan = []
    for step in steps:
        chunks = [step[i : i + micro] for i in range(0, len(step), micro)]
        for j, chunk in enumerate(chunks):
            plan.append({"positions": chunk, "denominator": len(step), "micro_batches": len(chunks), "step_end": j == len(chunks) - 1})
    return plan


def num_optimizer_steps(plan: Sequence[dict]) -> int:
    return sum(1 for entry in plan if entry["step_end"])


class AscentDataset(Dataset):
    """Serves the planned micro-batches of one target, already collated (use ``batch_size=None``)."""

    def __init__(self, examples: Sequence[dict], indices: Sequence[int], plan: list[dict], collator: PadCollator):
        self.examples, self.indices, self.plan, self.collator = examples, list(indices), plan, collator

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        entry = self.plan[i]
        batch = self.collator([self.examples[self.indices[p]] for p in entry["positions"]])
        batch["denominator"] = torch.tensor(float(entry["denominator"]))
        batch["micro_batches"] = torch.tensor(float(entry["micro_batches"]))
        batch["step_end"] = bool(entry["step_end"])  # a host value: reading it never waits for the device
        return batch


def plan_signature(plan: Sequence[dict]) -> tuple:
    """What must be equal for targets to step together: each micro-batch's step end."""
    return tuple(bool(entry["step_end"]) for entry in plan)


class ParallelAscentDataset(Dataset):
    """Item ``j``: micro-batch ``j`` of each of K targets, padded to one ``[K, B, T]`` batch.

    A target whose micro-batch is smaller gets padding rows whose labels are all ignored (they add
    nothing to its loss); ``denominator`` and ``micro_batches`` are ``[K]``.
    """

    def __init__(self, examples: Sequence[dict], indices: Sequence[Sequence[int]], plans: Sequence[list[dict]], collator: PadCollator):
        signatures = {plan_signature(p) for p in plans}
        if len(signatures) != 1:
            raise ValueError("targets stepped in parallel need the same micro-batch structure (parallel_chunks groups them)")
        self.examples, self.indices, self.plans, self.collator = examples, [list(i) for i in indices], list(plans), collator

    def __len__(self) -> int:
        return len(self.plans[0])

    def __getitem__(self, j: int) -> dict:
        entries = [plan[j] for plan in self.plans]
        parts = [[self.examples[idx[p]] for p in e["positions"]] for idx, e in zip(self.indices, entries)]
        rows = max(len(p) for p in parts)
        width = max(len(x["input_ids"]) for p in parts for x in p)
        pad = self.collator.pad_token_id
        filler = {"input_ids": [pad] * width, "labels": [IGNORE_INDEX] * width, "index": -1}
        # every part made up to `rows` examples, then one collation of K * rows examples right-padded to `width`
        batch = self.collator([x for p in parts for x in p + [filler] * (rows - len(p))])
        k = len(parts)
        return {
            "input_ids": batch["input_ids"].view(k, rows, width),
            "labels": batch["labels"].view(k, rows, width),
            "denominator": torch.tensor([float(e["denominator"]) for e in entries]),
            "micro_batches": torch.tensor([float(e["micro_batches"]) for e in entries]),
            "step_end": bool(entries[0]["step_end"]),  # equal for all K (same signature)
        }
