"""Correlation of any method's scores with the ground truth, per test subset, averaged per test set.

Any :class:`~untrac_pl.scores.ScoreTable` (UnTrac, UnTrac-Inv, a baseline, a file from elsewhere)
is compared at group level: rows = test subsets, columns = training groups. For every subset the
Pearson and Spearman correlations over the training groups are computed with torchmetrics; a test
set's value is the mean over its subsets; across seeds, mean ± sample standard deviation.

Subset names ``"<test set>/<subset>"`` give the test set (``"toxigen/asian"`` -> ``toxigen``); a
name without ``/`` belongs to the test set ``"test"`` (the synthetic datasets' single test set).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch

from untrac_pl.scores import ScoreTable


def test_set_of(subset: str) -> str:
    return subset.split("/", 1)[0] if "/" in subset else "test"


def group_matrix(table: ScoreTable) -> tuple[torch.Tensor, list[str], list[str]]:
    """``[subsets, groups]`` float64 matrix, subset names, group names."""
    g = table.group_level()
    return g.scores.double(), list(g.row_ids), list(g.col_ids)


def align(method: ScoreTable, ground_truth: ScoreTable) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Method and GT group matrices on the GT's subsets and groups (in the GT's order).

    Raises ``ValueError`` naming what the method lacks (every GT subset and group must be scored).
    """
    m, m_rows, m_cols = group_matrix(method)
    g, rows, cols = group_matrix(ground_truth)
    missing_cols = [c for c in cols if c not in m_cols]
    missing_rows = [r for r in rows if r not in m_rows]
    if missing_cols or missing_rows:
        raise ValueError(f"method '{method.method}' lacks ground-truth groups {missing_cols} / subsets {missing_rows}")
    m = m[[m_rows.index(r) for r in rows]][:, [m_cols.index(c) for c in cols]]
    return m, g, rows, cols


def _is_constant(x: torch.Tensor) -> bool:
    return bool((x.max() - x.min()).abs() <= 1e-12 * max(1.0, float(x.abs().max())))


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """torchmetrics Pearson of two vectors; NaN when either is constant (undefined)."""
    from torchmetrics.regression import PearsonCorrCoef

    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2 or _is_constant(x) or _is_constant(y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(PearsonCorrCoef()(x, y))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """torchmetrics Spearman (ties get mean ranks); NaN when either is constant."""
    from torchmetrics.regression import SpearmanCorrCoef

    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2 or _is_constant(x) or _is_constant(y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(SpearmanCorrCoef()(x, y))


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def correlate(method: ScoreTable, ground_truth: ScoreTable) -> dict:
    """Per subset and per test set Pearson/Spearman of ``method`` against ``ground_truth`` (one seed).

    Returns ``{"subsets": {s: {"pearson", "spearman"}}, "test_sets": {t: {"pearson", "spearman",
    "num_subsets", "num_undefined"}}}``; a test set's value is the mean over its subsets whose
    correlation is defined (``num_undefined`` counts constant rows).
    """
    m, g, rows, _ = align(method, ground_truth)
    subsets = {r: {"pearson": pearson(m[i], g[i]), "spearman": spearman(m[i], g[i])} for i, r in enumerate(rows)}
    test_sets: dict[str, dict] = {}
    for name in dict.fromkeys(test_set_of(r) for r in rows):
        members = [r for r in rows if test_set_of(r) == name]
        p = [subsets[r]["pearson"] for r in members]
        s = [subsets[r]["spearman"] for r in members]
        test_sets[name] = {
            "pearson": _nanmean(p),
            "spearman": _nanmean(s),
            "num_subsets": len(members),
            "num_undefined": sum(1 for v in p if not math.isfinite(v)),
        }
    return {"subsets": subsets, "test_sets": test_sets}


def standardise(matrix: torch.Tensor) -> torch.Tensor:
    """Z-score each row over the training groups (population std); a constant row becomes zeros."""
    matrix = matrix.double()
    mean = matrix.mean(dim=1, keepdim=True)
    std = matrix.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 0, (matrix - mean) / std.clamp_min(1e-300), torch.zeros_like(matrix))


def summarise(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` over seeds (sample std; 0 for one value; NaNs skipped)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0 if n else float("nan")
    return {"mean": mean, "std": std, "n": n, "values": [None if not math.isfinite(float(v)) else float(v) for v in values]}


def evaluate_seeds(method_tables: Sequence[ScoreTable], gt_tables: Sequence[ScoreTable]) -> dict:
    """Correlations of one method over seeds (``method_tables[i]`` vs ``gt_tables[i]``), plus tables.

    Returns ``{"test_sets": {t: {"pearson": summary, "spearman": summary}}, "subsets": {s: {...}},
    "standardised": {s: {group: mean z}}, "raw": {s: {group: mean score}}, "groups", "subsets_order"}``.
    """
    if len(method_tables) != len(gt_tables) or not gt_tables:
        raise ValueError("need one ground-truth table per method table")
    per_seed = [correlate(m, g) for m, g in zip(method_tables, gt_tables)]
    first = per_seed[0]
    test_sets = {
        t: {**{k: summarise([ps["test_sets"][t][k] for ps in per_seed]) for k in ("pearson", "spearman")},
            "num_subsets": first["test_sets"][t]["num_subsets"],
            # subsets left out of a seed's mean: constant or non-finite rows, summed over seeds
            "num_undefined": sum(ps["test_sets"][t]["num_undefined"] for ps in per_seed)}
        for t in first["test_sets"]
    }
    subsets = {
        s: {k: summarise([ps["subsets"][s][k] for ps in per_seed]) for k in ("pearson", "spearman")}
        for s in first["subsets"]
    }
    z, raw, rows, cols = _mean_tables(method_tables, gt_tables)
    return {
        "test_sets": test_sets,
        "subsets": subsets,
        "standardised": {r: dict(zip(cols, z[i].tolist())) for i, r in enumerate(rows)},
        "raw": {r: dict(zip(cols, raw[i].tolist())) for i, r in enumerate(rows)},
    }


def _mean_tables(tables: Sequence[ScoreTable], gt_tables: Sequence[ScoreTable]):
    zs, raws = [], []
    rows = cols = None
    for table, gt in zip(tables, gt_tables):
        m, _, rows, cols = align(table, gt)
        zs.append(standardise(m))
        raws.append(m)
    return torch.stack(zs).mean(0), torch.stack(raws).mean(0), rows, cols


def _expect_seeds(entry: dict, expected: int) -> None:
    """Record on every summary how many seeds the setting has, so a mean over fewer (a missing score
    file, a diverged or undefined seed) is shown as such instead of passing for the full average."""
    for block in ("test_sets", "subsets"):
        for values in entry.get(block, {}).values():
            for key in ("pearson", "spearman"):
                if isinstance(values.get(key), dict):
                    values[key]["expected"] = expected


def ground_truth_summary(gt_tables: Sequence[ScoreTable]) -> dict:
    """Mean standardised and raw GT (subset × group) over seeds."""
    z, raw, rows, cols = _mean_tables(gt_tables, gt_tables)
    return {
        "standardised": {r: dict(zip(cols, z[i].tolist())) for i, r in enumerate(rows)},
        "raw": {r: dict(zip(cols, raw[i].tolist())) for i, r in enumerate(rows)},
    }


def run_dirs(seed_dir) -> list:
    """The folders holding a seed folder's method files: its ``run<r>/`` subfolders (the paper's protocol:
    θ0 and the ground truth fixed, each run resamples the examples the methods use), else the folder itself."""
    from pathlib import Path

    seed_dir = Path(seed_dir)
    runs = sorted((p for p in seed_dir.glob("run*") if p.is_dir() and p.name[3:].isdigit()), key=lambda p: int(p.name[3:]))
    return runs or [seed_dir]


def evaluate_directory(root, methods: Optional[Sequence[str]] = None) -> dict:
    """Evaluate every score file under ``root/<setting>/seed<k>/[run<r>/]<method>.safetensors``.

    Each seed folder needs ``ground_truth.safetensors``; every other ``*.safetensors`` in it (or in its
    ``run<r>/`` subfolders, each scored against the seed folder's ground truth) is a method (any
    ScoreTable file — UnTrac, UnTrac-Inv, a baseline — slots in unchanged). Summaries are over every
    (seed, run) pair; with several θ0 seeds, ``theta0_std`` is the spread of the per-seed means (θ0 and
    ground-truth noise), reported apart from the run-to-run spread. Returns
    ``{setting: {"seeds", "runs", "ground_truth", "methods": {name: evaluate_seeds(...)}}}``.
    """
    from pathlib import Path

    root = Path(root)
    out: dict = {}
    for setting_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        seed_dirs = sorted((p for p in setting_dir.iterdir() if p.is_dir() and (p / "ground_truth.safetensors").exists()), key=lambda p: p.name)
        if not seed_dirs:
            continue
        gts = {p.name: ScoreTable.load(p / "ground_truth.safetensors") for p in seed_dirs}
        folders = [(p.name, d) for p in seed_dirs for d in run_dirs(p)]
        names = methods or sorted({f.stem for _, d in folders for f in d.glob("*.safetensors") if f.stem != "ground_truth"})
        result = {"seeds": list(gts), "runs": sorted({d.name for _, d in folders if d.name.startswith("run")}),
                  "ground_truth": ground_truth_summary(list(gts.values())), "methods": {}}
        for name in names:
            pairs = [(seed, ScoreTable.load(d / f"{name}.safetensors")) for seed, d in folders if (d / f"{name}.safetensors").exists()]
            if pairs:
                entry = evaluate_seeds([t for _, t in pairs], [gts[seed] for seed, _ in pairs])
                entry["num_seeds"] = len(pairs)
                _expect_seeds(entry, len(folders))
                if len(gts) > 1:
                    entry["theta0_std"] = _theta0_spread([seed for seed, _ in pairs], [t for _, t in pairs], gts)
                result["methods"][name] = entry
        out[setting_dir.name] = result
    return out


def _theta0_spread(seeds: Sequence[str], tables: Sequence[ScoreTable], gts: dict) -> dict:
    """Per test set, the sample std over θ0 seeds of the per-seed mean Pearson (NaN with one seed)."""
    per_seed: dict[str, dict[str, list[float]]] = {}
    for seed, table in zip(seeds, tables):
        for t, v in correlate(table, gts[seed])["test_sets"].items():
            per_seed.setdefault(t, {}).setdefault(seed, []).append(v["pearson"])
    return {t: summarise([_nanmean(v) for v in by_seed.values()])["std"] if len(by_seed) > 1 else float("nan") for t, by_seed in per_seed.items()}
