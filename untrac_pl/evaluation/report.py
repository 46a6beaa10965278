"""Reports of an evaluation: ``metrics.json``, a Markdown file, and PNG figures.

* correlation table: method × test set, Pearson and Spearman, mean ± std over seeds (Table 3 style)
* standardised-influence table: method (and ground truth) × training group, z-scored per test subset
  and averaged over the subsets of a test set and over seeds (Table 2 style)
* optional ablation table (optimizer × learning rate, Table 4 style) for swept methods
* figures: ground truth vs estimate per method (standardised, one point per subset × group) and a
  heat map of subset × group influence for the ground truth and every method
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from untrac_pl.evaluation.ground_truth import GROUND_TRUTH
from untrac_pl.evaluation.metrics import test_set_of
from untrac_pl.io import save_figure_atomic, write_json_atomic, write_text_atomic
from untrac_pl.methods import display_name

# Paper Table 3 (Pearson; equal / unequal corpus sizes), from docs/paper.md.
PAPER_TABLE3 = {
    "equal": {
        "GradDot": (-0.123, 0.418, 0.156), "GradCos": (-0.050, 0.524, 0.447), "HIF (Arnoldi)": (-0.068, 0.559, 0.250),
        "HIF (LiSSA)": (-0.040, 0.389, -0.178), "TracIn": (0.207, 0.082, 0.591), "UnTrac": (0.419, 0.743, 0.314),
        "UnTrac-Inv": (0.372, 0.813, 0.582),
    },
    "unequal": {
        "GradDot": (-0.250, 0.446, -0.524), "GradCos": (-0.337, 0.496, -0.401), "HIF (Arnoldi)": (-0.343, 0.584, -0.362),
        "HIF (LiSSA)": (0.071, -0.092, -0.098), "TracIn": (-0.187, 0.183, 0.081), "UnTrac": (0.403, 0.518, 0.246),
        "UnTrac-Inv": (0.393, 0.275, 0.360),
    },
}
PAPER_TEST_SETS = ("toxigen", "winobias", "truthfulqa")
def display(name: str) -> str:
    """A method's display name from the registry (``UnTrac-Inv``); ``Ground truth``; else the label itself."""
    return "Ground truth" if name == GROUND_TRUTH else display_name(name)


def _fmt(summary: Optional[dict], digits: int = 3) -> str:
    """``mean ± std`` over seeds; ``(n=k/N)`` when only k of the setting's N seeds have a value."""
    if not summary or summary.get("mean") is None or not math.isfinite(summary["mean"]):
        return "n/a"
    n = summary.get("n", 1)
    text = f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}" if n > 1 else f"{summary['mean']:.{digits}f}"
    expected = summary.get("expected")
    if expected and n < expected:
        text += f" (n={n}/{expected})"
    return text


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def standardised_by_test_set(entry: dict) -> dict:
    """``{test set: {group: mean z over its subsets}}`` from an ``evaluate_seeds`` / GT summary entry."""
    out: dict[str, dict] = {}
    for subset, row in entry["standardised"].items():
        bucket = out.setdefault(test_set_of(subset), {})
        for group, value in row.items():
            bucket.setdefault(group, []).append(value)
    return {t: {g: sum(v) / len(v) for g, v in groups.items()} for t, groups in out.items()}


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def correlation_markdown(setting: str, result: dict, method_names: list[str]) -> str:
    test_sets = list(dict.fromkeys(t for m in method_names for t in result["methods"][m]["test_sets"]))
    header = ["method"] + [f"{t} Pearson" for t in test_sets] + [f"{t} Spearman" for t in test_sets]
    rows = []
    for name in method_names:
        ts = result["methods"][name]["test_sets"]
        rows.append([display(name)] + [_fmt(ts.get(t, {}).get("pearson")) for t in test_sets] + [_fmt(ts.get(t, {}).get("spearman")) for t in test_sets])
    text = _md_table(header, rows)
    left_out = [f"{display(name)} / {t}: {ts[t]['num_undefined']}" for name in method_names
                for t, ts in [(t, result["methods"][name]["test_sets"]) for t in test_sets] if ts.get(t, {}).get("num_undefined")]
    if left_out:
        text += ("\n\nSubsets left out of the means because their correlation is undefined (constant or non-finite "
                 "scores), summed over seeds: " + "; ".join(left_out) + ".")
    return text


def standardised_markdown(result: dict, method_names: list[str]) -> str:
    gt = standardised_by_test_set(result["ground_truth"])
    blocks = []
    for test_set, groups_map in gt.items():
        groups = list(groups_map)
        header = ["method"] + groups
        rows = [["**Ground truth**"] + [f"{groups_map[g]:+.2f}" for g in groups]]
        for name in method_names:
            z = standardised_by_test_set(result["methods"][name]).get(test_set, {})
            rows.append([display(name)] + [f"{z[g]:+.2f}" if g in z else "n/a" for g in groups])
        title = f"Standardised influence on `{test_set}` (z-score over training groups per subset, mean over subsets and seeds)"
        blocks.append(f"{title}\n\n" + _md_table(header, rows))
    return "\n\n".join(blocks)


def ablation_markdown(setting: str, result: dict, sweep: dict) -> str:
    """Table 4 style: rows optimizer × lr, columns the swept methods' Pearson per test set."""
    labels = list(sweep)  # a cell without a score file (diverged ascent) shows as n/a
    bases = list(dict.fromkeys(sweep[n]["base"] for n in labels))
    combos = list(dict.fromkeys((sweep[n]["optimizer"], sweep[n]["lr"]) for n in labels))
    test_sets = list(dict.fromkeys(t for n in labels if n in result["methods"] for t in result["methods"][n]["test_sets"]))
    header = ["optimizer", "lr"] + [f"{display(b)} ({t})" for b in bases for t in test_sets]
    rows = []
    for opt, lr in combos:
        row = [opt, f"{lr:g}"]
        for b in bases:
            match = [n for n in labels if sweep[n]["base"] == b and (sweep[n]["optimizer"], sweep[n]["lr"]) == (opt, lr)]
            for t in test_sets:
                row.append(_fmt(result["methods"].get(match[0], {}).get("test_sets", {}).get(t, {}).get("pearson")) if match else "n/a")
        rows.append(row)
    return _md_table(header, rows)


def ablation_rows(metrics: dict, sweep: dict) -> list[dict]:
    """The ablation as flat rows (``ablation.json``): one per setting × swept method × test set, with
    Pearson and Spearman summaries over seeds; a cell with no score file (diverged) has ``null`` values."""
    rows = []
    for setting, result in metrics.items():
        test_sets = list(dict.fromkeys(t for n in sweep if n in result["methods"] for t in result["methods"][n]["test_sets"]))
        for label, info in sweep.items():
            for t in test_sets:
                ts = result["methods"].get(label, {}).get("test_sets", {}).get(t)
                rows.append({"setting": setting, "method": info["base"], "optimizer": info["optimizer"], "lr": info["lr"], "test_set": t,
                             "label": label, "pearson": ts["pearson"] if ts else None, "spearman": ts["spearman"] if ts else None})
    return rows


def paper_table3_markdown(metrics: dict, method_names: list[str]) -> str:
    """Our Pearson per test set next to the paper's Table 3 (settings named equal/unequal)."""
    blocks = []
    for setting in ("equal", "unequal"):
        if setting not in metrics:
            continue
        result = metrics[setting]
        header = ["method"] + [f"{t} (paper)" if i % 2 else f"{t} (ours)" for t in PAPER_TEST_SETS for i in range(2)]
        rows = []
        for name in method_names:
            if name not in result["methods"]:
                continue
            paper = PAPER_TABLE3[setting].get(display(name))
            row = [display(name)]
            for j, t in enumerate(PAPER_TEST_SETS):
                row.append(_fmt(result["methods"][name]["test_sets"].get(t, {}).get("pearson")))
                row.append(f"{paper[j]:.3f}" if paper else "n/a")
            rows.append(row)
        for name, paper in PAPER_TABLE3[setting].items():
            if name not in [display(n) for n in method_names]:
                rows.append([name] + [v for j in range(3) for v in ("not run", f"{paper[j]:.3f}")])
        blocks.append(f"#### {setting} corpus sizes (Pearson)\n\n" + _md_table(header, rows))
    return "\n\n".join(blocks)


#: figure text sizes (points): every label is readable when the PNG is shown at page width
FONT = {"suptitle": 14, "title": 12, "label": 11, "tick": 10, "legend": 10}
MAX_COLUMNS = 4  # panels per figure row: a grid that fits a page instead of one long strip


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels: at most :data:`MAX_COLUMNS` columns, as square as that allows."""
    if n <= 3:
        cols = n
    elif n in (4, 5, 6, 9):
        cols = {4: 2, 5: 3, 6: 3, 9: 3}[n]
    else:
        cols = MAX_COLUMNS
    return math.ceil(n / cols), cols


def _pearson_title(name: str, test_sets: dict, width: int = 36) -> str:
    """Method name, then its Pearson per test set, wrapped to ``width`` characters (one panel at 12 pt)."""
    lines = ["Pearson:"]
    for t, v in test_sets.items():
        item = f"{t} {_fmt(v['pearson'], 2)}"
        if len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += (" " if lines[-1].endswith(":") else ", ") + item
        else:
            lines.append(item)
    return display(name) + "\n" + "\n".join(lines)


def write_figures(metrics: dict, out_dir: Path, method_names: list[str]) -> list[str]:
    """``scatter_<setting>.png`` (ground truth vs estimate, one panel per method) and
    ``heatmap_<setting>.png`` (subset x group influence, ground truth and every method), both as grids
    of at most :data:`MAX_COLUMNS` columns with one shared legend / colour bar, constrained layout (no
    title overlaps the panels) and text of at least 10 pt (:data:`FONT`)."""
    import matplotlib  # optional heavy dependency, imported only when figures are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rc = {"font.size": FONT["tick"], "axes.titlesize": FONT["title"], "axes.labelsize": FONT["label"],
          "xtick.labelsize": FONT["tick"], "ytick.labelsize": FONT["tick"], "legend.fontsize": FONT["legend"]}
    for setting, result in metrics.items():
        names = [n for n in method_names if n in result["methods"]]
        gt = result["ground_truth"]["standardised"]
        subsets = list(gt)
        groups = list(next(iter(gt.values())))
        # scatter: GT vs estimate, one panel per method, one legend (the training groups) for all
        if names:
            nrows, ncols = _grid(len(names))
            with plt.rc_context(rc):
                fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.7 * nrows + 1.3), squeeze=False,
                                         sharex=True, sharey=True, layout="constrained")
                colors = plt.cm.tab10.colors
                values = []
                for ax, name in zip(axes.flat, names):
                    est = result["methods"][name]["standardised"]
                    for k, group in enumerate(groups):
                        xs = [gt[s][group] for s in subsets]
                        ys = [est[s][group] for s in subsets]
                        values += [v for v in xs + ys if math.isfinite(v)]
                        ax.scatter(xs, ys, s=18, color=colors[k % 10], label=group, alpha=0.8)
                    ax.set_title(_pearson_title(name, result["methods"][name]["test_sets"]))
                    ax.grid(True, alpha=0.3)
                lim = max([2.6] + [abs(v) + 0.2 for v in values])
                for i, ax in enumerate(axes.flat):
                    if i >= len(names):
                        ax.set_axis_off()
                        continue
                    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
                    ax.set_xlim(-lim, lim)
                    ax.set_ylim(-lim, lim)
                    row, col = divmod(i, ncols)
                    if col == 0:
                        ax.set_ylabel("estimate (standardised)")
                    if row == nrows - 1 or i + ncols >= len(names):  # the lowest panel of its column
                        ax.set_xlabel("ground truth (standardised)")
                        ax.xaxis.set_tick_params(labelbottom=True)
                handles, labels = axes.flat[0].get_legend_handles_labels()
                entry = 0.75 + 0.085 * max(len(g) for g in groups)  # inches per legend entry at 10 pt
                fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(len(groups), int(3.9 * ncols / entry))), title="training group",
                           markerscale=1.6, frameon=False)
                fig.suptitle(f"{setting}: ground truth vs estimate (mean over seeds)", fontsize=FONT["suptitle"])
                path = save_figure_atomic(out_dir / f"scatter_{setting}.png", fig, dpi=110)
                plt.close(fig)
            written.append(path.name)
        # heat maps: subset (y) x group (x), the ground truth first
        panels = [("ground_truth", gt)] + [(n, result["methods"][n]["standardised"]) for n in names]
        nrows, ncols = _grid(len(panels))
        label_width = 0.09 * max(len(s) for s in subsets)
        panel_w = max(1.6, 0.36 * len(groups))
        panel_h = max(1.8, 0.21 * len(subsets))
        group_label = 0.09 * max(len(g) for g in groups) * 0.8
        with plt.rc_context(rc):
            fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True, layout="constrained",
                                     figsize=(label_width + panel_w * ncols + 0.25 * ncols + 1.6,
                                              (panel_h + group_label + 0.6) * nrows + 0.7))
            for i, ax in enumerate(axes.flat):
                if i >= len(panels):
                    ax.set_axis_off()
                    continue
                name, table = panels[i]
                matrix = [[table[s][g] for g in groups] for s in subsets]
                image = ax.imshow(matrix, cmap="RdBu_r", vmin=-2.2, vmax=2.2, aspect="auto", interpolation="nearest")
                ax.set_xticks(range(len(groups)))
                ax.set_xticklabels(groups, rotation=60, ha="right", rotation_mode="anchor")
                ax.xaxis.set_tick_params(labelbottom=True)  # every panel names its columns
                ax.set_yticks(range(len(subsets)))
                ax.set_yticklabels(subsets)
                ax.set_title(display(name))
            fig.colorbar(image, ax=axes[:, :].ravel().tolist(), shrink=0.95 if nrows == 1 else 0.7,
                         label="standardised influence")
            fig.suptitle(f"{setting}: influence of training group (x) on test subset (y)", fontsize=FONT["suptitle"])
            path = save_figure_atomic(out_dir / f"heatmap_{setting}.png", fig, dpi=110)
            plt.close(fig)
        written.append(path.name)
    return written


def write_report(
    metrics: dict,
    out_dir: Path,
    *,
    title: str,
    command: str,
    notes: str = "",
    method_names: Optional[list[str]] = None,
    sweep: Optional[dict] = None,
    extra: Optional[dict] = None,
    paper_table3: bool = False,
    figures: bool = True,
) -> dict:
    """Write ``metrics.json``, ``results.md`` and figures into ``out_dir``; return what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if method_names is None:
        method_names = list(dict.fromkeys(m for r in metrics.values() for m in r["methods"]))
    main = [m for m in method_names if not sweep or m not in sweep]
    write_json_atomic(out_dir / "metrics.json", _clean({"command": command, "settings": metrics, "sweep": sweep or {}, **(extra or {})}))
    if sweep:
        write_json_atomic(out_dir / "ablation.json", _clean({"command": command, "rows": ablation_rows(metrics, sweep)}))
    figs = write_figures(metrics, out_dir, main) if figures and main else []
    parts = [f"# {title}", "", f"Produced by:\n\n```\n{command}\n```", ""]
    if notes:
        parts += [notes.strip(), ""]
    if paper_table3 and main:
        parts += ["### Next to the paper's Table 3", "", paper_table3_markdown(metrics, main), ""]
    for setting, result in metrics.items():
        names = [m for m in main if m in result["methods"]]
        seeds = result.get("seeds", [])
        parts += [f"## Setting `{setting}` ({len(seeds)} seed(s): {', '.join(seeds)})", ""]
        if names:
            parts += ["Correlation with the leave-group-out ground truth (per test subset over the training groups, "
                      "averaged per test set; mean ± std over seeds):", "", correlation_markdown(setting, result, names), ""]
            parts += [standardised_markdown(result, names), ""]
        if sweep:
            parts += ["Optimizer / learning-rate ablation (Pearson, mean ± std over seeds; Table 4 style):", "",
                      ablation_markdown(setting, result, sweep), ""]
        for fig in figs:
            if fig.endswith(f"_{setting}.png"):
                parts += [f"![{fig}]({fig})", ""]
    write_text_atomic(out_dir / "results.md", "\n".join(parts).rstrip() + "\n")
    return {"metrics": str(out_dir / "metrics.json"), "markdown": str(out_dir / "results.md"), "figures": figs}
