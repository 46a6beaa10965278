"""Padding collator and length-sorted batching for tokenised examples.

A tokenised example is a dict ``{"input_ids": list[int], "labels": list[int], "index": int}``
(labels aligned with input_ids, ``-100`` where no loss is taken). Batches are dicts of tensors
``input_ids``, ``attention_mask``, ``labels`` (``[B, T]``) and ``index`` (``[B]``).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from untrac_pl.losses import IGNORE_INDEX


class ExampleDataset(torch.utils.data.Dataset):
    """A list of tokenised examples as a map-style dataset."""

    def __init__(self, examples: Sequence[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch at once (the DataLoader's fetcher calls this): a stored corpus slices it out of its mapped files."""
        take = getattr(self.examples, "take", None)
        return take(indices) if take is not None else [self.examples[i] for i in indices]


class PadCollator:
    """Right-pads a list of tokenised examples into a batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[dict]) -> dict:
        # Pad as Python lists and convert once per field: one tensor construction per batch instead
        # of one per example and field (collation is on the critical path of every scoring pass).
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        pad = self.pad_token_id
        input_ids = torch.tensor([list(e["input_ids"]) + [pad] * (width - n) for e, n in zip(examples, lengths)], dtype=torch.long)
        labels = torch.tensor([list(e["labels"]) + [IGNORE_INDEX] * (width - n) for e, n in zip(examples, lengths)], dtype=torch.long)
        attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        index = torch.tensor([int(e["index"]) for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


class LengthSortedBatchSampler(Sampler[list[int]]):
    """Deterministic batches of positions sorted by length (longest first) to cut padding.

    Scoring is order-free (each example's loss is independent), so sorting changes nothing but the
    padding waste; longest-first surfaces out-of-memory errors on the first batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lengths = np.asarray(lengths, dtype=np.int64)
        # longest first, ties by position; kept as one array (8 bytes a position), batches made when iterated
        self.order = np.lexsort((np.arange(len(lengths)), -lengths))
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of consecutive positions within each group, groups in ``group_members`` order.

    The authors' ``TaskGroupedBatchSampler``: with ``loss_reduction: token_mean`` a batch's token
    mean is every member's loss, so a batch must never mix groups and its make-up must follow the
    data order (as theirs does), not the lengths.
    """

    def __init__(self, group_members: dict[str, list[int]], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batches = [members[i : i + batch_size] for members in group_members.values() for i in range(0, len(members), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
