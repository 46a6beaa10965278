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
    """``mean ± std`` over seeds (× runs); ``(n=k/N)`` when only k of the setting's N seed / run folders have a value."""
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
        title = f"Standardised influence on `{test_set}` (z-score over training groups per subset, mean over subsets, seeds and runs)"
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
    """Our Pearson per test set next to the paper's Table 3 (settings named equal/unequal), the difference, the
    ceiling the ground truth's reliability allows, and what the paper's claim looks like here."""
    blocks = []
    for setting in ("equal", "unequal"):
        if setting not in metrics:
            continue
        result = metrics[setting]
        rel = (result.get("statistics") or {}).get("reliability") or {}
        header = ["method"] + [f"{t} {col}" for t in PAPER_TEST_SETS for col in ("(ours)", "(paper)", "(ours − paper)")]
        rows = []
        for name in method_names:
            if name not in result["methods"]:
                continue
            paper = PAPER_TABLE3[setting].get(display(name))
            row = [display(name)]
            for j, t in enumerate(PAPER_TEST_SETS):
                ours = result["methods"][name]["test_sets"].get(t, {}).get("pearson")
                row.append(_fmt(ours))
                row.append(f"{paper[j]:.3f}" if paper else "n/a")
                row.append(f"{ours['mean'] - paper[j]:+.3f}" if paper and ours and math.isfinite(ours.get("mean", float("nan"))) else "n/a")
            rows.append(row)
        for name, paper in PAPER_TABLE3[setting].items():
            if name not in [display(n) for n in method_names]:
                rows.append([name] + [v for j in range(3) for v in ("not run", f"{paper[j]:.3f}", "")])
        if rel:
            rows.append(["*ceiling (√ reliability of the mean GT)*"] + [v for t in PAPER_TEST_SETS for v in (_num(rel.get(t, {}).get("ceiling")), "", "")])
        text = f"#### {setting} corpus sizes (Pearson)\n\n" + _md_table(header, rows)
        verdict = paper_verdict(result, method_names, setting)
        blocks.append(text + ("\n\n" + verdict if verdict else ""))
    return "\n\n".join(blocks)


def paper_verdict(result: dict, method_names: list[str], setting: str) -> str:
    """The paper's claim checked here: UnTrac / UnTrac-Inv at or above the paper on >= 2 of 3 test sets, and above every baseline."""
    baselines = [n for n in method_names if n in result["methods"] and display(n) in PAPER_TABLE3[setting] and display(n) not in ("UnTrac", "UnTrac-Inv")]
    lines = []
    for name in ("untrac", "untrac_inv"):
        if name not in result["methods"]:
            continue
        paper = PAPER_TABLE3[setting][display(name)]
        ours = [result["methods"][name]["test_sets"].get(t, {}).get("pearson", {}).get("mean", float("nan")) for t in PAPER_TEST_SETS]
        at_or_above = [t for t, o, p in zip(PAPER_TEST_SETS, ours, paper) if math.isfinite(o) and o >= p]
        beaten = []
        for t, o in zip(PAPER_TEST_SETS, ours):
            best = max((result["methods"][b]["test_sets"].get(t, {}).get("pearson", {}).get("mean", float("nan")) for b in baselines), default=float("nan"))
            if math.isfinite(o) and math.isfinite(best) and o > best:
                beaten.append(t)
        lines.append(f"{display(name)}: at or above the paper on {len(at_or_above)} of 3 test sets ({', '.join(at_or_above) or 'none'}); "
                     f"above every baseline on {len(beaten)} of 3 ({', '.join(beaten) or 'none'}).")
    return "Checked against the paper's claim (at or above its values on at least two test sets, above every baseline): " + " ".join(lines) if lines else ""


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
                fig.suptitle(f"{setting}: ground truth vs estimate (mean over seeds and runs)", fontsize=FONT["suptitle"])
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


def _num(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def reliability_markdown(stats: dict) -> str:
    rel = stats.get("reliability")
    if not rel:
        return ("Ground-truth reliability: not measured (one batch order; set `protocol.batch_orders` to two or more "
                "seeds to measure how much the ground truth agrees with itself).")
    k = next(iter(rel.values()))["orders"]
    rows = [[t, _num(v["test_retest"]), _num(v["mean_reliability"]), _num(v["ceiling_single"]), _num(v["ceiling"])] for t, v in rel.items()]
    header = ["test set", "test–retest r (2 batch orders)", f"reliability of the {k}-order mean GT (Spearman–Brown)",
              "ceiling vs one order (√r)", f"ceiling vs the {k}-order mean"]
    return ("Ground-truth reliability (per test subset: Pearson over the training groups between the ground truths of two batch "
            "orders, same θ0 initialisation; mean over the subsets). The ceiling is the highest correlation any method can "
            "reach against a ground truth this noisy.\n\n" + _md_table(header, rows))


def _p(null: dict) -> str:
    """The permutation p-value; below 0.001 as a bound (the smallest possible value is 1 / number of permutations)."""
    p = null.get("p_value")
    return "p=n/a" if not isinstance(p, (int, float)) or not math.isfinite(p) else "p<0.001" if p < 0.001 else f"p={p:.3f}"


def statistics_markdown(stats: dict, method_names: list[str]) -> str:
    """Mean over runs, bootstrap 95 % CI (training groups resampled) and the permutation null per method and test set."""
    entries = stats.get("methods", {})
    names = [n for n in method_names if n in entries]
    if not names:
        return ""
    test_sets = list(dict.fromkeys(t for n in names for t in entries[n]))
    rows = []
    for n in names:
        row = [display(n)]
        for t in test_sets:
            e = entries[n].get(t)
            if not e:
                row.append("n/a")
                continue
            lo, hi = e["ci"]
            row.append(f"{_num(e['mean'])} [{_num(lo, 2)}, {_num(hi, 2)}] {_p(e['null'])} (null 95 %: {_num(e['null']['null_q95'], 2)})")
        rows.append(row)
    nulls = [f"{t}: {'all ' if entries[names[0]][t]['null']['exact'] else ''}{entries[names[0]][t]['null']['n']} permutations"
             for t in test_sets if t in entries[names[0]]]
    runs = max(entries[n][t]["num_runs"] for n in names for t in entries[n])
    return (f"Pearson with the ground truth on `{stats['seed']}` (mean over its {runs} run(s)), with a bootstrap 95 % CI "
            "(training groups resampled with replacement) and a permutation p-value (the same statistic with the method's "
            "group labels shuffled, one permutation for every subset and run; one-sided), and what chance gives: the 95th percentile "
            "of that null, per method (it depends on the method's own scores). Permutations: " + "; ".join(nulls) + ".\n\n"
            + _md_table(["method"] + test_sets, rows))


def lds_markdown(stats: dict, method_names: list[str]) -> str:
    block = stats.get("lds")
    if not block:
        return ""
    names = [GROUND_TRUTH] + [n for n in method_names if n in block["methods"]]
    test_sets = list(dict.fromkeys(t for n in names if n in block["methods"] for t in block["methods"][n]))
    rows = []
    for n in names:
        if n not in block["methods"]:
            continue
        cells = []
        for t in test_sets:
            e = block["methods"][n].get(t)
            cells.append(f"{_num(e['lds'])} [{_num(e['ci'][0], 2)}, {_num(e['ci'][1], 2)}]" if e else "n/a")
        rows.append([("**" + display(n) + "** (its own scores)") if n == GROUND_TRUTH else display(n)] + cells)
    share = block.get("fraction")
    return (f"Group-level LDS: {block['num_models']} models, each trained from θ0's initialisation for the same steps on a random "
            f"{'half' if share == 0.5 else f'{share:.0%}' if share else 'subset'} of the training groups; a method predicts each model's test-subset loss by summing its scores of the groups "
            "left out. Spearman over the models per subset, mean per test set, bootstrap 95 % CI over the models. 0 = no "
            "predictive power.\n\n" + _md_table(["method"] + test_sets, rows))


def noise_markdown(stats: dict) -> str:
    block = stats.get("float_noise")
    if not block:
        return ""
    deltas = [v for per in block["methods"].values() for v in per.values() if isinstance(v, float) and math.isfinite(v)]
    worst = max(deltas) if deltas else float("nan")
    return (f"Float noise: the first batch order's ground truth and the first run's methods recomputed with {block['threads']} torch "
            f"thread(s) (same code, data and config) moved the ground truth by at most {_num(block['ground_truth_max_change'], 4)} "
            f"nats (its spread across subsets and groups: {_num(block['ground_truth_spread'], 4)}) and each method's Pearson by at "
            f"most {_num(worst, 4)} (median {_num(sorted(deltas)[len(deltas) // 2] if deltas else float('nan'), 4)}). Byte-identical results "
            "hold only on the same machine and software.")


def theta0_markdown(stats: dict) -> str:
    t = stats.get("theta0") or {}
    u = t.get("unigram")
    if not u:
        return ""
    return (f"θ0 on `{stats['seed']}`: mean test loss {_num(t.get('mean_query_loss'))} nats; a unigram model of the training tokens "
            f"scores {_num(u['test_loss'])} on the same test examples (training-token entropy {_num(u['train_entropy'])}); "
            f"uniform guess ln V = {_num(u['uniform'])}.")


def curves_markdown(result: dict, stats: dict, curves: dict) -> str:
    """Correlation against unlearning steps / epochs (paper Fig. 2/3), mean ± std over runs."""
    if not curves:
        return ""
    blocks = []
    for base in dict.fromkeys(c["curve"] for c in curves.values()):
        labels = [k for k, c in curves.items() if c["curve"] == base and k in result["methods"]]
        if not labels:
            continue
        test_sets = list(result["methods"][labels[0]]["test_sets"])
        length = curves[labels[0]]["over"].replace("num_", "")
        rows = [[str(curves[k]["value"])] + [_fmt(result["methods"][k]["test_sets"][t]["pearson"]) for t in test_sets] for k in labels]
        ref = curves[labels[0]].get("reference")
        text = f"{display(base)}: Pearson against the number of unlearning {length} (mean ± std over runs)\n\n" + _md_table([length] + test_sets, rows)
        first = labels[0]
        if ref and ref in result["methods"] and curves[first]["value"] == 1:
            agree = _agreement(stats, first, ref)
            text += (f"\n\nOne-step check: {display(base)} at 1 step vs {display(ref)} — Pearson with the ground truth "
                     + ", ".join(f"{t} {_fmt(result['methods'][first]['test_sets'][t]['pearson'])} vs {_fmt(result['methods'][ref]['test_sets'][t]['pearson'])}" for t in test_sets)
                     + (f"; direct agreement of their group scores (Pearson per subset, mean): {agree}" if agree else "") + ".")
        blocks.append(text)
    return "\n\n".join(blocks)


def _agreement(stats: dict, a: str, b: str) -> str:
    pair = (stats.get("agreement") or {}).get(f"{a}|{b}")
    return ", ".join(f"{t} {_num(v)}" for t, v in pair.items()) if pair else ""


def _theta0_spread_line(result: dict, names: list[str]) -> str:
    cells = [f"{display(n)} " + ", ".join(f"{t} {_num(v)}" for t, v in result["methods"][n]["theta0_std"].items())
             for n in names if result["methods"][n].get("theta0_std")]
    return ("Spread across θ0 seeds alone (std of the per-seed mean Pearson; θ0, data and ground truth redrawn; the std in the "
            "table above is over every seed × run pair, so it holds this spread and the runs' together): " + "; ".join(cells) + ".") if cells else ""


def write_curve_figures(metrics: dict, out_dir: Path, curves: dict) -> list[str]:
    """``curve_<setting>.png``: Pearson (mean ± std over runs) against steps / epochs, one line per test set."""
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for setting, result in metrics.items():
        bases = [b for b in dict.fromkeys(c["curve"] for c in curves.values()) if any(k in result["methods"] for k, c in curves.items() if c["curve"] == b)]
        if not bases:
            continue
        fig, axes = plt.subplots(1, len(bases), figsize=(5.2 * len(bases), 4.0), squeeze=False, layout="constrained")
        for ax, base in zip(axes.flat, bases):
            labels = [k for k, c in curves.items() if c["curve"] == base and k in result["methods"]]
            xs = [curves[k]["value"] for k in labels]
            for t in result["methods"][labels[0]]["test_sets"]:
                mean = [result["methods"][k]["test_sets"][t]["pearson"]["mean"] for k in labels]
                std = [result["methods"][k]["test_sets"][t]["pearson"]["std"] for k in labels]
                ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=t)
                ref = curves[labels[0]].get("reference")
                if ref and ref in result["methods"]:
                    ax.axhline(result["methods"][ref]["test_sets"][t]["pearson"]["mean"], ls=":", lw=1, color=ax.lines[-1].get_color())
            ax.set_xscale("log")
            ax.set_xlabel(f"unlearning {curves[labels[0]]['over'].replace('num_', '')}")
            ax.set_ylabel("Pearson with ground truth")
            ax.set_title(f"{display(base)} (dotted: {display(curves[labels[0]].get('reference') or '')})", fontsize=FONT["title"])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=FONT["legend"])
        fig.suptitle(f"{setting}: correlation against unlearning length", fontsize=FONT["suptitle"])
        path = save_figure_atomic(out_dir / f"curve_{setting}.png", fig, dpi=110)
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
    curves: Optional[dict] = None,
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
    figs += write_curve_figures(metrics, out_dir, curves or {}) if figures else []
    parts = [f"# {title}", "", f"Produced by:\n\n```\n{command}\n```", ""]
    if notes:
        parts += [notes.strip(), ""]
    if paper_table3 and main:
        parts += ["### Next to the paper's Table 3", "", paper_table3_markdown(metrics, main), ""]
    for setting, result in metrics.items():
        names = [m for m in main if m in result["methods"]]
        seeds = result.get("seeds", [])
        parts += [f"## Setting `{setting}` ({len(seeds)} seed(s): {', '.join(seeds)})", ""]
        stats = result.get("statistics") or {}
        runs = result.get("runs") or []
        if runs:
            parts[-2] = f"## Setting `{setting}` (θ0 seed(s): {', '.join(seeds)}; method runs: {', '.join(runs)})"
        over = "runs" if runs and len(seeds) == 1 else "seeds × runs" if runs else "seeds"
        for block in (theta0_markdown(stats), reliability_markdown(stats) if stats else ""):
            if block:
                parts += [block, ""]
        if names:
            parts += ["Correlation with the leave-group-out ground truth (per test subset over the training groups, "
                      f"averaged per test set; mean ± std over {over}):", "", correlation_markdown(setting, result, names), ""]
            spread = _theta0_spread_line(result, names)
            if spread:
                parts += [spread, ""]
            for block in (statistics_markdown(stats, names), lds_markdown(stats, names), noise_markdown(stats)):
                if block:
                    parts += [block, ""]
            parts += [standardised_markdown(result, names), ""]
        curve_text = curves_markdown(result, stats, curves or {})
        if curve_text:
            parts += [curve_text, ""]
        if sweep and any(n in result["methods"] for n in sweep):
            parts += ["Optimizer / learning-rate ablation (Pearson, mean ± std over seeds; Table 4 style):", "",
                      ablation_markdown(setting, result, sweep), ""]
        for fig in figs:
            if fig.endswith(f"_{setting}.png"):
                parts += [f"![{fig}]({fig})", ""]
    write_text_atomic(out_dir / "results.md", "\n".join(parts).rstrip() + "\n")
    return {"metrics": str(out_dir / "metrics.json"), "markdown": str(out_dir / "results.md"), "figures": figs}
