"""Evaluation: correlations against hand-computed values, standardised tables, any score file slots in."""
from __future__ import annotations

import json
import math

import pytest
import torch

from untrac_pl.evaluation import (
    correlate,
    evaluate_directory,
    evaluate_seeds,
    pearson,
    spearman,
    standardise,
    summarise,
)
from untrac_pl.evaluation.ground_truth import ground_truth_table
from untrac_pl.evaluation.report import write_report
from untrac_pl.scores import ScoreTable


def _hand_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_pearson_matches_hand_computation():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # by hand: means 2.5/2.5, cov = 4.0, var = 5.0 each -> 0.8
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(0.8, abs=1e-5)
    x2, y2 = [0.3, -1.2, 2.5, 0.0, 1.1], [1.0, -0.5, 1.5, 0.2, -0.3]
    assert pearson(torch.tensor(x2), torch.tensor(y2)) == pytest.approx(_hand_pearson(x2, y2), abs=1e-5)


def test_spearman_matches_hand_ranks_with_ties():
    x = [10.0, 20.0, 20.0, 40.0]  # ranks 1, 2.5, 2.5, 4
    y = [1.0, 3.0, 2.0, 4.0]      # ranks 1, 3, 2, 4
    expected = _hand_pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4])
    assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, abs=1e-5)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([30.0, 20.0, 10.0])) == pytest.approx(-1.0, abs=1e-5)


def test_constant_vector_is_undefined():
    assert math.isnan(pearson(torch.ones(4), torch.arange(4.0)))
    assert math.isnan(spearman(torch.arange(4.0), torch.zeros(4)))


def _table(matrix, rows, cols, method="m", row_unit="group"):
    return ScoreTable(torch.tensor(matrix, dtype=torch.float32), rows, rows, cols, cols, row_unit, "group", method)


def test_correlate_averages_subsets_per_test_set_and_aligns_order():
    groups = ["a", "b", "c", "d"]
    gt = _table([[1, 2, 3, 4], [4, 3, 2, 1], [0, 1, 0, 1]], ["tox/x", "tox/y", "wino/z"], groups, "ground_truth")
    # method: columns in another order, rows in another order
    m_rows = ["wino/z", "tox/y", "tox/x"]
    m_cols = ["d", "c", "b", "a"]
    est = {"tox/x": [1, 3, 2, 4], "tox/y": [4, 3, 2, 1], "wino/z": [1, 1, 1, 1]}  # in a,b,c,d order
    matrix = [[est[r][groups.index(c)] for c in m_cols] for r in m_rows]
    out = correlate(_table(matrix, m_rows, m_cols), gt)
    assert out["subsets"]["tox/x"]["pearson"] == pytest.approx(0.8, abs=1e-5)
    assert out["subsets"]["tox/y"]["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert out["test_sets"]["tox"]["pearson"] == pytest.approx(0.9, abs=1e-5)
    assert out["test_sets"]["tox"]["num_subsets"] == 2
    assert math.isnan(out["test_sets"]["wino"]["pearson"]) and out["test_sets"]["wino"]["num_undefined"] == 1


def test_example_level_tables_are_compared_at_group_level():
    # GT from per-example losses: rows = queries (two per subset), columns = groups
    base = torch.tensor([1.0, 1.0, 2.0, 2.0])
    loo = {"a": torch.tensor([1.5, 1.7, 2.0, 2.0]), "b": torch.tensor([1.0, 1.2, 2.4, 2.2]), "c": torch.tensor([0.9, 1.0, 2.1, 2.1])}
    gt = ground_truth_table(base, loo, ["q0", "q1", "q2", "q3"], ["s1", "s1", "s2", "s2"])
    assert gt.method == "ground_truth" and gt.row_unit == "example" and gt.col_unit == "group"
    g = gt.group_level()
    assert g.row_ids == ["s1", "s2"]
    assert g.scores[0].tolist() == pytest.approx([0.6, 0.1, -0.05], abs=1e-5)  # L(θ_-k) - L(θ0), positive = helped
    # a method scored per training example (UnTrac-Inv style: rows = subsets, cols = examples)
    inv = ScoreTable(torch.tensor([[0.6, 0.6, 0.1, 0.1, -0.1, 0.0], [0.0, 0.0, 0.3, 0.3, 0.1, 0.1]]), ["s1", "s2"], ["s1", "s2"],
                     ["e0", "e1", "e2", "e3", "e4", "e5"], ["a", "a", "b", "b", "c", "c"], "group", "example", "untrac_inv")
    out = correlate(inv, gt)
    assert out["subsets"]["s1"]["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert out["test_sets"]["test"]["pearson"] > 0.9


def test_standardise_and_summarise():
    z = standardise(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert z[0].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert z[1].tolist() == [0.0, 0.0, 0.0]
    s = summarise([0.2, 0.4, float("nan")])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(math.sqrt(0.02)) and s["n"] == 2
    assert summarise([0.5])["std"] == 0.0


def test_evaluate_directory_accepts_any_score_file_and_writes_report(tmp_path):
    groups = ["a", "b", "c", "d"]
    for seed, noise in ((0, 0.0), (1, 0.5)):
        folder = tmp_path / "scores" / "A" / f"seed{seed}"
        gt = _table([[1, 2, 3, 4]], ["test"], groups, "ground_truth")
        gt.save(folder / "ground_truth.safetensors")
        _table([[1, 2, 3, 4 + noise]], ["test"], groups, "untrac").save(folder / "untrac.safetensors")
        # a baseline written by other code, with its own column order, slots in unchanged
        _table([[4, 3, 2, 1]], ["test"], groups, "graddot").save(folder / "graddot.safetensors")
    metrics = evaluate_directory(tmp_path / "scores")
    assert set(metrics["A"]["methods"]) == {"untrac", "graddot"}
    p = metrics["A"]["methods"]["untrac"]["test_sets"]["test"]["pearson"]
    assert p["n"] == 2 and p["values"][0] == pytest.approx(1.0, abs=1e-5)
    assert metrics["A"]["methods"]["graddot"]["test_sets"]["test"]["pearson"]["mean"] == pytest.approx(-1.0, abs=1e-5)
    written = write_report(metrics, tmp_path / "out", title="t", command="untrac-pl reproduce -c x.yaml")
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["command"] == "untrac-pl reproduce -c x.yaml"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "GradDot" in md and "UnTrac" in md and "Ground truth" in md
    assert sorted(written["figures"]) == ["heatmap_A.png", "scatter_A.png"]
    assert (tmp_path / "out" / "heatmap_A.png").stat().st_size > 1000


def test_means_over_fewer_seeds_than_the_setting_has_are_marked(tmp_path):
    """3 seeds; "gradcos" has a file in 2 of them and "tracin" a constant (undefined) row in one: their
    means are over 2 seeds and the table says so, with the left-out subsets counted."""
    groups = ["a", "b", "c", "d"]
    for seed in range(3):
        folder = tmp_path / "scores" / "A" / f"seed{seed}"
        _table([[1, 2, 3, 4]], ["test"], groups, "ground_truth").save(folder / "ground_truth.safetensors")
        _table([[1, 2, 3, 4 + seed]], ["test"], groups, "untrac").save(folder / "untrac.safetensors")
        if seed < 2:
            _table([[1, 2, 4, 3]], ["test"], groups, "gradcos").save(folder / "gradcos.safetensors")
        _table([[1, 1, 1, 1]] if seed == 0 else [[4, 3, 2, 1]], ["test"], groups, "tracin").save(folder / "tracin.safetensors")
    metrics = evaluate_directory(tmp_path / "scores")
    methods = metrics["A"]["methods"]
    assert methods["untrac"]["test_sets"]["test"]["pearson"]["n"] == 3
    assert methods["gradcos"]["num_seeds"] == 2 and methods["gradcos"]["test_sets"]["test"]["pearson"]["n"] == 2
    assert methods["tracin"]["test_sets"]["test"]["num_undefined"] == 1 and methods["tracin"]["test_sets"]["test"]["pearson"]["n"] == 2
    write_report(metrics, tmp_path / "out", title="t", command="c", figures=False)
    md = (tmp_path / "out" / "results.md").read_text()
    gradcos_row = next(line for line in md.splitlines() if line.startswith("| GradCos"))
    untrac_row = next(line for line in md.splitlines() if line.startswith("| UnTrac "))
    assert "(n=2/3)" in gradcos_row and "(n=" not in untrac_row
    assert "TracIn / test: 1" in md


def test_evaluate_seeds_rejects_missing_groups():
    gt = _table([[1, 2, 3]], ["test"], ["a", "b", "c"], "ground_truth")
    with pytest.raises(ValueError, match="lacks ground-truth groups"):
        evaluate_seeds([_table([[1, 2]], ["test"], ["a", "b"])], [gt])


def test_sweep_report_writes_table4_markdown_and_json(tmp_path):
    groups = ["a", "b", "c", "d"]
    folder = tmp_path / "scores" / "A" / "seed0"
    _table([[1, 2, 3, 4]], ["test"], groups, "ground_truth").save(folder / "ground_truth.safetensors")
    _table([[1, 2, 3, 4]], ["test"], groups, "untrac@sgd@0.001").save(folder / "untrac@sgd@0.001.safetensors")
    _table([[4, 3, 2, 1]], ["test"], groups, "untrac@adam@0.001").save(folder / "untrac@adam@0.001.safetensors")
    sweep = {"untrac@sgd@0.001": {"base": "untrac", "optimizer": "sgd", "lr": 1e-3},
             "untrac@adam@0.001": {"base": "untrac", "optimizer": "adam", "lr": 1e-3},
             "untrac@rmsprop@0.001": {"base": "untrac", "optimizer": "rmsprop", "lr": 1e-3}}  # diverged: no file
    write_report(evaluate_directory(tmp_path / "scores"), tmp_path / "out", title="t", command="cmd", sweep=sweep, figures=False)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| sgd | 0.001 | 1.000 |" in md and "| adam | 0.001 | -1.000 |" in md and "| rmsprop | 0.001 | n/a |" in md
    rows = {r["optimizer"]: r for r in json.loads((tmp_path / "out" / "ablation.json").read_text())["rows"]}
    assert rows["sgd"]["pearson"]["mean"] == pytest.approx(1.0, abs=1e-5) and rows["adam"]["pearson"]["mean"] == pytest.approx(-1.0, abs=1e-5)
    assert rows["rmsprop"]["pearson"] is None and rows["sgd"]["setting"] == "A" and rows["sgd"]["test_set"] == "test"


def test_reproduce_figures_fit_a_page_with_one_legend_and_readable_text(tmp_path, monkeypatch):
    """Seven methods (the paper's): the scatter is a grid (at most 4 columns, width/height <= 2.5), not
    one 7-panel strip; one shared legend for the figure; every text >= 10 pt; the overall title
    overlaps no panel title (heatmap and scatter)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    import untrac_pl.evaluation.report as report

    figures = {}
    save = report.save_figure_atomic

    def capture(path, figure, **kwargs):
        written = save(path, figure, **kwargs)
        figures[path.name] = figure
        return written

    monkeypatch.setattr(report, "save_figure_atomic", capture)
    groups = ["books", "wikipedia", "news", "forum", "stories", "tweets", "reviews", "science"]
    subsets = [f"toxigen/s{i}" for i in range(4)] + [f"winobias/s{i}" for i in range(3)]
    methods = ["untrac", "untrac_inv", "graddot", "gradcos", "tracin", "hif_lissa", "hif_arnoldi"]
    gen = torch.Generator().manual_seed(0)
    for seed in range(2):
        folder = tmp_path / "scores" / "A" / f"seed{seed}"
        _table(torch.randn(len(subsets), len(groups), generator=gen).tolist(), subsets, groups, "ground_truth").save(folder / "ground_truth.safetensors")
        for name in methods:
            _table(torch.randn(len(subsets), len(groups), generator=gen).tolist(), subsets, groups, name).save(folder / f"{name}.safetensors")
    written = write_report(evaluate_directory(tmp_path / "scores"), tmp_path / "out", title="t", command="c", method_names=methods)
    assert sorted(written["figures"]) == ["heatmap_A.png", "scatter_A.png"]

    width, height = Image.open(tmp_path / "out" / "scatter_A.png").size
    assert width / height <= 2.5 and width <= 2000, (width, height)  # was 3080 x 418 (7.4 : 1)
    scatter = figures["scatter_A.png"]
    panels = [ax for ax in scatter.axes if ax.get_visible() and ax.axison]
    assert len(panels) == 7
    assert max(ax.get_subplotspec().colspan.stop for ax in panels) <= 4
    assert len(scatter.legends) == 1 and not any(ax.get_legend() for ax in scatter.axes)  # one shared legend
    assert len(scatter.legends[0].get_texts()) == len(groups)
    for name in ("scatter_A.png", "heatmap_A.png"):
        fig = figures[name]
        canvas = FigureCanvasAgg(fig)  # closed by write_figures: draw it again (same layout) to measure the text
        canvas.draw()
        renderer = canvas.get_renderer()
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")) if t.get_text().strip() and t.get_visible()]
        small = sorted({(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 10})
        assert not small, f"{name}: text below 10 pt: {small[:5]}"
        suptitle = fig._suptitle.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_title():
                assert not suptitle.overlaps(ax.title.get_window_extent(renderer)), f"{name}: suptitle overlaps '{ax.get_title()}'"
    width, height = Image.open(tmp_path / "out" / "heatmap_A.png").size
    assert width <= 2400 and width / height <= 2.5, (width, height)
    heat_panels = [ax for ax in figures["heatmap_A.png"].axes if ax.get_title()]
    assert len(heat_panels) == 8 and max(ax.get_subplotspec().colspan.stop for ax in heat_panels) <= 4
