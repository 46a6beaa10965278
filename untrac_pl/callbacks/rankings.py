"""RankingWriter: collects per-target scores from predict and writes rankings, scores and tables."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from untrac_pl.board import RunBoard
from untrac_pl.distributed import merge_across_ranks
from untrac_pl.errors import OutputWriteError
from untrac_pl.figures import group_heatmap, row_maxima
from untrac_pl.io import write_json_atomic, write_text_atomic
from untrac_pl.outputs import (
    GROUP_HEATMAP,
    GROUP_SCORES_CSV,
    GROUP_SCORES_MD,
    PROGRESS,
    RANKINGS,
    SCORES,
)
from untrac_pl.scores import GroupIndex, ScoreTable, top_columns

# score matrices of at least this many entries (64 MiB of float32) are memory-mapped files in the run folder
MEMMAP_MIN_ENTRIES = 1 << 24

UNLEARNING_SIGN = "positive = the training unit helped produce the query (unlearning it raises the query loss)"

log = logging.getLogger(__name__)


def aligned_groups(group: ScoreTable) -> ScoreTable:
    """The group table with one group order for rows and columns: the query groups that are also
    training groups first, in the column order (so they sit on the diagonal), then the others in
    their own order. Columns are unchanged (the score file's order)."""
    cols = set(group.col_ids)
    shared = [group.row_ids.index(c) for c in group.col_ids if c in group.row_ids]
    order = shared + [r for r, name in enumerate(group.row_ids) if name not in cols]
    if order == list(range(len(group.row_ids))):
        return group
    rows = [group.row_ids[r] for r in order]
    return ScoreTable(group.scores[order], rows, [group.row_groups[r] for r in order], list(group.col_ids), list(group.col_groups),
                      group.row_unit, group.col_unit, group.method, dict(group.metadata))


class RankingWriter(BasePredictionWriter):
    """Turns ``predict_step`` outputs into the run's score matrix and rankings.

    One ``predict`` pass per unlearning target yields one score vector over the evaluation set;
    the run's :class:`~untrac_pl.methods.base.AttributionPlan` says whether that vector is a row
    (UnTrac-Inv: target = query) or a column (UnTrac: target = training group) of the query-major
    matrix. Outputs (all atomic): ``scores.safetensors``, ``rankings.json``, ``group_scores.csv``,
    ``group_scores.md`` and the heat map ``group_scores.png``; TensorBoard gets score histograms per query
    group and, in the Text tab, the group table, the query texts and the top-k (:mod:`untrac_pl.board`).
    """

    def __init__(self, output_dir: Optional[str] = None, top_k: int = 10, snippet_chars: int = 200, sign: str = UNLEARNING_SIGN,
                 display: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.top_k, self.snippet_chars, self.sign = top_k, snippet_chars, sign
        self.display = display  # the method's display name (UnTrac-Inv), for the heat map's title
        self.plan = None
        self.matrix: Optional[torch.Tensor] = None
        self.failed: dict[str, dict] = {}
        self._pass_rows: Optional[torch.Tensor] = None  # this predict pass's rows (slot x eval index), NaN = not scored
        self._positions: dict[str, int] = {}
        self._group_rows: dict[int, torch.Tensor] = {}  # target position -> its row's training-group means
        self._matrix_file: Optional[Path] = None
        self._eval_groups: Optional[GroupIndex] = None
        self._theta0: Optional[torch.Tensor] = None  # the θ0 pass's losses, until taken

    def begin(self, plan, output_dir: Path) -> None:
        self.plan = plan
        self.output_dir = Path(output_dir) if output_dir is not None else None
        shape = (len(plan.targets), len(plan.eval_corpus))
        self.failed, self._group_rows, self._pass_rows = {}, {}, None
        self._positions = {t.id: t.position for t in plan.targets}
        self._matrix_file, self._eval_groups, self._theta0 = None, None, None
        if self.output_dir is not None and shape[0] * shape[1] >= MEMMAP_MIN_ENTRIES:
            self.matrix = self._memory_mapped(shape)
        else:
            self.matrix = torch.full(shape, float("nan"))

    def _memory_mapped(self, shape) -> torch.Tensor:
        """A NaN-filled matrix backed by ``<run>/progress/score_matrix.npy``: rows go to disk as they are
        scored and the final score file is written from it in slices (never a second copy in memory)."""
        import numpy as np

        path = self.output_dir / PROGRESS / "score_matrix.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=shape)
        array[:] = np.nan
        self._matrix_file = path
        return torch.from_numpy(array)

    # -- collection ------------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        targets = pl_module.scored_targets()
        if self.matrix is None:
            return
        if not targets:  # the θ0 pass: its losses, by evaluation index
            if "losses" in prediction:
                if self._theta0 is None:
                    self._theta0 = torch.full((self.matrix.shape[1],), float("nan"))
                self._theta0[prediction["index"].cpu()] = prediction["losses"].detach().cpu().float()
            return
        if "scores" not in prediction:
            return
        scores = prediction["scores"].detach().cpu()
        scores = scores if scores.dim() == 2 else scores[None]
        if self._pass_rows is None:
            self._pass_rows = torch.full((len(targets), self.matrix.shape[1]), float("nan"))
        self._pass_rows[:, prediction["index"].cpu()] = scores.to(self._pass_rows.dtype)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        targets = pl_module.scored_targets()
        rows, self._pass_rows = self._pass_rows, None
        if not targets or self.matrix is None:
            return
        if rows is None:
            rows = torch.full((len(targets), self.matrix.shape[1]), float("nan"))
        rows = merge_across_ranks(rows)  # under DDP each rank scored a shard: merge by index
        for target, row in zip(targets, rows):
            if not torch.isfinite(row).all():
                self.mark_failed(target.id, "non-finite or missing scores after unlearning", step=None)
                continue
            self._put(target.position, row)

    def take_theta0(self) -> torch.Tensor:
        """The losses of the pass without a target (θ0), NaN where this rank scored nothing; then forgotten."""
        losses = self._theta0 if self._theta0 is not None else torch.full((self.matrix.shape[1],), float("nan"))
        self._theta0 = None
        return losses

    def _put(self, position: int, row: torch.Tensor) -> None:
        """A target's row into the matrix, and (row targets: UnTrac-Inv, the gradient methods) its
        training-group means: the group table is accumulated as targets finish, not recomputed from the
        whole matrix at the end. (UnTrac's targets are columns of a small queries x groups matrix: its
        group table is computed at the end.)"""
        self.matrix[position] = row
        if self.plan is not None and self.plan.targets_are_rows:
            if self._eval_groups is None:
                self._eval_groups = GroupIndex(self.plan.eval_corpus.group_column())
            self._group_rows[position] = self._eval_groups.means(self.matrix[position].double()[None], dim=1)[0]

    def mark_failed(self, target_id: str, reason: str, step: Optional[int]) -> None:
        """A failed target: recorded, and its row blanked (NaN)."""
        self.note_failed(target_id, {"reason": reason, "step": step})
        self._put(self._positions[target_id], torch.full((self.matrix.shape[1],), float("nan")))

    def note_failed(self, target_id: str, failure: dict) -> None:
        """Record a failure (``{"reason", "step"}``) without touching the scores (they stay as computed)."""
        self.failed[target_id] = dict(failure)

    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Every target's row at once (methods that score all targets in one pass)."""
        if tuple(matrix.shape) != tuple(self.matrix.shape):
            raise ValueError(f"score matrix of shape {tuple(matrix.shape)}; the plan needs {tuple(self.matrix.shape)}")
        matrix = matrix.detach().float().cpu()
        for position in range(matrix.shape[0]):
            self._put(position, matrix[position])

    def set_row(self, target_id: str, row: torch.Tensor) -> None:
        """Put a finished target's score row in place (used when resuming a run)."""
        self._put(self._positions[target_id], row.float())

    def row(self, target_id: str) -> torch.Tensor:
        return self.matrix[self._positions[target_id]]

    def ordered_failed(self) -> dict:
        """Failed targets in plan order (not completion order), so outputs never depend on the order."""
        if self.plan is None:
            return dict(self.failed)
        return {t.id: self.failed[t.id] for t in self.plan.targets if t.id in self.failed}

    # -- output ----------------------------------------------------------------------------------
    def table(self, metadata: dict) -> ScoreTable:
        plan = self.plan
        target_ids = [t.id for t in plan.targets]
        target_groups = plan.target_groups
        eval_ids, eval_groups = plan.eval_corpus.ids, plan.eval_corpus.group_column()
        meta = dict(metadata, failed_targets=self.ordered_failed())
        if plan.targets_are_rows:
            # a memory-mapped matrix is handed over as it is (the table is written from it in slices)
            scores = self.matrix if self._matrix_file is not None else self.matrix.clone()
            table = ScoreTable(scores, target_ids, target_groups, eval_ids, eval_groups, plan.target_unit, "example", plan.method, meta)
            table.group = self._accumulated_group_level(table)
            return table
        return ScoreTable(self.matrix.T.clone(), eval_ids, eval_groups, target_ids, target_groups, "example", plan.target_unit, plan.method, meta)

    def _accumulated_group_level(self, table: ScoreTable) -> Optional[ScoreTable]:
        """The group level from the per-target group means gathered while scoring (the same bits as
        ``table.group_level()`` recomputed, without reading the matrix again)."""
        if len(self._group_rows) != len(self.plan.targets):
            return None  # a target without a row (cannot happen after a complete run): recompute
        per_row = torch.stack([self._group_rows[p] for p in range(len(self.plan.targets))])
        cols = list(dict.fromkeys(table.col_groups))
        if table.row_unit in ("example", "query"):
            index = GroupIndex(table.row_groups)
            per_row, rows = index.means(per_row, dim=0), index.names
        else:
            rows = list(table.row_ids)
        return ScoreTable(per_row.float(), rows, rows, cols, cols, "group", "group", table.method, dict(table.metadata))

    def _snippet(self, text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= self.snippet_chars else text[: self.snippet_chars - 1] + "…"

    def _rank(self, table: ScoreTable, row: int, texts: Optional[Sequence[str]]) -> list[dict]:
        scores = table.scores[row]
        top = []
        for rank, col in enumerate(top_columns(scores, self.top_k), start=1):
            entry = {"rank": rank, "id": table.col_ids[col], "group": table.col_groups[col], "score": float(scores[col])}
            if texts is not None:
                entry["text"] = self._snippet(texts[col])
            top.append(entry)
        return top

    def rankings(self, table: ScoreTable) -> dict:
        plan = self.plan
        row_texts = plan.row_texts()
        col_texts = plan.col_texts()
        # A failed target is a NaN row (UnTrac-Inv: a query) or a NaN column (UnTrac: a training
        # unit); either way it is named where it is missing, never silently dropped.
        failed_rows = {i for i in table.row_ids if i in self.failed} if plan.targets_are_rows else set()
        failed_cols = [i for i in table.col_ids if i in self.failed] if not plan.targets_are_rows else []
        queries = []
        for row in range(len(table.row_ids)):
            entry = {"query_id": table.row_ids[row], "query_group": table.row_groups[row]}
            if row_texts is not None:
                entry["query_text"] = self._snippet(row_texts[row])
            entry["failed"] = table.row_ids[row] in failed_rows
            if failed_cols:
                entry["excluded_failed"] = list(failed_cols)
            entry["top"] = self._rank(table, row, col_texts)
            queries.append(entry)
        group = table.group_level()
        group_rankings = []
        for r, name in enumerate(group.row_ids):
            entry = {"query_group": name}
            excluded = [i for i, g in zip(table.row_ids, table.row_groups) if g == name and i in failed_rows] + failed_cols
            if excluded:
                entry["excluded_failed"] = excluded  # left out of this group's mean / ranking
            entry["top"] = self._rank(group, r, None)
            group_rankings.append(entry)
        return {
            "method": table.method,
            "row_unit": table.row_unit,
            "col_unit": table.col_unit,
            "sign": self.sign,
            "top_k": self.top_k,
            "failed_targets": self.ordered_failed(),
            "queries": queries,
            "query_groups": group_rankings,
        }

    @staticmethod
    def group_tables(table: ScoreTable) -> tuple[str, str]:
        """``group_scores.csv`` and ``group_scores.md``: the group level in :func:`aligned_groups` order
        (shared groups on the diagonal); the .md marks each row's maximum in bold."""
        group = aligned_groups(table.group_level())
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["query_group"] + group.col_ids)
        lines = ["| query group \\ training group | " + " | ".join(group.col_ids) + " |", "|---" * (len(group.col_ids) + 1) + "|"]
        rows = [group.scores[r].tolist() for r in range(len(group.row_ids))]
        for name, values, best in zip(group.row_ids, rows, row_maxima(rows)):
            writer.writerow([name] + [f"{v:.6g}" for v in values])
            cells = [f"**{v:.4g}**" if j in best else f"{v:.4g}" for j, v in enumerate(values)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Mean score of each training group (column) on each query group (row); **bold**: the row's largest."]
        return buffer.getvalue(), "\n".join(lines) + "\n"

    def write_outputs(self, metadata: dict, logger=None) -> ScoreTable:
        table = self.table(metadata)
        table.save(self.output_dir / SCORES)
        if self._matrix_file is not None:  # the score file now holds it (the mapping stays valid for the table)
            self._matrix_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._matrix_file.parent.rmdir()  # progress/ of a method without a resume state
        rankings = self.rankings(table)
        write_json_atomic(self.output_dir / RANKINGS, rankings)
        csv_text, md_text = self.group_tables(table)
        write_text_atomic(self.output_dir / GROUP_SCORES_CSV, csv_text)
        write_text_atomic(self.output_dir / GROUP_SCORES_MD, md_text)
        try:
            group_heatmap(aligned_groups(table.group_level()), self.output_dir / GROUP_HEATMAP,
                          title=f"{self.display or table.method}: query group × training group")
        except OutputWriteError:
            raise  # a full disk is reported like any other file's
        except Exception as exc:  # the figure is a view of group_scores.csv: never lose a finished run over it
            log.warning("%s not written (%s: %s)", GROUP_HEATMAP, type(exc).__name__, exc)
        self._log_tensorboard(table, rankings, logger)
        return table

    def _log_tensorboard(self, table: ScoreTable, rankings: dict, logger) -> None:
        """Histograms and the Text tab (tags: :mod:`untrac_pl.board`); ``logger``: the run's
        :class:`~untrac_pl.board.RunBoard`, or a Lightning logger (``None``: nothing)."""
        board = logger if isinstance(logger, RunBoard) else RunBoard(logger, self.plan)
        board.results(table, rankings, self.group_tables(table)[1])
