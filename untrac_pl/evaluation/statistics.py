"""Uncertainty, reliability and null statistics for group-level attribution matrices.

Matrices are ``[subsets, groups]`` (rows = test subsets such as ``"toxigen/asian"``, columns =
training groups); a method may also be ``[runs, subsets, groups]``. The headline statistic is, per
test set, the mean over its subsets of the correlation over the groups between the method's row and
the ground truth's row (undefined rows skipped), averaged over runs. Everything here puts error
bars, a reliability ceiling or a chance level on that number.

The resampling functions evaluate thousands of resamples at once with a batched correlation that
follows :func:`~untrac_pl.evaluation.metrics.pearson` / ``spearman`` (same NaN rule for constant
rows, ties get mean ranks; torchmetrics' Spearman adds ``1e-6`` to its denominator, so the two
differ by about ``1e-6``).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from untrac_pl.evaluation.metrics import _nanmean, pearson, spearman, test_set_of

_CORR = {"pearson": pearson, "spearman": spearman}
_BLOCK = 4_000_000  # elements per batched block of resamples


def _test_sets(rows: Sequence[str]) -> dict[str, list[int]]:
    """Test set -> its row indices, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(test_set_of(r), []).append(i)
    return out


def _inputs(method: Tensor, gt: Tensor, rows: Sequence[str], kind: str) -> tuple[Tensor, Tensor]:
    if kind not in _CORR:
        raise ValueError(f"kind must be 'pearson' or 'spearman', not {kind!r}")
    m = method.double()
    m = m.unsqueeze(0) if m.dim() == 2 else m
    g = gt.double()
    if m.dim() != 3 or g.dim() != 2 or m.shape[1:] != g.shape or len(rows) != g.shape[0]:
        raise ValueError(f"method {tuple(method.shape)}, gt {tuple(gt.shape)} and {len(rows)} rows do not match")
    return m, g


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim; tied values share their mean rank."""
    x = x.contiguous()
    s = x.sort(dim=-1).values
    lo = torch.searchsorted(s, x, side="left")
    hi = torch.searchsorted(s, x, side="right")
    return (lo + hi + 1).double() / 2


def _corr_batched(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """Correlation along the last dim (broadcast); NaN where either vector is constant (as in metrics)."""
    a, b = torch.broadcast_tensors(a.double(), b.double())

    def constant(x: Tensor) -> Tensor:
        return (x.amax(-1) - x.amin(-1)).abs() <= 1e-12 * x.abs().amax(-1).clamp_min(1.0)

    undefined = constant(a) | constant(b)
    if kind == "spearman":
        a, b = _ranks(a), _ranks(b)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    r = (a * b).sum(-1) / ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()
    return r.clamp(-1.0, 1.0).masked_fill(undefined, float("nan"))


def _resampled(m: Tensor, g: Tensor, rows: Sequence[str], cols_m: Tensor, cols_g: Tensor, kind: str) -> dict[str, Tensor]:
    """The statistic per test set for each resample b: method columns ``cols_m[b]``, GT columns ``cols_g[b]``."""
    runs, subsets, groups = m.shape
    step = max(1, _BLOCK // (runs * subsets * groups))
    parts = []
    for start in range(0, len(cols_m), step):
        cm, cg = cols_m[start:start + step], cols_g[start:start + step]
        mb = m[:, :, cm].permute(2, 0, 1, 3)  # [b, runs, subsets, groups]
        gb = g[:, cg].permute(1, 0, 2).unsqueeze(1)  # [b, 1, subsets, groups]
        parts.append(_corr_batched(mb, gb, kind))
    corr = torch.cat(parts)  # [resamples, runs, subsets]
    return {t: corr[..., idx].nanmean(-1).nanmean(-1) for t, idx in _test_sets(rows).items()}


def _bootstrap_indices(n: int, n_resamples: int, seed: int) -> Tensor:
    """Seeded resamples of ``range(n)`` with replacement, keeping those with at least 3 distinct indices."""
    idx = torch.randint(n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))
    srt = idx.sort(-1).values
    distinct = (srt[:, 1:] != srt[:, :-1]).sum(-1) + 1
    return idx[distinct >= 3]


def _percentile_ci(values: Tensor, level: float) -> tuple[float, float]:
    values = values[~values.isnan()]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(torch.quantile(values, alpha)), float(torch.quantile(values, 1 - alpha))


def mean_row_correlation(method: Tensor, gt: Tensor, rows: Sequence[str], kind: str = "pearson") -> dict[str, float]:
    """Headline statistic: per test set, mean over its rows of ``kind``(method[i], gt[i]) over the groups.

    Undefined (constant) rows are skipped. A 3-D ``method`` ``[runs, subsets, groups]`` gives the mean
    over runs of each run's value, as the paper reports the mean over runs.
    """
    m, g = _inputs(method, gt, rows, kind)
    corr = _CORR[kind]
    per_run = [[corr(run[i], g[i]) for i in range(len(rows))] for run in m]
    return {t: _nanmean([_nanmean([vals[i] for i in idx]) for vals in per_run]) for t, idx in _test_sets(rows).items()}


def test_retest(gt_a: Tensor, gt_b: Tensor, rows: Sequence[str]) -> dict[str, float]:
    """Ground-truth reliability per test set: mean over subsets of Pearson between two GT replicates
    (e.g. two batch-order seeds). A method cannot be expected to agree with the GT better than this."""
    return mean_row_correlation(gt_a, gt_b, rows, "pearson")


def spearman_brown(r: float, k: int = 2) -> float:
    """Reliability of the mean of ``k`` replicates whose pairwise reliability is ``r``: k r / (1 + (k-1) r).

    NaN stays NaN. The result is clipped into [-1, 1]; where the denominator is <= 0 (r <= -1/(k-1),
    outside the formula's domain) the result is -1.
    """
    if math.isnan(r):
        return float("nan")
    denominator = 1 + (k - 1) * r
    if denominator <= 0:
        return -1.0
    return min(1.0, max(-1.0, k * r / denominator))


def ceiling(reliability: float) -> float:
    """Highest correlation any method can reach against a ground truth of this reliability:
    sqrt(reliability) when positive, 0.0 otherwise; NaN stays NaN."""
    if math.isnan(reliability):
        return float("nan")
    return math.sqrt(reliability) if reliability > 0 else 0.0


def bootstrap_ci(method: Tensor, gt: Tensor, rows: Sequence[str], n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0, kind: str = "pearson") -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of :func:`mean_row_correlation` per test set, ``{test_set: (low, high)}``.

    The training groups (columns) are resampled with replacement, the same indices for the method (all
    runs) and the GT. Resamples with fewer than 3 distinct columns are skipped (a correlation over them
    is meaningless); the percentiles come from the usable ones however few (NaN when none are).
    """
    m, g = _inputs(method, gt, rows, kind)
    idx = _bootstrap_indices(g.shape[1], n_resamples, seed)
    return {t: _percentile_ci(v, level) for t, v in _resampled(m, g, rows, idx, idx, kind).items()}


def _permutation_values(method: Tensor, gt: Tensor, rows: Sequence[str], n_permutations: int, seed: int,
                        kind: str) -> tuple[dict[str, Tensor], bool]:
    """Statistic per test set under each permutation of the method's columns (identity first), exact flag."""
    m, g = _inputs(method, gt, rows, kind)
    groups = g.shape[1]
    exact = math.factorial(groups) <= n_permutations
    if exact:
        perms = torch.tensor(list(itertools.permutations(range(groups))), dtype=torch.long)
    else:
        drawn = torch.rand(n_permutations - 1, groups, generator=torch.Generator().manual_seed(seed)).argsort(-1)
        perms = torch.cat([torch.arange(groups).unsqueeze(0), drawn])
    identity = torch.arange(groups).expand(len(perms), groups)
    return _resampled(m, g, rows, perms, identity, kind), exact


def permutation_null(method: Tensor, gt: Tensor, rows: Sequence[str], n_permutations: int = 10000, seed: int = 0,
                     kind: str = "pearson") -> dict[str, dict]:
    """Chance level of :func:`mean_row_correlation`: the statistic with the method's group labels shuffled.

    One permutation is applied to every row and every run. All ``groups!`` permutations are enumerated
    when that is at most ``n_permutations``, else the identity plus ``n_permutations - 1`` seeded random
    ones. Per test set: ``{"observed", "null_mean", "null_q95", "p_value", "n", "exact"}``; the one-sided
    p-value is the fraction of null values >= observed, the identity included (so p >= 1/n).
    """
    observed = mean_row_correlation(method, gt, rows, kind)
    values, exact = _permutation_values(method, gt, rows, n_permutations, seed, kind)
    out = {}
    for t, v in values.items():
        ref = v[0]  # identity, computed the same way as the null values
        p = float((v >= ref - 1e-12).double().mean()) if not ref.isnan() else float("nan")
        out[t] = {"observed": observed[t], "null_mean": float(v.nanmean()),
                  "null_q95": float(torch.quantile(v, 0.95)) if not v.isnan().any() else float("nan"),
                  "p_value": p, "n": len(v), "exact": exact}
    return out


def lds(scores: Tensor, masks: Tensor, losses: Tensor, rows: Sequence[str], n_resamples: int = 2000, seed: int = 0,
        level: float = 0.95) -> dict[str, dict]:
    """Group-level linear datamodeling score of a method's group influences.

    ``scores`` ``[subsets, groups]`` (positive = the group helped); ``masks`` ``[models, groups]`` bool
    (groups model m was trained on); ``losses`` ``[models, subsets]`` (its actual test losses). The
    prediction for model m is the sum of ``scores`` over the groups it EXCLUDED; per subset the LDS is
    the Spearman over models between prediction and loss, per test set the mean over its subsets, with
    a percentile bootstrap CI over models. Returns ``{"test_sets": {t: {"lds", "ci", "num_models"}},
    "subsets": {subset: lds}}``.
    """
    scores, losses, masks = scores.double(), losses.double(), masks.bool()
    if masks.shape[1] != scores.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]) or len(rows) != scores.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)}, masks {tuple(masks.shape)}, losses {tuple(losses.shape)} "
                         f"and {len(rows)} rows do not match")
    models = masks.shape[0]
    predicted = (~masks).double() @ scores.T  # [models, subsets]
    subsets = {r: spearman(predicted[:, i], losses[:, i]) for i, r in enumerate(rows)}
    idx = _bootstrap_indices(models, n_resamples, seed)
    boot = _corr_batched(predicted[idx].transpose(1, 2), losses[idx].transpose(1, 2), "spearman")  # [resamples, subsets]
    test_sets = {t: {"lds": _nanmean([subsets[rows[i]] for i in members]),
                     "ci": _percentile_ci(boot[:, members].nanmean(-1), level), "num_models": models}
                 for t, members in _test_sets(rows).items()}
    return {"test_sets": test_sets, "subsets": subsets}


def dose_response(doses: Sequence[float], scores: Sequence[float]) -> dict:
    """Does a method's score track a planted effect? ``{"spearman", "pearson", "monotone"}`` of the scores
    against the planted doses; ``monotone``: the scores never decrease as the dose increases."""
    d = torch.tensor([float(x) for x in doses], dtype=torch.float64)
    s = torch.tensor([float(x) for x in scores], dtype=torch.float64)
    ordered = s[d.argsort(stable=True)]
    return {"spearman": spearman(d, s), "pearson": pearson(d, s),
            "monotone": bool((ordered[1:] >= ordered[:-1]).all())}
