"""Arrow storage (``data.storage: arrow``, untrac_pl.data.store): the same records, tokens, batches and
scores as the in-memory path; tokenisation cached by corpus + tokenizer + max_length; lazy views."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from untrac_pl.data import store
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionConfig, run_attribution
from untrac_pl.errors import DataError
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.resume import corpus_digest
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import UnTracModule

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
WORDS = "cat dog bird fish tree river stone cloud road lamp".split()


def _corpus_files(tmp_path: Path, n: int = 240) -> tuple[Path, Path]:
    train = tmp_path / "train.jsonl"
    with open(train, "w") as handle:
        for i in range(n):
            words = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 3 + i % 9))
            handle.write(json.dumps({"id": f"d{i}", "group": f"corpus{i % 4}", "text": f"The {words} near the shelf."}) + "\n")
        handle.write(json.dumps({"id": "pair", "group": "corpus1", "prompt": "Q: a cat?", "completion": " a dog"}) + "\n")
    queries = tmp_path / "queries.csv"
    queries.write_text("id,group,prompt,completion\n" + "".join(
        f"q{i},subset{i % 2},The {WORDS[i]} said,\" the {WORDS[(i + 3) % 10]} river\"\n" for i in range(8)))
    return train, queries


@pytest.fixture
def files(tmp_path):
    return _corpus_files(tmp_path)


def _datamodule(files, storage, cache, **kwargs):
    train, queries = files
    kwargs = {"max_length": 16, "eval_batch_size": 16, **kwargs}
    sources = [DataSource(path=str(train))]
    notes = train.with_name("notes.txt")  # a plain-text source next to the JSONL (one record per paragraph)
    if notes.exists():
        sources.append(DataSource(path=str(notes), text_unit="paragraph", group="notes"))
    return AttributionDataModule(train=sources, queries=[DataSource(path=str(queries))], storage=storage, cache_dir=str(cache), **kwargs)


def test_arrow_corpus_equals_the_in_memory_one(files, tmp_path, tiny_tokenizer):
    files[0].with_name("notes.txt").write_text("A cat sat by the river.\nIt slept.\n\nThe dog ran over the stone road.\n\n\nBirds sang.\n")
    memory = _datamodule(files, "memory", tmp_path / "c", samples_per_group=50, sample_seed=3)
    arrow = _datamodule(files, "arrow", tmp_path / "c", samples_per_group=50, sample_seed=3, num_proc=2)
    for dm in (memory, arrow):
        dm.tokenize(tiny_tokenizer)
    assert isinstance(arrow.train_corpus, store.StoredCorpus) and not isinstance(memory.train_corpus, store.StoredCorpus)
    for side in ("train_corpus", "query_corpus"):
        m, a = getattr(memory, side), getattr(arrow, side)
        assert [dict(r) for r in a.records] == [dict(r) for r in m.records]  # the sample: same records, same order
        assert list(a.examples) == m.examples
        assert a.ids == m.ids and a.groups == m.groups and a.group_members() == m.group_members()
        assert list(a.lengths) == m.lengths and a.num_truncated == m.num_truncated
        assert a.group_column() == m.group_column() and a.text_of(7) == m.text_of(7) and a.texts()[3] == m.texts()[3]
        assert corpus_digest(a) == corpus_digest(m)  # so the resume fingerprint does not depend on the storage
        assert a.records[2].origin == m.records[2].origin and a.records[-1] == m.records[-1]
    assert 0 < arrow.train_corpus.num_truncated < len(arrow.train_corpus)
    assert arrow.train_corpus.groups[-1] == "notes" and arrow.train_corpus.records[-1].origin.endswith("notes.txt, line 7")
    # batches: the loader fetches a whole batch with one Arrow read (ExampleDataset.__getitems__)
    for loader_m, loader_a in [(memory.evaluation_dataloader(memory.train_corpus), arrow.evaluation_dataloader(arrow.train_corpus)),
                               (memory.evaluation_dataloader(memory.query_corpus, "token_mean"), arrow.evaluation_dataloader(arrow.query_corpus, "token_mean"))]:
        pairs = list(zip(loader_m, loader_a, strict=True))
        assert pairs and all(torch.equal(bm[k], ba[k]) for bm, ba in pairs for k in bm)


def test_second_run_reads_and_tokenises_nothing(files, tmp_path, tiny_tokenizer, monkeypatch):
    calls = {"encode": 0, "read": 0}
    encode, generate = store.encode_batch, store._generate_records

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode(*args, **kwargs)

    def counting_generate(*args, **kwargs):
        calls["read"] += 1
        yield from generate(*args, **kwargs)

    monkeypatch.setattr(store, "encode_batch", counting_encode)
    monkeypatch.setattr(store, "_generate_records", counting_generate)
    first = _datamodule(files, "arrow", tmp_path / "c")
    first.tokenize(tiny_tokenizer)
    assert calls == {"encode": 2, "read": 2}  # one batch per side, one read per source
    again = _datamodule(files, "arrow", tmp_path / "c")
    again.tokenize(tiny_tokenizer)
    assert calls == {"encode": 2, "read": 2}
    assert list(again.train_corpus.examples) == list(first.train_corpus.examples)
    # another max_length re-tokenises (from the cached records)
    other = _datamodule(files, "arrow", tmp_path / "c", max_length=20)
    other.tokenize(tiny_tokenizer)
    assert calls == {"encode": 4, "read": 2}
    # a changed file (size or mtime) is read again
    train, _ = files
    with open(train, "a") as handle:
        handle.write(json.dumps({"id": "late", "group": "corpus0", "text": "A late cat by the river."}) + "\n")
    changed = _datamodule(files, "arrow", tmp_path / "c")
    changed.tokenize(tiny_tokenizer)
    assert calls["read"] == 3 and changed.train_corpus.ids[-1] == "late"


def test_tokenizer_identity_tells_tokenizers_apart(tiny_tokenizer, quickstart):
    from untrac_pl.models import load_tokenizer

    same = store.tokenizer_identity(tiny_tokenizer)
    tiny_tokenizer("a cat sat on the mat")  # using a tokenizer does not change its identity,
    tiny_tokenizer(["a cat sat on the mat"], truncation=True, max_length=4, padding="max_length")  # nor its call-time state
    assert store.tokenizer_identity(tiny_tokenizer) == same
    texts = [r.get("text") or r["prompt"] + r["completion"] for r in quickstart["train"] + quickstart["queries"]]
    assert store.tokenizer_identity(load_tokenizer(ModelSpec(train_tokenizer_vocab=300), texts)) == same  # rebuilt alike
    assert store.tokenizer_identity(load_tokenizer(ModelSpec(train_tokenizer_vocab=280), texts)) != same


def test_arrow_errors_name_the_record(tmp_path, tiny_tokenizer):
    train, _ = _corpus_files(tmp_path)
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q0", "group": "q", "text": "A cat sat by the river."}) + "\n"
                       + json.dumps({"id": "short", "group": "q", "text": "a"}) + "\n")
    dm = AttributionDataModule(train=[DataSource(path=str(train))], queries=[DataSource(path=str(queries))], max_length=12,
                               storage="arrow", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"queries, field 'text': record 'short' has no target token: it has fewer than two tokens"):
        dm.tokenize(tiny_tokenizer)
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps({"id": "long", "group": "q", "prompt": "Please read this long question " * 8, "completion": " yes"}) + "\n")
    dm = AttributionDataModule(train=[DataSource(path=str(train))], queries=[DataSource(path=str(cut))], max_length=12,
                               storage="arrow", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"field 'max_length': record 'long' has no target token: its completion was cut away"):
        dm.tokenize(tiny_tokenizer)
    with pytest.raises(DataError, match=r"field 'data.storage': must be 'memory' or 'arrow', got 'disk'"):
        AttributionDataModule(storage="disk")
    with pytest.raises(DataError, match=r"field 'data.num_proc': must be >= 1"):
        AttributionDataModule(num_proc=0)


@pytest.mark.parametrize("method, unit", [("untrac_inv", "group"), ("untrac", "group"), ("untrac_inv", "example")])
def test_scores_are_identical_with_either_storage(files, tmp_path, method, unit):
    from conftest import tiny_gpt2_config

    results = {}
    for storage in ("memory", "arrow"):
        module = UnTracModule(ModelSpec(config=tiny_gpt2_config(0.0), train_tokenizer_vocab=300), OptimizerSpec(lr=1e-3),
                              UnlearningSchedule(num_steps=2, num_epochs=None, batch_size=4))
        dm = _datamodule(files, storage, tmp_path / "cache")
        out = tmp_path / storage
        results[storage] = run_attribution(module, dm, AttributionConfig(method=method, target_unit=unit, output_dir=str(out), seed=1), CPU)
    memory, arrow = results["memory"].table, results["arrow"].table
    assert torch.isfinite(memory.scores).all() and memory.scores.abs().max() > 0
    assert torch.equal(memory.scores, arrow.scores)
    assert (memory.row_ids, memory.col_ids, memory.col_groups) == (arrow.row_ids, arrow.col_ids, arrow.col_groups)
    assert (tmp_path / "memory" / "rankings.json").read_bytes() == (tmp_path / "arrow" / "rankings.json").read_bytes()
    assert (tmp_path / "memory" / "scores.safetensors").read_bytes() == (tmp_path / "arrow" / "scores.safetensors").read_bytes()


def test_large_corpus_config_runs_and_a_second_run_maps_the_cache(tmp_path, monkeypatch):
    """configs/large_corpus.yaml through the CLI (a smaller corpus): storage arrow end to end; the second run
    over the same cache tokenises nothing and writes the same scores."""
    from untrac_pl.cli import main

    calls = {"encode": 0}
    encode = store.encode_batch

    def counting(*args, **kwargs):
        calls["encode"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(store, "encode_batch", counting)
    config = Path(__file__).resolve().parents[1] / "configs" / "large_corpus.yaml"
    small = "{format: generated, generator: quickstart, split: %s, options: {n_per_group: 60}}"
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        args = ["attribute", "-c", str(config), f"--attribution.output_dir={out}", "--trainer.enable_progress_bar=false",
                f"--data.train=[{small % 'train'}]", f"--data.queries=[{small % 'queries'}]", f"--data.cache_dir={tmp_path / 'cache'}",
                "--data.num_proc=1", "--model.unlearning.num_steps=1"]
        assert main(args) == 0
        outputs.append(out)
        if run == "first":
            assert calls["encode"] >= 2
            calls["encode"] = 0
    assert calls["encode"] == 0
    first, second = (ScoreTable.load(o / "scores.safetensors") for o in outputs)
    assert torch.equal(first.scores, second.scores) and first.scores.shape[1] == 240
    assert (outputs[0] / "rankings.json").read_bytes() == (outputs[1] / "rankings.json").read_bytes()


def test_stored_corpus_reads_rows_lazily(files, tmp_path, tiny_tokenizer, monkeypatch):
    """Indexing, slicing and iterating a stored corpus read rows from the mapped files (no list of all examples)."""
    dm = _datamodule(files, "arrow", tmp_path / "c")
    dm.tokenize(tiny_tokenizer)
    examples = dm.train_corpus.examples
    assert not isinstance(examples, list) and len(examples) == 241
    assert examples[-1] == examples[240] and examples[3:5] == [examples[3], examples[4]]
    with pytest.raises(IndexError):
        examples[241]
    reads = []
    take = store.ExampleRows.take
    monkeypatch.setattr(store.ExampleRows, "take", lambda self, positions: reads.append(list(positions)) or take(self, positions))
    batch = next(iter(dm.evaluation_dataloader(dm.train_corpus)))
    assert len(reads) == 1 and sorted(reads[0]) == sorted(batch["index"].tolist())  # one read per batch


def test_in_memory_records_with_arrow_storage(files, tmp_path, tiny_tokenizer):
    """Lists (from_records, the Python API) feed the Arrow path too: an in-memory table, same corpus, no cache files."""
    train, queries = (read_records(str(f)) for f in files)
    memory = AttributionDataModule.from_records(train, queries, max_length=16, samples_per_group=40, sample_seed=1)
    arrow = AttributionDataModule.from_records(train, queries, max_length=16, samples_per_group=40, sample_seed=1, storage="arrow")
    for dm in (memory, arrow):
        dm.tokenize(tiny_tokenizer)
    assert isinstance(arrow.train_corpus, store.StoredCorpus)
    assert list(arrow.train_corpus.examples) == memory.train_corpus.examples and arrow.train_corpus.ids == memory.train_corpus.ids
    assert corpus_digest(arrow.query_corpus) == corpus_digest(memory.query_corpus)
    assert arrow.train_corpus.records[0].origin == memory.train_corpus.records[0].origin
    duplicate = train[:2] + [dict(train[0])]
    with pytest.raises(DataError, match=r"duplicate id 'd0'"):
        AttributionDataModule.from_records(duplicate, queries, storage="arrow").load_records()


def test_cache_hit_with_several_tokenizer_processes(files, tmp_path, tiny_tokenizer):
    """num_proc: 2 (the large-corpus config's): the second run loads the shard files the first wrote."""
    first = _datamodule(files, "arrow", tmp_path / "c", num_proc=2)
    first.tokenize(tiny_tokenizer)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*.arrow")}
    token_files = [f["filename"] for f in first.train_corpus.examples.dataset.cache_files]
    assert len(token_files) == 2 and all("_of_00002" in name for name in token_files)  # one file per process
    again = _datamodule(files, "arrow", tmp_path / "c", num_proc=2)
    again.tokenize(tiny_tokenizer)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*.arrow")} == written  # nothing new, nothing rewritten
    assert [f["filename"] for f in again.train_corpus.examples.dataset.cache_files] == token_files
    assert list(again.train_corpus.examples) == list(first.train_corpus.examples)


def test_both_sides_are_read_before_either_is_checked(tmp_path):
    """The first error is the same with either storage: a broken query file before duplicate training ids."""
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "x", "text": "first text"}) + "\n" + json.dumps({"id": "x", "text": "second text"}) + "\n")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"text": "fine query"}) + "\n{broken\n")
    for storage in ("memory", "arrow"):
        dm = AttributionDataModule(train=[DataSource(path=str(train))], queries=[DataSource(path=str(queries))], storage=storage,
                                   cache_dir=str(tmp_path / "c"))
        with pytest.raises(DataError, match=r"queries\.jsonl, line 2: not valid JSON"):
            dm.load_records()


def test_views_pickle_as_a_file_reference_and_index_like_lists(files, tmp_path, tiny_tokenizer):
    dm = _datamodule(files, "arrow", tmp_path / "c")
    dm.tokenize(tiny_tokenizer)
    for view in (dm.train_corpus.examples, dm.train_corpus.records):
        blob = pickle.dumps(view)
        assert len(blob) < 20_000  # the rows stay in the files (a spawned DataLoader worker maps them itself)
        clone = pickle.loads(blob)
        assert clone.take([0, -1, 5]) == view.take([0, -1, 5]) and view.take([-1]) == [view[len(view) - 1]]
        with pytest.raises(IndexError):
            view.take([len(view)])
