"""Turn what users pass (tokenised examples, collated batches, a DataLoader) into batches + unit maps."""
from __future__ import annotations

from typing import Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from untrac_pl.data.collate import PadCollator


def _is_batch(obj) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("input_ids"), torch.Tensor) and obj["input_ids"].dim() == 2


def _is_example(obj) -> bool:
    return isinstance(obj, Mapping) and "input_ids" in obj and not _is_batch(obj)


def as_batches(data, *, batch_size: int = 8, pad_token_id: int = 0):
    """A re-iterable of collated batches (dicts ``input_ids``/``attention_mask``/``labels``/``index``).

    Accepts: one collated batch; a list of collated batches; a list of tokenised examples
    (``{"input_ids": list[int], "labels": list[int]?, "index": int?}``; missing labels = input_ids,
    missing index = position), collated here ``batch_size`` at a time; or any iterable of batches
    (e.g. a ``DataLoader`` with :class:`~untrac_pl.data.collate.PadCollator`). A one-shot iterator is
    materialised into a list (it is read more than once).
    """
    if _is_batch(data):
        return [_complete(data)]
    if isinstance(data, Sequence) and len(data) > 0 and _is_example(data[0]):
        examples = []
        for pos, ex in enumerate(data):
            ids = [int(t) for t in ex["input_ids"]]
            labels = ex.get("labels")
            labels = ids if labels is None else [int(t) for t in labels]
            examples.append({"input_ids": ids, "labels": labels, "index": int(ex.get("index", pos))})
        collate = PadCollator(pad_token_id)
        return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    if iter(data) is data:  # generator / iterator: read once, keep
        return [_complete(b) for b in data]
    if isinstance(data, Sequence):
        return [_complete(b) for b in data]
    return _Completing(data)


class _Completing:
    """Wraps a re-iterable of batches (a DataLoader) and fills in optional keys on the fly."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (_complete(b) for b in self.loader)


def _complete(batch: Mapping) -> dict:
    if not _is_batch(batch):
        raise TypeError("expected collated batches: dicts with a 2-D 'input_ids' tensor")
    b = dict(batch)
    if "attention_mask" not in b:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    if "labels" not in b:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


class IndexTracker:
    """Collects ``batch['index']`` (or running positions) and checks they form ``0..N-1``."""

    def __init__(self, what: str):
        self.what = what
        self.seen: List[torch.Tensor] = []
        self.count = 0

    def positions(self, batch: Mapping) -> torch.Tensor:
        n = int(batch["input_ids"].shape[0])
        if "index" in batch:
            idx = torch.as_tensor(batch["index"], dtype=torch.long).reshape(-1).cpu()
        else:
            idx = torch.arange(self.count, self.count + n)
        self.count += n
        self.seen.append(idx)
        return idx

    def finish(self) -> torch.Tensor:
        idx = torch.cat(self.seen) if self.seen else torch.zeros(0, dtype=torch.long)
        n = idx.numel()
        if n == 0:
            raise ValueError(f"no {self.what} examples")
        if not torch.equal(torch.sort(idx).values, torch.arange(n)):
            raise ValueError(f"{self.what} 'index' values must be a permutation of 0..{n - 1}")
        return idx


def group_map(groups: Optional[Sequence[Hashable]], n: int, what: str) -> Tuple[Optional[torch.Tensor], Optional[list]]:
    """``groups[i]`` = group of example ``i`` -> (group id per example ``[n]``, names in first-seen order)."""
    if groups is None:
        return None, None
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{what}_groups has {len(groups)} entries for {n} {what} examples")
    names: list = []
    lookup: dict = {}
    ids = []
    for g in groups:
        if g not in lookup:
            lookup[g] = len(names)
            names.append(g)
        ids.append(lookup[g])
    return torch.tensor(ids, dtype=torch.long), names


def count_examples(batches: Iterable[Mapping]) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in batches)


def mean_by_group(rows: torch.Tensor, gid: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the rows of ``rows`` ``[n, D]`` per group id -> ``[k, D]``."""
    out = torch.zeros(k, rows.shape[1], device=rows.device, dtype=rows.dtype)
    out.index_add_(0, gid.to(rows.device), rows)
    counts = torch.bincount(gid, minlength=k).clamp_min(1).to(rows.device, rows.dtype)
    return out / counts[:, None]
