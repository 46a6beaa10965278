"""ScoreTable: a query-major score matrix with its row/column units, saved as safetensors.

Orientation and sign are the project's convention: ``scores[row, col]`` with rows = query units
(test examples / queries / query subsets) and columns = training units (examples or groups);
positive = the training unit helped the model produce the query.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from untrac_pl.io import save_safetensors_atomic

FORMAT_VERSION = "1"


def _group_means(matrix: torch.Tensor, groups: list[str], dim: int) -> tuple[torch.Tensor, list[str]]:
    """Means over the members of each group along ``dim``, over the finite members only.

    A failed target is a NaN row or column; it is left out of its own group's mean (NaN only if every
    member failed) and never leaks into other groups (a plain ``onehot @ matrix`` would spread it,
    since 0 x NaN = NaN). Which members were left out is reported by the rankings.
    """
    names = list(dict.fromkeys(groups))
    index = torch.tensor([names.index(g) for g in groups])
    onehot = torch.zeros(len(names), len(groups), dtype=matrix.dtype)
    onehot[index, torch.arange(len(groups))] = 1.0
    finite = torch.isfinite(matrix)
    values = torch.where(finite, matrix, torch.zeros((), dtype=matrix.dtype))
    counts = finite.to(matrix.dtype)
    if dim == 0:
        out = (onehot @ values) / (onehot @ counts)
    else:
        out = (values @ onehot.T) / (counts @ onehot.T)
    return out, names  # 0 / 0 = NaN where a whole group failed


@dataclass
class ScoreTable:
    scores: torch.Tensor
    row_ids: list[str]
    row_groups: list[str]
    col_ids: list[str]
    col_groups: list[str]
    row_unit: str
    col_unit: str
    method: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        rows, cols = self.scores.shape
        if (rows, cols) != (len(self.row_ids), len(self.col_ids)):
            raise ValueError(f"score matrix {tuple(self.scores.shape)} does not match {len(self.row_ids)} rows x {len(self.col_ids)} cols")

    def group_level(self) -> "ScoreTable":
        """Mean over the examples of each row group and column group (exact for loss differences);
        failed (NaN) members are left out of their group's mean."""
        matrix = self.scores.double()
        if self.col_unit == "example":
            matrix, cols = _group_means(matrix, self.col_groups, dim=1)
        else:
            cols = list(self.col_ids)
        if self.row_unit in ("example", "query"):
            matrix, rows = _group_means(matrix, self.row_groups, dim=0)
        else:
            rows = list(self.row_ids)
        return ScoreTable(matrix.float(), rows, rows, cols, cols, "group", "group", self.method, dict(self.metadata))

    def top_k(self, k: int = 10) -> dict[str, list[tuple[str, float]]]:
        """The ranking of each row: ``{row_id: [(col_id, score), ...]}``, the ``k`` highest finite scores,
        highest first (ties: the earlier column first); NaN (failed) entries are left out. On
        :meth:`group_level` it ranks training groups per query group."""
        out = {}
        for r, row_id in enumerate(self.row_ids):
            values = self.scores[r].double()
            finite = torch.isfinite(values)
            order = torch.argsort(torch.where(finite, -values, torch.full_like(values, float("inf"))), stable=True)
            out[row_id] = [(self.col_ids[c], float(values[c])) for c in order.tolist() if finite[c]][: max(0, int(k))]
        return out

    def save(self, path: Path, extra_tensors: Optional[dict] = None) -> Path:
        group = self.group_level()
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "orientation": "query-major: scores[query_unit, train_unit]; positive = train unit helped produce the query",
            "row_unit": self.row_unit,
            "col_unit": self.col_unit,
            "row_ids": json.dumps(self.row_ids),
            "row_groups": json.dumps(self.row_groups),
            "col_ids": json.dumps(self.col_ids),
            "col_groups": json.dumps(self.col_groups),
            "group_row_ids": json.dumps(group.row_ids),
            "group_col_ids": json.dumps(group.col_ids),
            "metadata": json.dumps(self.metadata, default=str),
        }
        tensors = {"scores": self.scores.float(), "group_scores": group.scores.float(), **(extra_tensors or {})}
        return save_safetensors_atomic(path, tensors, meta)

    @classmethod
    def load(cls, path: Path) -> "ScoreTable":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                scores = handle.get_tensor("scores")
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ValueError(f"{path}: not a readable score file ({exc})") from None
        missing = [k for k in ("method", "row_ids", "col_ids") if k not in meta]
        if missing:
            raise ValueError(f"{path}: score file metadata lacks {missing}")
        return cls(
            scores=scores,
            row_ids=json.loads(meta["row_ids"]),
            row_groups=json.loads(meta["row_groups"]),
            col_ids=json.loads(meta["col_ids"]),
            col_groups=json.loads(meta["col_groups"]),
            row_unit=meta["row_unit"],
            col_unit=meta["col_unit"],
            method=meta["method"],
            metadata=json.loads(meta.get("metadata", "{}")),
        )
