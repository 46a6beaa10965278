"""One DataModule serving both sides of an attribution: the grouped training corpora and the queries.

Which side is unlearned and which is scored depends on the method (UnTrac unlearns training groups
and scores queries; UnTrac-Inv the reverse), so one module owning both corpora keeps tokenisation,
sampling and batching in one place and lets the engine ask for either side.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from untrac_pl.data.collate import (
    ExampleDataset,
    GroupBatchSampler,
    LengthSortedBatchSampler,
    PadCollator,
)
from untrac_pl.data import store
from untrac_pl.data.records import DataSource, check_unique_ids, read_records
from untrac_pl.data.schedule import (
    AscentDataset,
    ParallelAscentDataset,
    UnlearningSchedule,
    plan_micro_batches,
)
from untrac_pl.data.store import RecordRows
from untrac_pl.data.tokenize import TokenizedCorpus, sample_per_group, tokenize_records
from untrac_pl.errors import DataError
from untrac_pl.losses import LossReduction


class AttributionDataModule(pl.LightningDataModule):
    """Training corpora (grouped) and query texts (e.g. toxicity prompts), tokenised once.

    Args:
        train: data sources of the training corpora (each record's ``group`` is its corpus): files,
            datasets or generated corpora, e.g. the demo's
            ``[{format: generated, generator: quickstart, split: train}]``.
        queries: data sources of the test behaviours / queries (the demo's: ``split: queries``).
        max_length: tokens per sequence; longer ones are truncated and counted.
        samples_per_group: equal-size seeded sample of each training group (paper: 10,000).
        query_samples_per_group: the same for query subsets (paper: 256).
        eval_batch_size: batch size of loss evaluation (sorted by length to cut padding).
        storage: ``memory`` (records and tokens as Python lists: small corpora) or ``arrow`` (memory-mapped
            `datasets` files, read and tokenised once per corpus and tokenizer, then loaded from the cache:
            large corpora; :mod:`untrac_pl.data.store`). In-memory records (``from_records``) become an
            in-memory Arrow table (the same views; nothing to cache).
        cache_dir: ``storage: arrow``: where the records and tokens are cached (default: the `datasets` cache,
            ``HF_DATASETS_CACHE``).
        num_proc: ``storage: arrow``: tokenizer processes of a first run (the cache makes later runs free).
    """

    def __init__(
        self,
        train: Optional[list[DataSource]] = None,
        queries: Optional[list[DataSource]] = None,
        max_length: int = 512,
        samples_per_group: Optional[int] = None,
        query_samples_per_group: Optional[int] = None,
        sample_seed: int = 0,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        storage: Literal["memory", "arrow"] = "memory",
        cache_dir: Optional[str] = None,
        num_proc: int = 1,
    ):
        super().__init__()
        self.train_sources = list(train or [])
        self.query_sources = list(queries or [])
        self.max_length = max_length
        self.samples_per_group = samples_per_group
        self.query_samples_per_group = query_samples_per_group
        self.sample_seed = sample_seed
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        if storage not in ("memory", "arrow"):
            raise DataError(f"must be 'memory' or 'arrow', got {storage!r}", field="data.storage")
        if num_proc < 1:
            raise DataError(f"must be >= 1, got {num_proc}", field="data.num_proc")
        self.storage, self.cache_dir, self.num_proc = storage, cache_dir, int(num_proc)
        self.train_records: Optional[list[dict]] = None
        self.query_records: Optional[list[dict]] = None
        self.train_corpus: Optional[TokenizedCorpus] = None
        self.query_corpus: Optional[TokenizedCorpus] = None
        self.collator: Optional[PadCollator] = None
        if eval_batch_size < 1:
            raise DataError(f"must be >= 1, got {eval_batch_size}", field="data.eval_batch_size")

    @classmethod
    def from_records(cls, train_records: list[dict], query_records: list[dict], **kwargs) -> "AttributionDataModule":
        """Build from in-memory records (see :func:`untrac_pl.data.records.records_from_list`)."""
        module = cls(**kwargs)
        module.train_records, module.query_records = list(train_records), list(query_records)
        return module

    # -- records -------------------------------------------------------------------------------
    def load_records(self) -> None:
        """Read, validate and sample both sides (idempotent): both sides are read before either is sampled
        or checked for duplicate ids, so the first error reported is the same with either storage."""
        if self.train_records is None:
            self.train_records = self._read_side(self.train_sources, "data.train")
        if self.query_records is None:
            self.query_records = self._read_side(self.query_sources, "data.queries")
        # also for in-memory records (from_records): sampling is idempotent, so a second call changes nothing
        self.train_records = self._sample(self.train_records, self.samples_per_group, "training data")
        self.query_records = self._sample(self.query_records, self.query_samples_per_group, "queries")

    def _read_side(self, sources: Sequence, what: str):
        if not sources:
            split = "train" if what == "data.train" else "queries"
            raise DataError(f"no data sources given (files, or the demo corpus: [{{format: generated, generator: quickstart, split: {split}}}])",
                            field=what)
        if self.storage == "arrow":
            return store.side_dataset(sources, self.cache_dir)
        records = []
        for source in sources:
            records.extend(read_records(source))
        return records

    def _sample(self, records, samples_per_group: Optional[int], name: str):
        """The seeded per-group sample, checked for duplicate ids; Arrow storage gives :class:`RecordRows`
        (lists too: an in-memory Arrow table, nothing to cache)."""
        if isinstance(records, RecordRows):
            return records  # sampled and checked when read
        if self.storage == "arrow":
            dataset = records if not isinstance(records, list) else store.records_dataset(records)
            dataset = store.sample_dataset_per_group(dataset, samples_per_group, self.sample_seed)
            store.check_unique_dataset_ids(dataset, name)
            return RecordRows(dataset)
        records = sample_per_group(records, samples_per_group, self.sample_seed)
        check_unique_ids(records, name)
        return records

    def all_texts(self) -> Sequence[str]:
        """Both sides' texts (a tokenizer may be trained on them); read lazily from Arrow storage."""
        self.load_records()
        if isinstance(self.train_records, RecordRows) or isinstance(self.query_records, RecordRows):
            return store.StoredTexts(self.train_records, self.query_records)
        return [r.get("text") or r["prompt"] + r["completion"] for r in self.train_records + self.query_records]

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, tokenizer) -> None:
        self.load_records()
        self.collator = PadCollator(tokenizer.pad_token_id)
        self.train_corpus = self._tokenize_side(self.train_records, tokenizer, "training data")
        self.query_corpus = self._tokenize_side(self.query_records, tokenizer, "queries")

    def _tokenize_side(self, records, tokenizer, name: str) -> TokenizedCorpus:
        if isinstance(records, RecordRows):
            return store.tokenize_dataset(records.dataset, tokenizer, self.max_length, name, self.num_proc, self.cache_dir)
        return tokenize_records(records, tokenizer, self.max_length, name)

    def connect(self, tokenizer, max_length: Optional[int] = None) -> None:
        """Tokenise both sides with the model's tokenizer, at ``max_length`` (the run shell passes
        ``data.max_length`` clamped to the model's context)."""
        if max_length is not None:
            self.max_length = int(max_length)
        self.tokenize(tokenizer)

    def _require_tokens(self) -> None:
        if self.train_corpus is None:
            raise RuntimeError("call AttributionDataModule.tokenize(tokenizer) first")

    def evaluation_dataloader(self, corpus: TokenizedCorpus, loss_reduction: LossReduction = "example_mean") -> DataLoader:
        """All examples of ``corpus`` in length-sorted batches (order-free loss evaluation).

        ``loss_reduction: token_mean`` (a batch's token mean is each member's loss): batches of
        consecutive examples within one group instead, as the authors' evaluation loop makes them.
        """
        self._require_tokens()
        if loss_reduction == "token_mean":
            sampler = GroupBatchSampler(corpus.group_members(), self.eval_batch_size)
        else:
            sampler = LengthSortedBatchSampler(corpus.lengths, self.eval_batch_size)
        return DataLoader(
            ExampleDataset(corpus.examples),
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def ascent_dataloader(self, corpus: TokenizedCorpus, indices: Sequence[int], schedule: UnlearningSchedule, seed: int) -> DataLoader:
        """The planned micro-batches of one unlearning target (examples ``indices`` of ``corpus``)."""
        self._require_tokens()
        plan = plan_micro_batches(len(indices), schedule, seed)
        return DataLoader(AscentDataset(corpus.examples, indices, plan, self.collator), batch_size=None, num_workers=self.num_workers)

    def parallel_ascent_dataloader(self, corpus: TokenizedCorpus, indices: Sequence[Sequence[int]], schedule: UnlearningSchedule,
                                   seeds: Sequence[int]) -> DataLoader:
        """The planned micro-batches of K targets stepped together (:mod:`untrac_pl.parallel`): item j holds
        each target's micro-batch j."""
        self._require_tokens()
        plans = [plan_micro_batches(len(idx), schedule, seed) for idx, seed in zip(indices, seeds)]
        return DataLoader(ParallelAscentDataset(corpus.examples, indices, plans, self.collator), batch_size=None, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader(self.query_corpus)
