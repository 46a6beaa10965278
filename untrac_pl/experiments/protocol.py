"""The paper's evaluation protocol, plus what it lacks: a ground truth that measures its own noise.

* **Batch orders** (``protocol.batch_orders``): θ0 and every leave-group-out model are trained once per
  batch-order seed, from the same initialisation, with a coupled order (the leave-group-out model sees
  θ0's batch stream with the group's examples skipped, :class:`~untrac_pl.training.MixtureBatchSampler`).
  The ground truth is the mean over orders; two orders give its test–retest reliability.
* **Runs** (``protocol.runs``): θ0 and the ground truth stay fixed; each run resamples the examples the
  methods use (the paper's four runs), written to ``seed<k>/run<r>/``.
* **LDS models** (``protocol.lds_models``): M models, each trained from the same initialisation for the
  same steps on a random ``lds_fraction`` of the groups, for the group-level linear datamodeling score.
* **Curves** (``protocol.curves``): a method re-run at several step (or epoch) counts, the paper's Fig. 2/3.
* **Float noise** (``protocol.float_noise_threads``): the first seed's order-0 ground truth and run-0
  methods recomputed with another thread count, so a report says how much rounding alone moves it.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Sequence

import torch

from untrac_pl.data.tokenize import TokenizedCorpus
from untrac_pl.evaluation.ground_truth import GROUND_TRUTH
from untrac_pl.evaluation.power import LDS_FILE, NOISE_DIR, ORDERS_DIR
from untrac_pl.experiments.jobs import FitJob
from untrac_pl.experiments.methods import MethodSpec
from untrac_pl.io import write_json_atomic
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec

__all__ = ["LDS_FILE", "NOISE_DIR", "ORDERS_DIR", "Curve", "Protocol", "expand_curves", "lds_jobs", "lds_record", "mean_ground_truth", "unigram_baseline"]


@dataclass
class Curve:
    """``method`` (a ``methods:`` label) re-run with ``unlearning.<over>`` (``num_steps`` or ``num_epochs``) set to each of ``values``."""

    method: str
    over: Literal["num_steps", "num_epochs"] = "num_steps"
    values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    reference: Optional[str] = "gradcos"  # the one-step identity: UnTrac-Inv with Adam at 1 step ~ GradCos

    def label(self, value: int) -> str:
        return f"{self.method}@{'steps' if self.over == 'num_steps' else 'epochs'}={value}"


@dataclass
class Protocol:
    """How θ0, the ground truth and the methods' runs are laid out (module docstring)."""

    batch_orders: Optional[list[int]] = None  # None: one order, seeded by the θ0 seed (older reproductions)
    runs: Optional[list[int]] = None  # None: one run per θ0 seed, sampled with that seed
    lds_models: int = 0
    lds_fraction: float = 0.5
    curves: list[Curve] = field(default_factory=list)
    float_noise_threads: Optional[int] = None
    bootstrap_resamples: int = 2000
    permutations: int = 10000

    def __post_init__(self):
        self.curves = [Curve(**c) if isinstance(c, dict) else c for c in self.curves]
        if self.batch_orders is not None and (not self.batch_orders or len(set(self.batch_orders)) != len(self.batch_orders)):
            raise ValueError(f"protocol.batch_orders={self.batch_orders}: give distinct batch-order seeds (two give the ground truth's reliability)")
        if self.runs is not None and (not self.runs or len(set(self.runs)) != len(self.runs)):
            raise ValueError(f"protocol.runs={self.runs}: give distinct run seeds")
        if self.lds_models < 0 or (self.lds_models and self.lds_models < 8):
            raise ValueError(f"protocol.lds_models={self.lds_models}: 0 (off) or at least 8 models (32 or more for a useful LDS)")
        if not 0.0 < self.lds_fraction < 1.0:
            raise ValueError(f"protocol.lds_fraction={self.lds_fraction}: the share of groups each LDS model is trained on, strictly between 0 and 1")

    def orders(self, seed: int) -> list[Optional[int]]:
        return list(self.batch_orders) if self.batch_orders is not None else [None]

    def run_seeds(self, seed: int) -> list[Optional[int]]:
        """Sample seeds of the methods' runs; ``None``: the single run of the older layout (sampled with the θ0 seed)."""
        return list(self.runs) if self.runs is not None else [None]


def expand_curves(protocol: Protocol, methods: Sequence[MethodSpec]) -> tuple[list[MethodSpec], dict]:
    """The curves' method specs (labelled ``<method>@steps=<n>``) and ``{label: {"curve", "value"}}``."""
    extra, info = [], {}
    by_key = {m.key: m for m in methods}
    for curve in protocol.curves:
        base = by_key.get(curve.method)
        if base is None:
            raise ValueError(f"protocol.curves: method '{curve.method}' has no entry in methods: ({sorted(by_key)})")
        if base.unlearning is None or not hasattr(base.unlearning, curve.over):
            raise ValueError(f"protocol.curves: '{curve.method}' does not unlearn, so it has no unlearning.{curve.over}")
        other = "num_epochs" if curve.over == "num_steps" else "num_steps"
        for value in curve.values:
            spec = replace(base, label=curve.label(value), unlearning=replace(base.unlearning, **{curve.over: int(value), other: None}))
            extra.append(spec)
            info[spec.key] = {"curve": curve.method, "over": curve.over, "value": int(value), "reference": curve.reference}
    return extra, info


def mean_ground_truth(tables: Sequence[ScoreTable]) -> ScoreTable:
    """The mean of the batch orders' ground truths (same rows and columns), as one ground-truth table."""
    first = tables[0]
    for i, t in enumerate(tables[1:], 1):
        if t.row_ids != first.row_ids or t.col_ids != first.col_ids:
            raise ValueError(f"batch order {t.metadata.get('order_seed', i)}'s ground truth has other queries or groups than order "
                             f"{first.metadata.get('order_seed', 0)}'s")
    scores = torch.stack([t.scores.double() for t in tables]).mean(0).float()
    metadata = {k: v for k, v in first.metadata.items() if k not in ("order_seed", "base_query_loss")}
    return ScoreTable(scores, list(first.row_ids), list(first.row_groups), list(first.col_ids), list(first.col_groups),
                      first.row_unit, first.col_unit, GROUND_TRUTH, metadata)


def lds_subsets(groups: Sequence[str], num_models: int, fraction: float, seed: int) -> list[list[str]]:
    """``num_models`` distinct seeded random subsets of ``round(fraction * K)`` groups each (at least one in,
    one out); every such subset when there are no more than ``num_models`` of them (same init, same order
    and same groups give the same model, so a repeat would add nothing)."""
    groups = list(groups)
    size = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    if math.comb(len(groups), size) <= num_models:
        return [list(c) for c in itertools.combinations(groups, size)]
    rng = random.Random(f"lds:{seed}")
    chosen: list[list[str]] = []
    while len(chosen) < num_models:
        subset = sorted(rng.sample(groups, size), key=groups.index)
        if subset not in chosen:
            chosen.append(subset)
    return chosen


def lds_jobs(groups: Sequence[str], fit_spec: FitSpec, protocol: Protocol, seed: int) -> list[FitJob]:
    """One fit per LDS model: the same initialisation, steps and (coupled) batch order, only the chosen groups."""
    return [FitJob(f"lds{i}", replace(fit_spec, exclude_groups=[g for g in groups if g not in chosen], checkpoint_steps=[]))
            for i, chosen in enumerate(lds_subsets(groups, protocol.lds_models, protocol.lds_fraction, seed))]


def lds_record(groups: Sequence[str], jobs: Sequence[FitJob], results: Sequence[dict], query_groups: Sequence[str], fit_spec: FitSpec,
               protocol: Protocol, path) -> dict:
    """Write ``{"groups", "subsets", "included", "losses"}`` (group-level test losses of each LDS model) to ``path``."""
    groups = list(groups)
    subsets = list(dict.fromkeys(query_groups))
    members = {s: [i for i, g in enumerate(query_groups) if g == s] for s in subsets}
    included, losses = [], []
    for job, result in zip(jobs, results):
        per_query = torch.tensor(result["losses"], dtype=torch.float64)
        included.append([g for g in groups if g not in job.spec.exclude_groups])
        losses.append([float(per_query[members[s]].mean()) for s in subsets])
    record = {"groups": groups, "subsets": subsets, "included": included, "losses": losses, "requested": protocol.lds_models,
              "fraction": protocol.lds_fraction,
              "fit": {"max_steps": fit_spec.max_steps, "batch_size": fit_spec.batch_size, "order_seed": fit_spec.order_seed}}
    write_json_atomic(path, record)
    return record


def unigram_baseline(train_corpus: TokenizedCorpus, query_corpus: TokenizedCorpus, vocab_size: int) -> dict:
    """What a unigram model of the training tokens scores (nats), next to θ0's loss in every report: the
    training tokens' entropy and the test loss (per-example mean token NLL, add-one smoothed), and ln V."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for example in train_corpus.examples:
        labels = torch.tensor([t for t in example["labels"][1:] if t >= 0], dtype=torch.long)
        counts += torch.bincount(labels, minlength=vocab_size)[:vocab_size].double()
    logp = (counts / counts.sum()).log()
    entropy = float(-(logp.exp() * logp).sum())
    per_example = [float(-logp[[t for t in ex["labels"][1:] if t >= 0]].mean()) for ex in query_corpus.examples]
    return {"train_entropy": entropy, "test_loss": sum(per_example) / len(per_example), "uniform": float(torch.tensor(float(vocab_size)).log())}
