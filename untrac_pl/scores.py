"""ScoreTable: a query-major score matrix with its row/column units, saved as safetensors.

Orientation and sign are the project's convention: ``scores[row, col]`` with rows = query units
(test examples / queries / query subsets) and columns = training units (examples or groups);
positive = the training unit helped the model produce the query.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from untrac_pl.io import save_safetensors_atomic

FORMAT_VERSION = "1"


def top_columns(scores: torch.Tensor, k: int) -> list[int]:
    """The columns of the ``k`` highest finite scores, highest first, ties by column (a stable sort's
    order), found with ``topk`` and a sort of the candidates only: one pass over a long row."""
    finite = torch.isfinite(scores)
    count = min(int(k), int(finite.sum()))
    if count <= 0:
        return []
    values = torch.where(finite, scores, torch.tensor(-math.inf, dtype=scores.dtype))
    threshold = torch.topk(values, count).values[-1]
    candidates = torch.nonzero(values >= threshold).flatten()  # every column tied at the threshold too
    order = torch.argsort(-values[candidates].double(), stable=True)
    return candidates[order][:count].tolist()


class GroupIndex:
    """Which group each member (row or column) belongs to: names in first-appearance order, and each
    member's index into them (built once; a long column list is not walked again per row)."""

    def __init__(self, groups: list[str]):
        self.names = list(dict.fromkeys(groups))
        position = {name: k for k, name in enumerate(self.names)}
        self.index = torch.tensor([position[g] for g in groups], dtype=torch.long)

    def means(self, matrix: torch.Tensor, dim: int) -> torch.Tensor:
        """Means over the members of each group along ``dim``, over the finite members only.

        A failed target is a NaN row or column; it is left out of its own group's mean (NaN only if every
        member failed) and never leaks into other groups (NaNs are zeroed before summing). Which members
        were left out is reported by the rankings. Sums run in member order (``index_add_``), so a row's
        (or column's) group means are the same bits whether computed alone or within the whole matrix:
        :class:`~untrac_pl.callbacks.rankings.RankingWriter` accumulates them as rows arrive.
        """
        finite = torch.isfinite(matrix)
        values = torch.where(finite, matrix, torch.zeros((), dtype=matrix.dtype))
        shape = list(matrix.shape)
        shape[dim] = len(self.names)
        sums = torch.zeros(shape, dtype=matrix.dtype).index_add_(dim, self.index, values)
        counts = torch.zeros(shape, dtype=matrix.dtype).index_add_(dim, self.index, finite.to(matrix.dtype))
        return sums / counts  # 0 / 0 = NaN where a whole group failed


def _group_means(matrix: torch.Tensor, groups: list[str], dim: int) -> tuple[torch.Tensor, list[str]]:
    """:meth:`GroupIndex.means` and the group names."""
    index = GroupIndex(groups)
    return index.means(matrix, dim), index.names


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
    # the group level when already known (accumulated while the rows were scored, or read from the file); a
    # cache: changing ``scores`` afterwards does not update it (set ``group = None`` to recompute)
    group: Optional["ScoreTable"] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        rows, cols = self.scores.shape
        if (rows, cols) != (len(self.row_ids), len(self.col_ids)):
            raise ValueError(f"score matrix {tuple(self.scores.shape)} does not match {len(self.row_ids)} rows x {len(self.col_ids)} cols")

    def group_level(self) -> "ScoreTable":
        """Mean over the examples of each row group and column group (exact for loss differences);
        failed (NaN) members are left out of their group's mean."""
        if self.group is not None:
            return self.group
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
        return {row_id: [(self.col_ids[c], float(self.scores[r, c])) for c in top_columns(self.scores[r], k)]
                for r, row_id in enumerate(self.row_ids)}

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
        tensors = {"scores": self.scores if self.scores.dtype == torch.float32 else self.scores.float(),
                   "group_scores": group.scores.float(), **(extra_tensors or {})}
        return save_safetensors_atomic(path, tensors, meta)

    @classmethod
    def open(cls, path: Path) -> "ScoreTable":
        """A score file with its matrix memory-mapped, not read: rows are read from disk when used (a
        result too large for memory can be ranked row by row). The group level is read (it is small)."""
        import numpy as np

        meta, entry, data_start = _header(path)
        if entry.get("dtype") != "F32":
            raise ValueError(f"{path}: scores of dtype {entry.get('dtype')}; expected F32")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if len(shape) != 2 or end - begin != 4 * shape[0] * shape[1]:
            raise ValueError(f"{path}: the scores' shape {shape} does not match their {end - begin} bytes")
        if shape[0] * shape[1]:  # copy-on-write: writable in memory, the file is never changed
            scores = torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=data_start + begin, shape=shape))
        else:
            scores = torch.zeros(shape)
        table = cls._from_metadata(scores, meta, path)
        if "group_row_ids" in meta:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                group_scores = handle.get_tensor("group_scores")
            rows, cols = json.loads(meta["group_row_ids"]), json.loads(meta["group_col_ids"])
            table.group = ScoreTable(group_scores, rows, rows, cols, cols, "group", "group", table.method, dict(table.metadata))
        return table

    @classmethod
    def load(cls, path: Path) -> "ScoreTable":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                scores = handle.get_tensor("scores")
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ValueError(f"{path}: not a readable score file ({exc})") from None
        return cls._from_metadata(scores, meta, path)

    @classmethod
    def _from_metadata(cls, scores: torch.Tensor, meta: dict, path) -> "ScoreTable":
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


def _header(path: Path) -> tuple[dict, dict, int]:
    """A safetensors file's metadata, the ``scores`` entry and where the data starts (the format's
    8-byte little-endian header length, then the JSON header)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100_000_000:  # safetensors' own header limit
                raise ValueError(f"header length {size}")
            header = json.loads(handle.read(size))
        entry = header["scores"]
        end = 8 + size + int(entry["data_offsets"][1])
        if end > Path(path).stat().st_size:
            raise ValueError(f"the scores end at byte {end}, the file has {Path(path).stat().st_size}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable score file ({type(exc).__name__}: {exc})") from None
    return header.get("__metadata__") or {}, entry, 8 + size
