"""Arrow storage for large corpora (``data.storage: arrow``): records and token ids in memory-mapped
`datasets` files, tokenised once per corpus and tokenizer.

    source ──(read + validate, Dataset.from_generator)──► records (id, group, text | prompt+completion, origin)
           ──(sample_per_group, Dataset.select)────────► the side's records
           ──(batched, multi-process Dataset.map)──────► tokens (input_ids, labels, length, truncated, problem)

Both steps are cached by ``datasets`` in ``data.cache_dir`` (default: the ``datasets`` cache). The
records' fingerprint is the source's settings plus its files' sizes and modification times; the
tokens' fingerprint is the records' fingerprint plus the tokenizer's identity and ``max_length``. A
second run over the same corpus and tokenizer therefore reads neither the files nor runs the tokenizer:
it memory-maps what the first run wrote. The validation and errors are the in-memory path's (the same
readers and encoder, :mod:`untrac_pl.data.records` and :func:`untrac_pl.data.tokenize.encode_batch`).

A :class:`StoredCorpus` is a :class:`~untrac_pl.data.tokenize.TokenizedCorpus` whose ``records`` and
``examples`` are lazy views: rows are read from the memory-mapped files when asked for, a batch of
positions at once (:meth:`ArrowRows.take`, used by ``ExampleDataset.__getitems__``; token rows are
sliced straight out of the mapped buffers). Keys also hold the source of this package's data code and the
library versions (:func:`code_version`); a Hub dataset (a name, not a local path) is keyed by its name,
config and split only, so a new revision on the Hub is not noticed: clear the cache.
Under DDP each rank's evaluation sampler only asks for its own batches, so a rank reads only its shard.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from untrac_pl.data.records import DataSource, Record, as_source, check_unique_ids, iter_records
from untrac_pl.data.tokenize import TokenizedCorpus, check_max_length, encode_batch, no_target_error
from untrac_pl.errors import DataError

log = logging.getLogger(__name__)

STORE_FORMAT = "1"  # bump when the stored columns or their meaning change: old caches are then not reused
RECORD_COLUMNS = ("id", "group", "text", "prompt", "completion", "origin")
PROBLEMS = (None, "completion", "short")  # the tokens' ``problem`` column holds an index into this
CHUNK = 4096


def _features(kind: str):
    from datasets import Features, Sequence as ArrowSequence, Value

    if kind == "records":
        return Features({name: Value("string") for name in RECORD_COLUMNS})
    return Features({"input_ids": ArrowSequence(Value("int32")), "labels": ArrowSequence(Value("int32")),
                     "length": Value("int32"), "truncated": Value("bool"), "problem": Value("int8")})


@contextlib.contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars or info lines (the run has its own progress display)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not was_disabled:
            datasets.enable_progress_bars()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """What else decides the stored rows: the source of the data code that reads, validates, generates and
    encodes them (every module of ``untrac_pl.data``) and the versions of the libraries it calls."""
    import datasets
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return _digest(STORE_FORMAT, digest.hexdigest(), datasets.__version__, tokenizers.__version__, transformers.__version__)


def _file_stamp(source: DataSource) -> list:
    """Sizes and modification times of the files behind ``source`` (a changed file means a new read)."""
    if source.path is None:
        return []
    path = Path(source.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = []
    for file in files:
        try:
            info = file.stat()
        except OSError:
            continue  # the reader reports a missing file, naming it
        stamp.append([str(file), info.st_size, info.st_mtime_ns])
    return stamp


def _row(record: dict) -> dict:
    """A record as one row of the records table (absent fields null, the origin a column)."""
    row = {name: record.get(name) for name in RECORD_COLUMNS[:-1]}
    row["origin"] = getattr(record, "origin", None)
    return row


def _generate_records(source: dict) -> Iterator[dict]:
    for record in iter_records(DataSource(**source)):
        yield _row(record)


def source_dataset(source: DataSource | dict | str, cache_dir: Optional[str] = None):
    """One source's validated records as a memory-mapped ``datasets.Dataset`` (read once, then cached)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    source = as_source(source)
    spec = asdict(source)
    fingerprint = _digest("records", code_version(), spec, _file_stamp(source))
    try:
        with _quiet_datasets():
            return Dataset.from_generator(_generate_records, features=_features("records"), cache_dir=cache_dir,
                                          gen_kwargs={"source": spec}, fingerprint=fingerprint)
    except DatasetGenerationError as exc:  # the reader's own error, naming the file, line and field
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def records_dataset(records: Sequence[dict]):
    """In-memory records (:func:`untrac_pl.data.records.records_from_list`, the Python API's lists) as an
    in-memory Arrow dataset: the same storage and views as a source's, without a cache (there is no file)."""
    from datasets import Dataset

    return Dataset.from_list([_row(r) for r in records], features=_features("records"))


def side_dataset(sources: Sequence, cache_dir: Optional[str] = None):
    """The records of all ``sources`` of one side, in order."""
    from datasets import concatenate_datasets

    parts = [source_dataset(s, cache_dir) for s in sources]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _flat(dataset):
    """``dataset`` without an indices mapping (a ``select``), so its Arrow table is its rows in order."""
    if getattr(dataset, "_indices", None) is not None:
        with _quiet_datasets():
            dataset = dataset.flatten_indices()  # cached like any other transform
    return dataset


def _column(dataset, name: str):
    """A column of ``dataset`` as one pyarrow array, in the dataset's row order."""
    return _flat(dataset).data.table.column(name).combine_chunks()


def group_codes(dataset) -> tuple[list[str], np.ndarray]:
    """Group names in first-appearance order and each row's index into them."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(_column(dataset, "group"))
    names = encoded.dictionary.to_pylist()  # dictionary order is first appearance
    return names, encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def members_by_group(codes: np.ndarray, num_groups: int) -> list[np.ndarray]:
    """The positions of each group's rows, in row order (``codes``: each row's group index)."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(num_groups + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(num_groups)]


def sample_dataset_per_group(dataset, samples_per_group: Optional[int], seed: int):
    """:func:`untrac_pl.data.tokenize.sample_per_group` on a dataset: the same records in the same order."""
    if samples_per_group is None:
        return dataset
    if samples_per_group < 1:
        raise DataError(f"must be >= 1, got {samples_per_group}", field="samples_per_group")
    names, codes = group_codes(dataset)
    kept, changed = [], False
    for group, members in zip(names, members_by_group(codes, len(names))):
        if len(members) > samples_per_group:
            rng = random.Random(f"{seed}:{group}")
            members = members[sorted(rng.sample(range(len(members)), samples_per_group))]
            changed = True
        kept.append(members)
    positions = np.concatenate(kept)
    if not changed and np.array_equal(positions, np.arange(len(dataset))):
        return dataset
    return _flat(dataset.select(positions))


def check_unique_dataset_ids(dataset, what: str) -> None:
    """:func:`untrac_pl.data.records.check_unique_ids` on a dataset (the same error, found by Arrow)."""
    import pyarrow.compute as pc

    ids = _column(dataset, "id")
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    origins = _column(dataset, "origin").to_pylist()
    records = []
    for rec_id, origin in zip(ids.to_pylist(), origins):
        record = Record(id=rec_id)
        record.origin = origin
        records.append(record)
    check_unique_ids(records, what)


def tokenizer_identity(tokenizer) -> str:
    """What decides a tokenizer's output: its class, its fast backend's full definition (vocabulary,
    merges, normaliser, post-processor) and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding are call-time state (a call with truncation=True sets them)
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:  # a slow tokenizer: datasets' own hash of the object
        from datasets.fingerprint import Hasher

        definition = Hasher.hash(tokenizer)
    flags = {name: getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token", "padding_side")}
    return _digest(type(tokenizer).__name__, definition, tokenizer.special_tokens_map, flags)


def _encode_rows(batch: dict, tokenizer, max_length: int) -> dict:
    texts = [t if t is not None else p for t, p in zip(batch["text"], batch["prompt"])]
    ids, labels, cut, problems = encode_batch(texts, batch["completion"], tokenizer, max_length)
    return {"input_ids": ids, "labels": labels, "length": [len(i) for i in ids], "truncated": cut,
            "problem": [PROBLEMS.index(p) for p in problems]}


def tokenize_dataset(records, tokenizer, max_length: int, name: str, num_proc: int = 1,
                     cache_dir: Optional[str] = None) -> "StoredCorpus":
    """Tokenise a records dataset with a batched ``.map`` cached under the records' fingerprint + the
    tokenizer's identity + ``max_length``; the errors of :func:`untrac_pl.data.tokenize.tokenize_records`."""
    check_max_length(max_length)
    fingerprint = _digest("tokens", code_version(), records._fingerprint, tokenizer_identity(tokenizer), int(max_length))
    lock_dir = Path(cache_dir) if cache_dir else Path(records.cache_files[0]["filename"]).parent if records.cache_files else None
    lock = contextlib.nullcontext()
    if lock_dir is not None:  # DDP ranks on one machine: the first tokenises, the others then load its files
        from filelock import FileLock

        lock_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_dir / f"untrac_pl-tokens-{fingerprint}.lock"))
    with lock, _quiet_datasets():
        tokens = records.map(_encode_rows, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                             remove_columns=records.column_names, features=_features("tokens"), new_fingerprint=fingerprint,
                             fn_kwargs={"tokenizer": tokenizer, "max_length": int(max_length)})
    problems = _column(tokens, "problem").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(problems)
    if len(bad):
        first = int(bad[0])
        raise no_target_error(records[first]["id"], PROBLEMS[int(problems[first])], name)
    truncated = int(np.count_nonzero(_column(tokens, "truncated").to_numpy(zero_copy_only=False)))
    if truncated:
        log.warning("%s: %d of %d sequences were truncated to max_length=%d", name, truncated, len(records), max_length)
    return StoredCorpus(name=name, records=RecordRows(records), examples=ExampleRows(tokens), num_truncated=truncated)


class ArrowRows(Sequence):
    """A lazy, read-only sequence of rows of a ``datasets.Dataset``; ``take`` reads many rows at once."""

    columns: tuple = ()

    def __init__(self, dataset):
        self.dataset = _flat(dataset)
        # the memory-mapped record batches (nothing is read yet) and the row each starts at
        self._batches = [b for b in self.dataset.data.table.select(list(self.columns)).to_batches() if b.num_rows]
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])[:-1]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getstate__(self):  # a DataLoader worker started by spawn gets the dataset (a file reference), not the rows
        return {"dataset": self.dataset}

    def __setstate__(self, state):
        self.__init__(state["dataset"])

    def _positions(self, positions: Sequence[int]) -> list[int]:
        """``positions`` as non-negative ints (negative ones count from the end, as in a list)."""
        n = len(self)
        out = [int(p) + n if int(p) < 0 else int(p) for p in positions]
        if out and (min(out) < 0 or max(out) >= n):
            raise IndexError(f"row outside 0..{n - 1}")
        return out

    def _rows(self, columns: dict, positions: Sequence[int]) -> list:
        raise NotImplementedError

    def take(self, positions: Sequence[int]) -> list:
        positions = self._positions(positions)
        if not positions:
            return []
        part = self._gather(np.asarray(positions, dtype=np.int64))
        return self._rows({name: part.column(name).to_pylist() for name in self.columns}, positions)

    def _gather(self, positions: np.ndarray):
        """The rows at ``positions`` as one small table, gathered batch by batch: a ``take`` on the whole
        chunked table costs time in the number of chunks (~1,000 per million rows), per call."""
        import pyarrow as pa

        chunk = np.searchsorted(self._starts, positions, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        splits = np.flatnonzero(np.diff(chunk[order])) + 1
        parts = [self._batches[chunk[g[0]]].take(pa.array(positions[g] - self._starts[chunk[g[0]]])) for g in np.split(order, splits)]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.Table.from_batches(parts).combine_chunks().take(pa.array(inverse))

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.take(range(*item.indices(len(self))))
        position = int(item)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(item)
        return self.take([position])[0]

    def __iter__(self):
        for start in range(0, len(self), CHUNK):
            yield from self.take(range(start, min(start + CHUNK, len(self))))


class RecordRows(ArrowRows):
    """Records (``dict``s with an ``origin``, like the readers' :class:`Record`) read from a dataset."""

    columns = RECORD_COLUMNS

    def _rows(self, columns: dict, positions):
        rows = []
        for i in range(len(positions)):
            record = Record((name, columns[name][i]) for name in RECORD_COLUMNS[:-1] if columns[name][i] is not None)
            record.origin = columns["origin"][i]
            rows.append(record)
        return rows

    def column(self, name: str) -> list:
        return _column(self.dataset, name).to_pylist()


class ExampleRows(ArrowRows):
    """Tokenised examples ``{"input_ids", "labels", "index"}`` read from a dataset.

    ``take`` slices each row straight out of the memory-mapped token buffers (numpy views of each record
    batch's offsets and values, no copy): an evaluation batch of random rows costs one small slice per
    row, not one Arrow gather per record batch it touches.
    """

    columns = ("input_ids", "labels")

    def __init__(self, dataset):
        super().__init__(dataset)
        self._offsets = {name: [b.column(name).offsets.to_numpy() for b in self._batches] for name in self.columns}
        self._values = {name: [b.column(name).values.to_numpy() for b in self._batches] for name in self.columns}
        sizes = [b.num_rows for b in self._batches]
        self._chunk = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        self._local = (np.arange(len(self), dtype=np.int64) - np.repeat(self._starts, sizes)).astype(np.int32)

    def take(self, positions: Sequence[int]) -> list:
        positions = self._positions(positions)
        rows = []
        ids_offsets, ids_values = self._offsets["input_ids"], self._values["input_ids"]
        lab_offsets, lab_values = self._offsets["labels"], self._values["labels"]
        for p in positions:
            c, i = self._chunk[p], self._local[p]
            io, lo = ids_offsets[c], lab_offsets[c]
            rows.append({"input_ids": ids_values[c][io[i]:io[i + 1]].tolist(), "labels": lab_values[c][lo[i]:lo[i + 1]].tolist(), "index": p})
        return rows

    def lengths(self) -> np.ndarray:
        return _column(self.dataset, "length").to_numpy(zero_copy_only=False).astype(np.int64)


class StoredCorpus(TokenizedCorpus):
    """A tokenised corpus whose records and examples stay in memory-mapped Arrow files."""

    def __post_init__(self):
        if not self.groups:
            self.groups = group_codes(self.records.dataset)[0]

    @property
    def ids(self) -> list[str]:
        return self.records.column("id")

    @property
    def lengths(self) -> np.ndarray:
        return self.examples.lengths()

    def group_members(self) -> dict[str, list[int]]:
        names, codes = group_codes(self.records.dataset)
        members = {name: positions.tolist() for name, positions in zip(names, members_by_group(codes, len(names)))}
        return {g: members[g] for g in self.groups}

    def group_column(self) -> list[str]:
        names, codes = group_codes(self.records.dataset)
        return [names[c] for c in codes.tolist()]  # one string object per group, not per row


class StoredTexts(Sequence):
    """The texts of a side's records, read lazily (for tokenizer training, which may iterate them)."""

    def __init__(self, *rows: RecordRows):
        self.parts = rows

    def __len__(self) -> int:
        return sum(len(r) for r in self.parts)

    def __getitem__(self, item):
        raise TypeError("StoredTexts is iterated, not indexed")

    def __iter__(self):
        for rows in self.parts:
            for record in rows:
                yield record["text"] if "text" in record else record["prompt"] + record["completion"]
