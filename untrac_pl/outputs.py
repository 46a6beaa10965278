"""The files an attribution run writes: their names, in one place.

    <output_dir>/
      scores.safetensors         query-major ScoreTable (+ group scores), metadata = what determined them
      rankings.json              top-k training units per query and per query group
      group_scores.csv / .md     the query-group x training-group table (shared groups on the diagonal)
      group_scores.png           that table as a heat map (each row's maximum outlined)
      memory.json                peak memory per phase
      summary.json               the command line, metadata + how the run went (timings, failed/resumed targets)
      config.yaml                the resolved config (CLI)
      baseline_group_scores.safetensors   a gradient method's own group table (target_unit: example)
      manifest.json              resume provenance (config hash, fingerprint, versions)
      tensorboard/               TensorBoard logs

While a run is unfinished it writes into ``<output_dir>.partial/`` (:class:`untrac_pl.io.StagedDirectory`),
which also holds ``progress/`` (the resume state, :mod:`untrac_pl.resume`).
"""
from __future__ import annotations

from pathlib import Path

SCORES = "scores.safetensors"
RANKINGS = "rankings.json"
GROUP_SCORES_CSV = "group_scores.csv"
GROUP_SCORES_MD = "group_scores.md"
GROUP_HEATMAP = "group_scores.png"
MEMORY = "memory.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
BASELINE_GROUP_SCORES = "baseline_group_scores.safetensors"
MANIFEST = "manifest.json"
PROGRESS = "progress"
TENSORBOARD = "tensorboard"
PARTIAL_SUFFIX = ".partial"


def partial_dir(output_dir) -> Path:
    """``<output_dir>.partial``: where an unfinished run writes."""
    final = Path(output_dir)
    return final.with_name(final.name + PARTIAL_SUFFIX)
