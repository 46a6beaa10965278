"""The reproductions' data: the synthetic datasets A/B (Experiment 1) and the eight corpora with the three
test sets (Experiment 2), real (``../shared/data``) or generated look-alikes, cut into token blocks.

Functions take the reproduction's config (its ``synthetic`` / ``corpora`` sections) and a seed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from untrac_pl.data.embedded import CORPUS_NAMES, TEST_SETS, UNEQUAL_FRACTIONS
from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.synthetic import load_synthetic
from untrac_pl.data.tokenize import sample_per_group
from untrac_pl.training import block_records

log = logging.getLogger(__name__)


@dataclass
class SyntheticData:
    """Experiment 1 data: ``source: generated`` (the ``synthetic`` generator of
    :mod:`untrac_pl.data.generators`, a fresh draw per seed: ``n_per_task`` records per training task,
    ``n_test`` test records) or ``csv`` (the original CSVs in ``csv_dir``, the same for every seed)."""

    datasets: list[str] = field(default_factory=lambda: ["A", "B"])
    source: Literal["generated", "csv"] = "generated"
    n_per_task: int = 256
    n_test: int = 256
    csv_dir: Optional[str] = None


@dataclass
class CorporaData:
    """Experiment 2 data: eight corpora and three test sets.

    ``source: real`` reads ``corpora_dir/<name>.jsonl`` and ``tests_dir`` (ToxiGen, WinoBias,
    TruthfulQA); ``generated`` reads look-alikes from the ``pretraining`` generator of
    :mod:`untrac_pl.data.generators` (a fresh draw per seed: ``generated_docs_per_corpus`` documents
    per corpus, ``generated_test_per_group`` records per test group).
    Documents are cut into ``block_size``-token blocks; ``equal`` keeps ``blocks_per_corpus`` blocks
    of every corpus, ``unequal`` the paper's 30/20/15/10/10/5/5/5 % of ``8 * blocks_per_corpus``.
    Each test subset is sampled to ``query_samples_per_group`` examples.
    """

    source: Literal["real", "generated"] = "generated"
    sizes: list[Literal["equal", "unequal"]] = field(default_factory=lambda: ["equal", "unequal"])
    corpora_dir: str = "../shared/data/corpora"
    tests_dir: str = "../shared/data/tests"
    toxigen_file: str = "toxigen_annotated.jsonl"
    block_size: int = 64
    blocks_per_corpus: int = 256
    query_samples_per_group: Optional[int] = 16
    tokenizer_docs_per_corpus: int = 200
    generated_docs_per_corpus: int = 400
    generated_test_per_group: int = 16


def _prefixed(records: list[dict], test_set: str) -> list[dict]:
    return [{**r, "id": f"{test_set}:{r['id']}", "group": f"{test_set}/{r['group']}"} for r in records]


def _generated(generator: str, split: str, seed: int, **options) -> list[dict]:
    return read_records(DataSource(format="generated", generator=generator, split=split, seed=seed, options=options))


def synthetic_data(cfg, dataset: str, seed: int) -> dict:
    """Training tasks, test set and (generated source) ``validation``: another draw of the training tasks
    without the training draw's examples, 32 per task — the in-distribution held-out loss θ0's training is
    judged by (the test task is a different task by design, so its loss is no convergence criterion)."""
    s = cfg.synthetic
    validation = []
    if s.source == "csv":
        data = load_synthetic(dataset, s.csv_dir)
        train, queries = data["train"], data["test"]
    else:
        options = dict(dataset=dataset, n_per_task=s.n_per_task, n_test=s.n_test)
        train, queries = (_generated("synthetic", split, seed, **options) for split in ("train", "test"))
        seen = {(r["prompt"], r["completion"]) for r in train}
        extra = _generated("synthetic", "train", seed + 100_003, dataset=dataset, n_per_task=4 * 32, n_test=1)
        validation = sample_per_group([r for r in extra if (r["prompt"], r["completion"]) not in seen], 32, seed)
    texts = [r["prompt"] + r["completion"] for r in train + queries]
    return {"train": train, "queries": queries, "validation": validation, "tokenizer_texts": texts}


def _real_tests(c: CorporaData) -> list[dict]:
    tests_dir = Path(c.tests_dir)
    queries = []
    for test_set, filename in (("toxigen", c.toxigen_file), ("winobias", "winobias.jsonl"), ("truthfulqa", "truthfulqa.jsonl")):
        records = read_records(DataSource(path=str(tests_dir / filename), id_field="__none__"))
        queries += _prefixed(records, test_set)
    return queries


def corpora_data(cfg, size: str, seed: int) -> dict:
    """Raw documents and test records (before blocking); blocks are made once the tokenizer exists."""
    c = cfg.corpora
    if c.source == "real":
        docs = []
        for name in CORPUS_NAMES:
            docs += read_records(DataSource(path=str(Path(c.corpora_dir) / f"{name}.jsonl"), group=name))
        queries = _real_tests(c)
    else:
        options = dict(n_docs_per_corpus=c.generated_docs_per_corpus, n_test_per_group=c.generated_test_per_group)
        docs = _generated("pretraining", "train", seed, **options)
        queries = []
        for test_set in TEST_SETS:
            queries += _prefixed(_generated("pretraining", test_set, seed, **options), test_set.replace("_like", ""))
    queries = sample_per_group(queries, c.query_samples_per_group, seed)
    tok_docs = sample_per_group(docs, c.tokenizer_docs_per_corpus, 12345)  # tokenizer: the same for every seed
    return {"docs": docs, "queries": queries, "tokenizer_texts": [r["text"] for r in tok_docs], "size": size}


def corpus_blocks(cfg, docs: list[dict], tokenizer, size: str, seed: int) -> list[dict]:
    c = cfg.corpora
    blocks = block_records(docs, tokenizer, c.block_size)
    if size == "equal":
        counts = {name: c.blocks_per_corpus for name in CORPUS_NAMES}
    else:
        total = c.blocks_per_corpus * len(CORPUS_NAMES)
        counts = {name: max(1, round(UNEQUAL_FRACTIONS[name] * total)) for name in CORPUS_NAMES}
    by_group: dict[str, list[dict]] = {}
    for b in blocks:
        by_group.setdefault(b["group"], []).append(b)
    out = []
    for name in CORPUS_NAMES:
        members = by_group.get(name, [])
        if len(members) < counts[name]:
            log.warning("corpus %s has %d blocks, fewer than the %d asked for; using all", name, len(members), counts[name])
        out += sample_per_group(members, counts[name], seed)
    return out
