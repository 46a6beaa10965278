"""What a reader needs to judge a correlation: the ground truth's reliability and ceiling, bootstrap CIs,
a permutation null, the group-level LDS and the float noise, computed from a setting's score folder.

Everything is computed on the first θ0 seed's folder (``seed<k>/``): its ground truth (the mean over
batch orders), its batch orders' tables in ``orders/`` (reliability), its methods' ``run<r>/`` files
(the statistic is the mean over runs, as in the paper's tables), its ``lds.json`` and its ``noise/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from untrac_pl.evaluation.ground_truth import GROUND_TRUTH
from untrac_pl.evaluation.metrics import align, correlate, run_dirs
from untrac_pl.evaluation.statistics import (
    bootstrap_ci,
    ceiling,
    lds,
    mean_row_correlation,
    permutation_null,
    spearman_brown,
    test_retest,
)
from untrac_pl.scores import ScoreTable

ORDERS_DIR, LDS_FILE, NOISE_DIR = "orders", "lds.json", "noise"


def _gt_file(folder: Path) -> Path:
    return folder / f"{GROUND_TRUTH}.safetensors"


def reliability(seed_dir: Path) -> Optional[dict]:
    """Per test set: test–retest Pearson between the first two batch orders, the reliability of their mean
    (Spearman–Brown for the number of orders averaged) and the ceilings √reliability."""
    files = sorted((Path(seed_dir) / ORDERS_DIR).glob(f"{GROUND_TRUTH}_order*.safetensors"), key=lambda p: int(p.stem.rsplit("order", 1)[1]))
    if len(files) < 2:
        return None
    a, b = (ScoreTable.load(f) for f in files[:2])
    ma, gb, rows, _ = align(b, a)  # b on a's subsets and groups
    r = test_retest(gb, ma, rows)
    k = len(files)
    return {t: {"test_retest": v, "orders": k, "mean_reliability": spearman_brown(v, k), "ceiling_single": ceiling(v),
                "ceiling": ceiling(spearman_brown(v, k))} for t, v in r.items()}


def _runs_matrix(seed_dir: Path, name: str, gt: ScoreTable) -> Optional[torch.Tensor]:
    tables = [ScoreTable.load(d / f"{name}.safetensors") for d in run_dirs(seed_dir) if (d / f"{name}.safetensors").exists()]
    if not tables:
        return None
    return torch.stack([align(t, gt)[0] for t in tables])


def float_noise(seed_dir: Path, method_names: Sequence[str]) -> Optional[dict]:
    """Per method and test set, |ΔPearson| between the run at the default thread count and the noise run
    (each against its own first-order ground truth), and the ground truth's largest change relative to its spread."""
    folders = sorted((Path(seed_dir) / NOISE_DIR).glob("threads*"))
    folders = [f for f in folders if _gt_file(f).exists()]
    if not folders:
        return None
    noise_dir = folders[0]
    noisy_gt = ScoreTable.load(_gt_file(noise_dir))
    order = noisy_gt.metadata.get("batch_orders", [None])[0]
    main_gt_path = Path(seed_dir) / ORDERS_DIR / f"{GROUND_TRUTH}_order{order}.safetensors"
    main_gt = ScoreTable.load(main_gt_path if main_gt_path.exists() else _gt_file(Path(seed_dir)))
    g_main, g_noise = main_gt.group_level().scores.double(), noisy_gt.group_level().scores.double()
    out = {"threads": noise_dir.name.replace("threads", ""), "ground_truth_max_change": float((g_main - g_noise).abs().max()),
           "ground_truth_spread": float(g_main.std()), "methods": {}}
    noise_run = run_dirs(noise_dir)[0]
    main_run = Path(seed_dir) / noise_run.name if noise_run != noise_dir else Path(seed_dir)  # the same run, at the other thread count
    for name in method_names:
        a, b = main_run / f"{name}.safetensors", noise_run / f"{name}.safetensors"
        if a.exists() and b.exists():
            ca = correlate(ScoreTable.load(a), main_gt)["test_sets"]
            cb = correlate(ScoreTable.load(b), noisy_gt)["test_sets"]
            out["methods"][name] = {t: abs(ca[t]["pearson"] - cb[t]["pearson"]) for t in ca}
    return out


def lds_scores(seed_dir: Path, method_names: Sequence[str], gt: ScoreTable, resamples: int) -> Optional[dict]:
    """Group-level LDS of every method (its run-mean group scores) and of the ground truth itself."""
    path = Path(seed_dir) / LDS_FILE
    if not path.exists():
        return None
    import json

    record = json.loads(path.read_text())
    groups, subsets = record["groups"], record["subsets"]
    masks = torch.tensor([[g in chosen for g in groups] for chosen in record["included"]])
    losses = torch.tensor(record["losses"], dtype=torch.float64)
    g, rows, cols = _group(gt)
    order_rows = [rows.index(s) for s in subsets]
    order_cols = [cols.index(c) for c in groups]
    out = {"num_models": len(record["losses"]), "fraction": record.get("fraction"), "methods": {}}
    candidates = {GROUND_TRUTH: g.unsqueeze(0)}
    for name in method_names:
        m = _runs_matrix(Path(seed_dir), name, gt)
        if m is not None:
            candidates[name] = m
    for name, matrix in candidates.items():
        scores = matrix.mean(0)[order_rows][:, order_cols]
        out["methods"][name] = lds(scores, masks, losses, subsets, n_resamples=resamples)["test_sets"]
    return out


def _group(table: ScoreTable) -> tuple[torch.Tensor, list[str], list[str]]:
    g = table.group_level()
    return g.scores.double(), list(g.row_ids), list(g.col_ids)


def setting_statistics(setting_dir: Path, method_names: Sequence[str], bootstrap_resamples: int = 2000, permutations: int = 10000,
                       pairs: Sequence[tuple[str, str]] = (), seed: Optional[str] = None) -> dict:
    """``{"seed", "reliability", "methods": {name: {test set: {"mean", "ci", "null"}}}, "lds", "float_noise", "agreement"}``;
    ``agreement["a|b"]``: per test set, mean Pearson per subset between the run-mean group scores of methods a and b."""
    setting_dir = Path(setting_dir)
    seed_dirs = sorted((p for p in setting_dir.iterdir() if p.is_dir() and _gt_file(p).exists()), key=lambda p: p.name)
    if not seed_dirs:
        return {}
    named = [p for p in seed_dirs if p.name == seed]
    seed_dir = named[0] if named else seed_dirs[0]
    gt = ScoreTable.load(_gt_file(seed_dir))
    g, rows, _ = _group(gt)
    methods = {}
    for name in method_names:
        m = _runs_matrix(seed_dir, name, gt)
        if m is None or not torch.isfinite(m).all():
            continue
        observed = mean_row_correlation(m, g, rows)
        ci = bootstrap_ci(m, g, rows, n_resamples=bootstrap_resamples)
        null = permutation_null(m, g, rows, n_permutations=permutations)
        methods[name] = {t: {"mean": observed[t], "ci": list(ci[t]), "null": null[t], "num_runs": int(m.shape[0])} for t in observed}
    agreement = {}
    for a, b in pairs:
        ma, mb = _runs_matrix(seed_dir, a, gt), _runs_matrix(seed_dir, b, gt)
        if ma is not None and mb is not None:
            agreement[f"{a}|{b}"] = mean_row_correlation(ma.mean(0), mb.mean(0), rows)
    return {"seed": seed_dir.name, "reliability": reliability(seed_dir), "methods": methods, "agreement": agreement,
            "lds": lds_scores(seed_dir, method_names, gt, bootstrap_resamples), "float_noise": float_noise(seed_dir, method_names),
            "theta0": {"unigram": gt.metadata.get("unigram"), "mean_query_loss": gt.metadata.get("base_query_loss")}}
