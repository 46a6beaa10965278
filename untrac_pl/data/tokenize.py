"""Tokenisation with loss masks, truncation accounting and per-group seeded sampling."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Sequence

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

    def group_column(self) -> list[str]:
        """Each example's group, in order."""
        return [r["group"] for r in self.records]

    def text_of(self, position: int) -> str:
        record = self.records[position]
        return record["text"] if "text" in record else record["prompt"] + record["completion"]

    def texts(self) -> "CorpusTexts":
        """Every example's text as a sequence read on indexing (nothing is copied)."""
        return CorpusTexts(self)


class CorpusTexts(Sequence):
    """``corpus.text_of(i)`` as a read-only sequence."""

    def __init__(self, corpus: TokenizedCorpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self.corpus.text_of(i) for i in range(*position.indices(len(self)))]
        return self.corpus.text_of(position)


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


NO_TARGET_REASONS = {
    "completion": ("its completion was cut away by truncation (raise max_length)", "max_length"),
    "short": ("it has fewer than two tokens", "text"),
}


def check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise DataError(f"max_length must be >= 2 (one input and one target token), got {max_length}", field="max_length")


def no_target_error(record_id: str, problem: str, name: str) -> DataError:
    """The error for a record left with no target token (``problem``: a key of ``NO_TARGET_REASONS``)."""
    reason, field_name = NO_TARGET_REASONS[problem]
    return DataError(f"record '{record_id}' has no target token: {reason}", source=name, field=field_name)


def encode_batch(texts: list[str], completions: list, tokenizer, max_length: int) -> tuple[list, list, list, list]:
    """Token ids, labels, truncation flags and problems (``None`` or a ``NO_TARGET_REASONS`` key) of a batch.

    ``texts[i]`` is a record's text or prompt; ``completions[i]`` its completion (``None`` for a text).
    Prompt tokens get label ``IGNORE_INDEX``; sequences longer than ``max_length`` are cut from the right.
    The one encoder of both storages (lists in memory, Arrow via ``datasets.map``).
    """
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    pairs = [i for i, c in enumerate(completions) if c is not None]
    completion_ids = {}
    if pairs:
        enc = tokenizer([completions[i] for i in pairs], add_special_tokens=False)["input_ids"]
        completion_ids = dict(zip(pairs, enc))
    all_ids, all_labels, truncated, problems = [], [], [], []
    for position, ids in enumerate(encoded):
        ids = list(ids)
        if position in completion_ids:
            labels = [IGNORE_INDEX] * len(ids) + list(completion_ids[position])
            ids = ids + list(completion_ids[position])
        else:
            labels = list(ids)
        cut = len(ids) > max_length
        if cut:
            ids, labels = ids[:max_length], labels[:max_length]
        problem = None
        if sum(1 for label in labels[1:] if label != IGNORE_INDEX) == 0:
            problem = "completion" if position in completion_ids else "short"
        all_ids.append(ids)
        all_labels.append(labels)
        truncated.append(cut)
        problems.append(problem)
    return all_ids, all_labels, truncated, problems


def tokenize_records(records: list[dict], tokenizer, max_length: int, name: str) -> TokenizedCorpus:
    """Tokenise records; prompt tokens get label ``IGNORE_INDEX`` so only completions carry loss.

    Sequences longer than ``max_length`` are cut from the right and counted. A record left with no
    target token (a one-token text, or a completion cut away entirely) is an error naming the record.
    """
    check_max_length(max_length)
    texts = [r["text"] if "text" in r else r["prompt"] for r in records]
    completions = [r.get("completion") for r in records]
    ids, labels, cut, problems = encode_batch(texts, completions, tokenizer, max_length)
    for position, problem in enumerate(problems):
        if problem is not None:
            raise no_target_error(records[position]["id"], problem, name)
    examples = [{"input_ids": i, "labels": l, "index": position} for position, (i, l) in enumerate(zip(ids, labels))]
    truncated = sum(cut)
    if truncated:
        log.warning("%s: %d of %d sequences were truncated to max_length=%d", name, truncated, len(records), max_length)
    return TokenizedCorpus(name=name, records=records, examples=examples, num_truncated=truncated)
