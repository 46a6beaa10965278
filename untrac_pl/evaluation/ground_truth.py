"""Leave-group-out ground truth, modified as in the paper (same init, same steps, batches from D \\ Z_k).

    GT[s, k] = L_s(θ_-k) − L_s(θ0)          positive = Z_k helped produce test subset s

Written as a :class:`~untrac_pl.scores.ScoreTable` exactly like the methods' outputs: query-major
(rows = test examples with their subset as row group, columns = training groups), same sign, method
``"ground_truth"``; ``group_level()`` gives the subset × group matrix (mean over a subset's examples).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from untrac_pl.data.tokenize import TokenizedCorpus
from untrac_pl.lm import CausalLMModule, example_losses
from untrac_pl.scores import ScoreTable
from untrac_pl.training import FitSpec, fit_lm

GROUND_TRUTH = "ground_truth"


def ground_truth_table(
    base_losses: torch.Tensor,
    loo_losses: dict[str, torch.Tensor],
    query_ids: Sequence[str],
    query_groups: Sequence[str],
    metadata: Optional[dict] = None,
) -> ScoreTable:
    """``scores[q, k] = loo_losses[k][q] - base_losses[q]`` as a query-major ScoreTable."""
    groups = list(loo_losses)
    if not groups:
        raise ValueError("no leave-group-out runs")
    columns = [loo_losses[g].double() - base_losses.double() for g in groups]
    scores = torch.stack(columns, dim=1).float()
    return ScoreTable(scores, list(query_ids), list(query_groups), groups, groups, "example", "group", GROUND_TRUTH, dict(metadata or {}))


def leave_group_out(
    module: CausalLMModule,
    init_state: dict,
    train_corpus: TokenizedCorpus,
    query_examples: Sequence[dict],
    query_ids: Sequence[str],
    query_groups: Sequence[str],
    fit_spec: FitSpec,
    base_losses: torch.Tensor,
    trainer_kwargs: Optional[dict] = None,
    logger_factory: Optional[Callable[[str], object]] = None,
    groups: Optional[Sequence[str]] = None,
    eval_batch_size: int = 32,
) -> tuple[ScoreTable, dict]:
    """Retrain from ``init_state`` without each group for ``fit_spec.max_steps`` steps; return GT and run info.

    ``module.net`` is left holding the last leave-group-out model; callers reload θ0 themselves.
    ``logger_factory(name)`` gives each retraining run its logger (e.g. TensorBoard, ``without_<k>``).
    """
    groups = list(groups or train_corpus.groups)
    pad = module.tokenizer.pad_token_id
    loo, runs = {}, {}
    for group in groups:
        module.net.load_state_dict(copy.deepcopy(init_state))
        spec = replace(fit_spec, exclude_groups=[group], checkpoint_steps=[])
        logger = logger_factory(f"without_{group}") if logger_factory else None
        runs[group] = fit_lm(module, train_corpus, spec, trainer_kwargs, logger=logger)
        loo[group] = example_losses(module.net, query_examples, pad, eval_batch_size)
    meta = {"fit": {"max_steps": fit_spec.max_steps, "batch_size": fit_spec.batch_size, "seed": fit_spec.seed}, "runs": runs}
    return ground_truth_table(base_losses, loo, query_ids, query_groups, meta), runs
