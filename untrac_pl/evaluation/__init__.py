"""Evaluation of attribution methods against the leave-group-out ground truth.

``ground_truth``: modified leave-group-out retraining → a ScoreTable (method ``ground_truth``).
``metrics``: per-subset Pearson/Spearman (torchmetrics) averaged per test set; standardised tables.
``report``: ``metrics.json``, Markdown and PNG figures. Any ScoreTable file can be evaluated.
"""
from untrac_pl.evaluation.metrics import (
    align,
    correlate,
    evaluate_directory,
    evaluate_seeds,
    ground_truth_summary,
    pearson,
    spearman,
    standardise,
    summarise,
    test_set_of,
)

__all__ = ["align", "correlate", "evaluate_directory", "evaluate_seeds", "ground_truth_summary", "pearson",
           "spearman", "standardise", "summarise", "test_set_of"]
