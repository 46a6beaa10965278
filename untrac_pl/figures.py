"""The run's figure: the query-group x training-group heat map (``group_scores.png``).

matplotlib is imported inside the function (Agg backend, no display needed): it is a heavy import
(~0.5 s) that ``untrac-pl --help`` and the Python API's import should not pay for.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from untrac_pl.io import save_figure_atomic

# cells are annotated with their value when the table is at most this large (beyond, numbers are unreadable)
ANNOTATE_MAX_CELLS = 150
ANNOTATE_MAX_COLS = 16


def row_maxima(values: list[list[float]]) -> list[set[int]]:
    """Per row, the columns holding its largest finite value (ties: all of them; none if no finite value)."""
    out = []
    for row in values:
        finite = [v for v in row if math.isfinite(v)]
        best = max(finite) if finite else None
        out.append({j for j, v in enumerate(row) if best is not None and v == best})
    return out


def _size(rows: list[str], cols: list[str]) -> tuple[float, float, bool]:
    """(width, height) in inches and whether the column labels are rotated: about 0.75 in per
    column and 0.42 in per row, plus room for the labels at 10 pt, within a page-to-screen range."""
    rotate = len(cols) > 6 or max((len(c) for c in cols), default=0) > 8
    row_label = 0.085 * max((len(r) for r in rows), default=4)
    col_label = 0.085 * max((len(c) for c in cols), default=4) * (0.75 if rotate else 0) + 0.3
    width = min(max(5.0, 2.4 + row_label + 0.75 * len(cols)), 24.0)
    height = min(max(3.2, 1.6 + col_label + 0.42 * len(rows)), 30.0)
    return width, height, rotate


def group_heatmap(group, path: Path, title: Optional[str] = None, dpi: int = 110) -> Path:
    """Write the group-level :class:`~untrac_pl.scores.ScoreTable` ``group`` (rows = query groups,
    columns = training groups, in the order given) as a heat map PNG, atomically.

    Diverging colours centred on 0 (red = positive = the training group helped the query group);
    failed (NaN) cells grey; each row's maximum outlined (and its value bold when the cells are
    annotated, i.e. for tables of at most ``ANNOTATE_MAX_CELLS`` cells).
    """
    import matplotlib  # optional heavy dependency, imported only when a figure is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    values = group.scores.double().tolist()
    rows, cols = list(group.row_ids), list(group.col_ids)
    matrix = np.ma.masked_invalid(np.array(values, dtype=float).reshape(len(rows), len(cols)))
    finite = matrix.compressed()
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    width, height, rotate = _size(rows, cols)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")  # failed (NaN) cells grey
    with plt.rc_context({"font.size": 10}):
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        try:
            image = ax.imshow(matrix, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(cols)))
            ax.set_xticklabels(cols, rotation=45 if rotate else 0, ha="right" if rotate else "center", rotation_mode="anchor")
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels(rows)
            if len(rows) > 60:  # too many to label each: every k-th
                step = math.ceil(len(rows) / 60)
                ax.set_yticks(range(0, len(rows), step))
                ax.set_yticklabels(rows[::step])
            ax.set_xlabel("training group")
            ax.set_ylabel("query group")
            ax.tick_params(length=0)
            annotate = len(rows) * len(cols) <= ANNOTATE_MAX_CELLS and len(cols) <= ANNOTATE_MAX_COLS
            maxima = row_maxima(values)
            for i, best in enumerate(maxima):
                for j in best:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2 if annotate else 1.2))
            if annotate:
                for i, row in enumerate(values):
                    for j, v in enumerate(row):
                        if not math.isfinite(v):
                            ax.text(j, i, "n/a", ha="center", va="center", fontsize=9, color="#555555")
                            continue
                        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=9,
                                color="white" if abs(v) > 0.6 * vmax else "black", fontweight="bold" if j in maxima[i] else "normal")
            fig.suptitle(title or "group scores", fontsize=12)
            ax.set_title("outlined: each row's largest score", fontsize=10, color="#444444")
            fig.colorbar(image, ax=ax, shrink=0.9 if len(rows) > 3 else 1.0, label="mean score (positive = helped the query)")
            return save_figure_atomic(path, fig, dpi=dpi)
        finally:
            plt.close(fig)
