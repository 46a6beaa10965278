"""Statistics over group-level matrices, each checked against values computed by hand here.

Tolerances: metrics.pearson keeps torchmetrics' float32 states (~1e-7 precise) and metrics.spearman
adds 1e-6 to its denominator; the batched float64 resampling code is exact to ~1e-12.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

# imported as a module: its ``test_retest`` must not be collected as a test
from untrac_pl.evaluation import statistics as st
from untrac_pl.evaluation.metrics import pearson, spearman


def hand_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def hand_spearman(x, y):
    """No ties: 1 - 6 sum d^2 / (n (n^2 - 1))."""
    n = len(x)
    rank = lambda v: {val: i + 1 for i, val in enumerate(sorted(v))}
    rx, ry = rank(x), rank(y)
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y))
    return 1 - 6 * d2 / (n * (n * n - 1))


T = lambda rows: torch.tensor(rows, dtype=torch.float64)
ROWS = ["toxigen/asian", "toxigen/black", "wino/a"]
GT = [[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 0.0, 2.0], [0.5, 0.1, 0.3, 0.2]]
METHOD = [[2.0, 1.0, 4.0, 3.0], [3.0, 2.0, 1.0, 5.0], [0.4, 0.3, 0.1, 0.2]]


def test_mean_row_correlation_by_hand():
    got = st.mean_row_correlation(T(METHOD), T(GT), ROWS)
    assert set(got) == {"toxigen", "wino"}
    assert got["toxigen"] == pytest.approx((hand_pearson(METHOD[0], GT[0]) + hand_pearson(METHOD[1], GT[1])) / 2, abs=1e-6)
    assert got["wino"] == pytest.approx(hand_pearson(METHOD[2], GT[2]), abs=1e-6)
    sp = st.mean_row_correlation(T(METHOD), T(GT), ROWS, kind="spearman")
    assert sp["toxigen"] == pytest.approx((hand_spearman(METHOD[0], GT[0]) + hand_spearman(METHOD[1], GT[1])) / 2, abs=1e-5)
    # a constant GT row is undefined and skipped; names without "/" belong to "test"
    got = st.mean_row_correlation(T(METHOD[:2]), T([GT[0], [1.0] * 4]), ["a", "b"])
    assert got == {"test": pytest.approx(hand_pearson(METHOD[0], GT[0]), abs=1e-6)}
    with pytest.raises(ValueError):
        st.mean_row_correlation(T(METHOD), T(GT), ROWS, kind="kendall")


def test_runs_average_per_run_values():
    runs = torch.stack([T(METHOD), T(GT) + T([[0.0, 3.0, 0.0, 0.0]] * 3), -T(METHOD)])
    got = st.mean_row_correlation(runs, T(GT), ROWS)
    separate = [st.mean_row_correlation(run, T(GT), ROWS) for run in runs]
    for t in got:
        assert got[t] == pytest.approx(sum(s[t] for s in separate) / 3, abs=1e-12)


def test_test_retest_is_mean_row_pearson():
    assert st.test_retest(T(GT), T(METHOD), ROWS) == st.mean_row_correlation(T(METHOD), T(GT), ROWS)
    assert st.test_retest(T(GT), T(GT), ROWS) == {"toxigen": pytest.approx(1.0), "wino": pytest.approx(1.0)}


def test_spearman_brown_and_ceiling():
    assert st.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert st.spearman_brown(0.8) == pytest.approx(1.6 / 1.8)
    assert st.spearman_brown(0.5, k=3) == pytest.approx(0.75)
    assert math.isnan(st.spearman_brown(float("nan")))
    assert st.spearman_brown(-0.5) == -1.0 and st.spearman_brown(-1.0) == -1.0  # clipped / out of domain
    assert st.spearman_brown(1.0) == 1.0
    assert st.ceiling(0.81) == pytest.approx(0.9)
    assert st.ceiling(0.0) == 0.0 and st.ceiling(-0.2) == 0.0
    assert math.isnan(st.ceiling(float("nan")))


def test_batched_correlation_matches_metrics():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (30, 7), generator=g).double()  # many ties
    b = torch.randn(30, 7, generator=g, dtype=torch.float64)
    a[3] = 2.0  # constant row -> NaN
    for kind, fn, tol in (("pearson", pearson, 1e-6), ("spearman", spearman, 1e-5)):
        got = st._corr_batched(a, b, kind)
        want = torch.tensor([fn(x, y) for x, y in zip(a, b)], dtype=torch.float64)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=tol)


def test_permutation_null_exact_four_groups():
    gt = T([[1.0, 2.0, 4.0, 8.0], [3.0, 1.0, 2.0, 0.0]])
    rows = ["s/a", "s/b"]
    same = st.permutation_null(gt.clone(), gt, rows)["s"]
    assert same["exact"] and same["n"] == 24
    assert same["observed"] == pytest.approx(1.0)
    assert same["p_value"] == pytest.approx(1 / 24)
    assert same["null_mean"] == pytest.approx(0.0, abs=1e-12)  # every row's mean over all permutations is 0
    rev = st.permutation_null(gt.flip(-1), gt, rows)["s"]
    # the reversed method is the minimum of the null: every permutation is >= it
    assert rev["p_value"] == pytest.approx(1.0)
    assert rev["observed"] == pytest.approx(st.mean_row_correlation(gt.flip(-1), gt, rows)["s"])
    values, exact = st._permutation_values(gt.flip(-1), gt, rows, 10000, 0, "pearson")
    assert exact and float(values["s"].min()) == pytest.approx(rev["observed"])


def test_permutation_null_three_groups_hand_enumerated():
    method, gt = [[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]], [[2.0, 0.0, 1.0], [1.0, 3.0, 7.0]]
    hand = sorted((hand_pearson([method[0][i] for i in p], gt[0]) + hand_pearson([method[1][i] for i in p], gt[1])) / 2
                  for p in itertools.permutations(range(3)))
    values, exact = st._permutation_values(T(method), T(gt), ["t/a", "t/b"], 10000, 0, "pearson")
    assert exact and len(values["t"]) == 6
    assert sorted(values["t"].tolist()) == pytest.approx(hand, abs=1e-12)
    res = st.permutation_null(T(method), T(gt), ["t/a", "t/b"])["t"]
    assert min(abs(h - res["observed"]) for h in hand) < 1e-6  # observed = the identity's value
    identity = (hand_pearson(method[0], gt[0]) + hand_pearson(method[1], gt[1])) / 2
    assert res["p_value"] == pytest.approx(sum(h >= identity - 1e-9 for h in hand) / 6)


def test_permutation_is_shared_by_all_rows():
    # row 2 of the method is row 1 reversed: under one shared permutation the two rows' correlations
    # cancel, so the whole null is 0; independent per-row shuffles would spread it (q95 = 0.75)
    gt = T([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    method = T([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    res = st.permutation_null(method, gt, ["t/a", "t/b"])["t"]
    assert res["null_q95"] == pytest.approx(0.0, abs=1e-12) and res["p_value"] == pytest.approx(1.0)
    # the same permutation applies to every run too: run 2 = run 1 reversed -> null is 0 again
    runs = torch.stack([gt, gt.flip(-1)])
    res = st.permutation_null(runs, gt, ["t/a", "t/b"])["t"]
    assert res["null_q95"] == pytest.approx(0.0, abs=1e-12)


def test_permutation_null_random_draws():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(3, 8, generator=g, dtype=torch.float64)
    rows = ["a/x", "a/y", "b/x"]
    res = st.permutation_null(gt + 0.1 * torch.randn(3, 8, generator=g, dtype=torch.float64), gt, rows, n_permutations=500)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert not r["exact"] and r["n"] == 500
        assert 1 / 500 <= r["p_value"] < 0.05 and r["null_q95"] < r["observed"]
    again = st.permutation_null(gt, gt, rows, n_permutations=500, seed=3)
    assert again == st.permutation_null(gt, gt, rows, n_permutations=500, seed=3)


def test_bootstrap_ci():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(4, 12, generator=g, dtype=torch.float64)
    method = gt + torch.randn(4, 12, generator=g, dtype=torch.float64)
    rows = ["a/1", "a/2", "b/1", "b/2"]
    obs = st.mean_row_correlation(method, gt, rows)
    ci = st.bootstrap_ci(method, gt, rows, n_resamples=500)
    for t, (lo, hi) in ci.items():
        assert lo < obs[t] < hi and hi - lo > 0.05
    assert ci == st.bootstrap_ci(method, gt, rows, n_resamples=500)  # seeded
    # method == gt: every resample (same columns for both) gives 1
    for lo, hi in st.bootstrap_ci(gt, gt, rows, n_resamples=200).values():
        assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # 3 groups: only resamples with all 3 distinct columns are kept, and they all equal the observed value
    m3, g3 = T([[1.0, 3.0, 2.0]]), T([[0.0, 1.0, 5.0]])
    lo, hi = st.bootstrap_ci(m3, g3, ["t/a"], n_resamples=300)["t"]
    assert lo == pytest.approx(hand_pearson([1.0, 3.0, 2.0], [0.0, 1.0, 5.0])) == hi
    # runs: every run of a 3-D method is resampled on the same columns as the GT
    lo, hi = st.bootstrap_ci(torch.stack([gt, gt]), gt, rows, n_resamples=100)["a"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_lds_exact_and_negated():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(3, 6, generator=g, dtype=torch.float64)
    masks = torch.rand(20, 6, generator=g) < 0.5
    losses = (~masks).double() @ true.T  # loss = sum of the excluded groups' true influences
    rows = ["a/x", "a/y", "b/x"]
    res = st.lds(true, masks, losses, rows, n_resamples=200)
    for t in ("a", "b"):
        assert res["test_sets"][t]["lds"] == pytest.approx(1.0, abs=1e-5)
        assert res["test_sets"][t]["num_models"] == 20
        lo, hi = res["test_sets"][t]["ci"]
        assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert set(res["subsets"]) == set(rows)
    neg = st.lds(-true, masks, losses, rows, n_resamples=200)
    assert all(v["lds"] == pytest.approx(-1.0, abs=1e-5) for v in neg["test_sets"].values())


def test_lds_four_models_by_hand():
    scores = T([[1.0, 2.0, 4.0], [3.0, -1.0, 0.5]])
    masks = torch.tensor([[True, True, False], [False, True, True], [True, False, True], [False, False, True]])
    # excluded groups per model: {2}, {0}, {1}, {0, 1}
    pred0 = [4.0, 1.0, 2.0, 3.0]
    pred1 = [0.5, 3.0, -1.0, 2.0]
    losses = T([[1.0, 0.2], [0.3, 0.4], [0.5, 0.1], [0.2, 0.3]])
    res = st.lds(scores, masks, losses, ["s/a", "s/b"], n_resamples=100)
    want0 = hand_spearman(pred0, losses[:, 0].tolist())  # ranks (4,1,2,3) vs (4,2,3,1): d^2 = 0+1+1+4 -> 0.4
    want1 = hand_spearman(pred1, losses[:, 1].tolist())
    assert want0 == pytest.approx(0.4)
    assert res["subsets"]["s/a"] == pytest.approx(want0, abs=1e-5)
    assert res["subsets"]["s/b"] == pytest.approx(want1, abs=1e-5)
    assert res["test_sets"]["s"]["lds"] == pytest.approx((want0 + want1) / 2, abs=1e-5)
    lo, hi = res["test_sets"]["s"]["ci"]
    assert -1.0 <= lo <= hi <= 1.0


def test_dose_response():
    doses = [0, 1, 2, 5, 10, 20]
    up = st.dose_response(doses, [0.0, 0.1, 0.3, 0.4, 0.9, 1.5])
    assert up["spearman"] == pytest.approx(1.0, abs=1e-5) and up["monotone"] is True
    assert up["pearson"] == pytest.approx(hand_pearson(doses, [0.0, 0.1, 0.3, 0.4, 0.9, 1.5]), abs=1e-6)
    swapped = st.dose_response(doses, [0.0, 0.3, 0.1, 0.4, 0.9, 1.5])
    assert swapped["spearman"] == pytest.approx(1 - 6 * 2 / (6 * 35), abs=1e-5)
    assert swapped["monotone"] is False
    # order of the pairs does not matter
    assert st.dose_response(doses[::-1], [0.0, 0.1, 0.3, 0.4, 0.9, 1.5][::-1])["monotone"] is True
