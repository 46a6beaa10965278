"""Tokenisation with loss masks, truncation accounting and per-group seeded sampling."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from untrac_pl.errors import DataError
from untrac_pl.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class TokenizedCorpus:
    """Records plus their tokenisation; ``examples[i]`` belongs to ``records[i]``."""

    name: str
    records: list[dict]
    examples: list[dict]
    num_truncated: int = 0
    groups: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.groups:
            self.groups = list(dict.fromkeys(r["group"] for r in self.records))

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    def group_members(self) -> dict[str, list[int]]:
        members: dict[str, list[int]] = {g: [] for g in self.groups}
        for position, record in enumerate(self.records):
            members[record["group"]].append(position)
        return members

    def text_of(self, position: int) -> str:
        record = self.records[position]
        return record["text"] if "text" in record else record["prompt"] + record["completion"]


def sample_per_group(records: list[dict], samples_per_group: int | None, seed: int) -> list[dict]:
    """Keep at most ``samples_per_group`` records of each group, drawn with a per-group seed.

    The paper gives every training group an equal-size sample, hence the same number of ascent steps.
    """
    if samples_per_group is None:
        return records
    if samples_per_group < 1:
        raise DataError(f"must be >= 1, got {samples_per_group}", field="samples_per_group")
    by_group: dict[str, list[dict]] = {}
    for record in records:
        by_group.setdefault(record["group"], []).append(record)
    kept = []
    for group, members in by_group.items():
        if len(members) > samples_per_group:
            rng = random.Random(f"{seed}:{group}")
            chosen = sorted(rng.sample(range(len(members)), samples_per_group))
            members = [members[i] for i in chosen]
        kept.extend(members)
    return kept


def tokenize_records(records: list[dict], tokenizer, max_length: int, name: str) -> TokenizedCorpus:
    """Tokenise records; prompt tokens get label ``IGNORE_INDEX`` so only completions carry loss.

    Sequences longer than ``max_length`` are cut from the right and counted. A record left with no
    target token (a one-token text, or a completion cut away entirely) is an error naming the record.
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2 (one input and one target token), got {max_length}", field="max_length")
    texts = [r["text"] if "text" in r else r["prompt"] for r in records]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    completions = [r.get("completion") for r in records]
    pairs = [i for i, c in enumerate(completions) if c is not None]
    completion_ids = {}
    if pairs:
        enc = tokenizer([completions[i] for i in pairs], add_special_tokens=False)["input_ids"]
        completion_ids = dict(zip(pairs, enc))
    examples, truncated = [], 0
    for position, ids in enumerate(encoded):
        ids = list(ids)
        if position in completion_ids:
            labels = [IGNORE_INDEX] * len(ids) + list(completion_ids[position])
            ids = ids + list(completion_ids[position])
        else:
            labels = list(ids)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if sum(1 for label in labels[1:] if label != IGNORE_INDEX) == 0:
            reason = (
                "its completion was cut away by truncation (raise max_length)"
                if position in completion_ids
                else "it has fewer than two tokens"
            )
            raise DataError(f"record '{records[position]['id']}' has no target token: {reason}", source=name, field="max_length" if position in completion_ids else "text")
        examples.append({"input_ids": ids, "labels": labels, "index": position})
    if truncated:
        log.warning("%s: %d of %d sequences were truncated to max_length=%d", name, truncated, len(records), max_length)
    return TokenizedCorpus(name=name, records=records, examples=examples, num_truncated=truncated)
