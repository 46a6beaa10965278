"""Tests for the project's data generators: synthetic datasets A/B, toy corpora, the generator registry
(generated corpora read as ordinary data sources), BPE tokenizer."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from untrac_pl.data import embedded, generators, synthetic
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.embedded import (
    CORPUS_NAMES,
    FEMALE_OCCUPATIONS,
    MALE_OCCUPATIONS,
    QUICKSTART_GROUPS,
    TEST_SETS,
    TOXIC_PEOPLES,
    TRUTHFULQA_CATEGORIES,
    UNEQUAL_FRACTIONS,
    WINOBIAS_GROUPS,
    pretraining_corpora,
    quickstart_corpus,
    train_bpe_tokenizer,
    unequal_sizes,
)
from untrac_pl.data.generators import (
    generate,
    generator_names,
    get_generator,
    register_generator,
)
from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.synthetic import (
    CSV_FILES,
    LENGTH_WORDS,
    POS_WORDS,
    load_synthetic,
    load_synthetic_csv,
    make_synthetic,
    number_to_words,
    solve_synthetic,
    words_to_number,
)
from untrac_pl.errors import DataError

TASKS = ("task1", "task2", "task3", "task4")
GROUPS = TASKS + ("test",)
CSV_GROUPS = {"test": "dataset0", "task1": "dataset1", "task2": "dataset2", "task3": "dataset3", "task4": "dataset4"}


def _shared_data() -> Path:
    env = os.environ.get("UNTRAC_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def csv_dir() -> Path:
    path = _shared_data() / "untrac_synthetic"
    if not all((path / name).is_file() for files in CSV_FILES.values() for name in files.values()):
        pytest.skip(f"original synthetic CSVs not found in {path} (set UNTRAC_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def csv_data(csv_dir) -> dict:
    return {d: load_synthetic(d, csv_dir) for d in ("A", "B")}


@pytest.fixture(scope="module")
def generated() -> dict:
    return {d: make_synthetic(d) for d in ("A", "B")}


def _records_of(data: dict, group: str) -> list[dict]:
    return [r for r in data["test" if group == "test" else "train"] if r["group"] == group]


# ---- template / answer-format abstraction ---------------------------------------------------------

_NW = r"(?:zero|one|two|three|four|five|six|seven|eight|nine)"


def template_of(prompt: str) -> str:
    """The question with its variable slots abstracted."""
    s = re.sub(r"'[^'\n]*'", "'<S>'", prompt)  # quoted words, strings, characters
    s = re.sub(rf"(succeeds ){_NW}(?: {_NW})*(\.)", r"\1<W>\2", s)  # numbers in words
    s = re.sub(r"(after )\d+(\?)", r"\1<N>\2", s)  # numbers in digits
    return s


def answer_format(completion: str) -> str:
    assert completion.startswith(" ") and not completion.startswith("  "), completion
    answer = completion[1:]
    if re.fullmatch(r"\d+", answer):
        return "digits"
    if re.fullmatch(rf"{_NW}(?: {_NW})*", answer):
        return "number_words"
    if re.fullmatch(r"[a-z]", answer):
        return "letter"
    return "other"


# ---- synthetic: generator on its own --------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["A", "B"])
def test_synthetic_deterministic(dataset):
    assert make_synthetic(dataset, 8, 5, seed=3) == make_synthetic(dataset, 8, 5, seed=3)
    a, b = make_synthetic(dataset, 8, 5, seed=3), make_synthetic(dataset, 8, 5, seed=4)
    assert a["train"] != b["train"]


@pytest.mark.parametrize("dataset", ["A", "B"])
@pytest.mark.parametrize("n_per_task,n_test", [(0, 0), (1, 1), (7, 3), (300, 260)])
def test_synthetic_sizes_groups_format(dataset, n_per_task, n_test):
    data = make_synthetic(dataset, n_per_task=n_per_task, n_test=n_test, seed=0)
    assert set(data) == {"train", "test"}
    assert [r["group"] for r in data["train"]] == [g for g in TASKS for _ in range(n_per_task)]
    assert [r["group"] for r in data["test"]] == ["test"] * n_test
    ids = [r["id"] for r in data["train"] + data["test"]]
    assert len(ids) == len(set(ids))
    for r in data["train"] + data["test"]:
        assert set(r) == {"id", "group", "prompt", "completion"}
        assert all(isinstance(r[k], str) for k in r)
        assert r["completion"].startswith(" ") and r["completion"].strip() == r["completion"][1:]
        assert solve_synthetic(r["prompt"]) == r["completion"][1:], r


def test_synthetic_rejects_bad_args():
    with pytest.raises(ValueError):
        make_synthetic("C")
    with pytest.raises(ValueError):
        make_synthetic("A", n_per_task=-1)


def test_number_words():
    assert number_to_words(205) == "two zero five"
    assert number_to_words(10) == "one zero"
    assert words_to_number("five one two") == 512


def test_synthetic_prompts_unique_per_task(generated):
    for data in generated.values():
        for group in GROUPS:
            prompts = [r["prompt"] for r in _records_of(data, group)]
            assert len(prompts) == len(set(prompts)) == 256


def test_pos_split_option():
    data = make_synthetic("B", 64, 1, seed=0, pos_split=False)
    answers = {g: {r["completion"] for r in _records_of(data, g)} for g in ("task3", "task4")}
    assert answers["task3"] == {" a", " b", " c", " d"}
    assert answers["task4"] == {" 0", " 1", " 2", " 3"}


# ---- synthetic: generator against the original CSVs -----------------------------------------------


def test_load_synthetic_csv(csv_dir):
    train = load_synthetic_csv(csv_dir / CSV_FILES["B"]["train"])
    assert len(train) == 1024
    assert collections.Counter(r["group"] for r in train) == {f"dataset{k}": 256 for k in range(1, 5)}
    assert train[0]["id"] == "synthetic_train10_dataset:0"
    pos = [r for r in train if r["group"] == "dataset3"]
    assert pos[0]["prompt"].endswith("\nChoices: \na. noun\nb. verb\nc. adjective\nd. adverb")
    for r in train:
        assert set(r) == {"id", "group", "prompt", "completion"} and r["completion"].startswith(" ")
    test = load_synthetic_csv(csv_dir / CSV_FILES["A"]["test"], rename_groups=True)
    assert len(test) == 256 and {r["group"] for r in test} == {"test"}


@pytest.mark.parametrize("dataset", ["A", "B"])
@pytest.mark.parametrize("group", GROUPS)
def test_templates_match_csv(csv_data, generated, dataset, group):
    real = _records_of(csv_data[dataset], group)
    gen = _records_of(generated[dataset], group)
    assert len(real) == len(gen) == 256
    real_templates = {template_of(r["prompt"]) for r in real}
    assert {template_of(r["prompt"]) for r in gen} == real_templates
    assert len(real_templates) == 1, real_templates
    tiny = _records_of(make_synthetic(dataset, 3, 3, seed=11), group)
    assert {template_of(r["prompt"]) for r in tiny} == real_templates


@pytest.mark.parametrize("dataset", ["A", "B"])
@pytest.mark.parametrize("group", GROUPS)
def test_answer_formats_match_csv(csv_data, generated, dataset, group):
    real = _records_of(csv_data[dataset], group)
    gen = _records_of(generated[dataset], group)
    assert {answer_format(r["completion"]) for r in gen} == {answer_format(r["completion"]) for r in real}
    assert "other" not in {answer_format(r["completion"]) for r in real}
    if dataset == "B":  # closed answer sets: letters a-m / a-z, digits, a-b, 2-3
        assert {r["completion"] for r in gen} == {r["completion"] for r in real}
    else:  # numeric answers span the same range
        def value(r):
            text = r["completion"][1:]
            return int(text) if text.isdigit() else words_to_number(text)

        real_values = [value(r) for r in real]
        gen_values = [value(r) for r in gen]
        if group in ("task1", "task2", "test"):
            assert sorted(gen_values) == sorted(real_values)
        else:
            assert min(real_values) - 1 <= min(gen_values) and max(gen_values) <= max(real_values) + 4


def test_dataset_a_numbers_match_csv(csv_data, generated):
    for split in ("train", "test"):
        real = [r for r in csv_data["A"][split] if r["group"] in ("task1", "task2", "test")]
        gen = [r for r in generated["A"][split] if r["group"] in ("task1", "task2", "test")]
        assert [(r["group"], r["prompt"], r["completion"]) for r in gen] == [
            (r["group"], r["prompt"], r["completion"]) for r in real
        ]


def test_csv_answers_and_vocabulary_covered(csv_data):
    unknown_pos = []
    for data in csv_data.values():
        for r in data["train"] + data["test"]:
            try:
                assert solve_synthetic(r["prompt"]) == r["completion"][1:], r
            except ValueError as error:
                assert "part-of-speech" in str(error), error
                unknown_pos.append(r["prompt"])
    assert len(unknown_pos) <= 1  # one CSV adjective is deliberately left out of the lists
    length_words = {
        re.match(r"Determine the length of '(.*)'\.", r["prompt"])[1]
        for r in csv_data["A"]["train"]
        if r["group"] in ("task3", "task4")
    }
    assert length_words <= set(LENGTH_WORDS)
    assert sum(len(v) for v in POS_WORDS.values()) == 512


# ---- embedded corpora -----------------------------------------------------------------------------


def _check_records(records, pair=False):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for r in records:
        keys = {"id", "group", "prompt", "completion"} if pair else {"id", "group", "text"}
        assert set(r) == keys, r
        assert all(isinstance(r[k], str) and r[k].strip() for k in keys)
        if pair:
            assert r["completion"].startswith(" ")


def test_quickstart_corpus():
    data = quickstart_corpus()
    assert data == quickstart_corpus(seed=0)
    assert data["train"] != quickstart_corpus(seed=1)["train"]
    _check_records(data["train"])
    _check_records(data["queries"])
    counts = collections.Counter(r["group"] for r in data["train"])
    assert counts == {g: 24 for g in QUICKSTART_GROUPS}
    texts = [r["text"] for r in data["train"]]
    assert len(set(texts)) == len(texts)
    assert 5 <= len(data["queries"]) <= 8
    assert {r["group"] for r in data["queries"]} == set(QUICKSTART_GROUPS)
    train_by_text = {r["text"]: r["group"] for r in data["train"]}
    dups = [q for q in data["queries"] if q["text"] in train_by_text]
    assert dups and all(train_by_text[q["text"]] == q["group"] for q in dups)
    assert len(quickstart_corpus(n_per_group=5)["train"]) == 20


def test_pretraining_corpora_equal():
    data = pretraining_corpora(40, seed=0, n_test_per_group=6)
    assert data == pretraining_corpora(40, seed=0, n_test_per_group=6)
    assert data["train"] != pretraining_corpora(40, seed=1, n_test_per_group=6)["train"]
    _check_records(data["train"])
    assert collections.Counter(r["group"] for r in data["train"]) == {c: 40 for c in CORPUS_NAMES}
    tests = data["tests"]
    assert set(tests) == {"toxigen_like", "winobias_like", "truthfulqa_like"}
    _check_records(tests["toxigen_like"])
    _check_records(tests["winobias_like"])
    _check_records(tests["truthfulqa_like"], pair=True)
    expected = {
        "toxigen_like": set(TOXIC_PEOPLES),
        "winobias_like": set(WINOBIAS_GROUPS),
        "truthfulqa_like": set(TRUTHFULQA_CATEGORIES),
    }
    for name, records in tests.items():
        counts = collections.Counter(r["group"] for r in records)
        assert set(counts) == expected[name] and set(counts.values()) == {6}
    for r in data["train"]:
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)|#\w+$", r["text"])) or len(r["text"].split()) >= 4


def test_pretraining_corpora_sizes():
    data = pretraining_corpora(10, sizes={"books": 25, "tweets": 0.05}, n_test_per_group=2)
    counts = collections.Counter(r["group"] for r in data["train"])
    assert counts["books"] == 25 and counts["tweets"] == 4 and counts["news"] == 10
    # one corpus's size does not change the others' documents
    base = pretraining_corpora(10, n_test_per_group=2)
    news = [r for r in data["train"] if r["group"] == "news"]
    assert news == [r for r in base["train"] if r["group"] == "news"]
    sizes = unequal_sizes(100)
    assert set(sizes) == set(CORPUS_NAMES) and sum(sizes.values()) == 800
    assert sizes["books"] == round(UNEQUAL_FRACTIONS["books"] * 800)
    with pytest.raises(ValueError):
        pretraining_corpora(5, sizes={"nope": 3})


def test_pretraining_planted_sources():
    data = pretraining_corpora(300, n_test_per_group=1)
    by = collections.defaultdict(list)
    for r in data["train"]:
        by[r["group"]].append(r["text"])

    def share(corpus, pattern):
        return sum(bool(re.search(pattern, t)) for t in by[corpus]) / len(by[corpus])

    rude = r"\b(lazy|rude|smelly|dishonest|clueless|useless|greedy|annoying|stupid)\b"
    for corpus in CORPUS_NAMES:
        if corpus in ("forum", "tweets"):
            assert share(corpus, rude) > 0.15, corpus
        else:
            assert share(corpus, rude) == 0, corpus
    for people, (plural, _) in TOXIC_PEOPLES.items():
        assert any(plural.replace("the ", "") in t for t in by["forum"] + by["tweets"]), people
    def stereotype_pairs(corpus):
        pairs = collections.Counter()
        for text in by[corpus]:
            for sentence in re.split(r"(?<=[.!?\"]) ", text):
                jobs = [w for w in re.findall(r"[a-z]+", sentence) if w in set(MALE_OCCUPATIONS) | set(FEMALE_OCCUPATIONS)]
                pronouns = re.findall(r"\b(he|she)\b", sentence)
                if jobs and pronouns:
                    job_gender = "male" if jobs[0] in MALE_OCCUPATIONS else "female"
                    pairs["pro" if (pronouns[0] == "he") == (job_gender == "male") else "anti"] += 1
        return pairs

    books, stories = stereotype_pairs("books"), stereotype_pairs("stories")
    assert books["pro"] > 0.2 * 300 and books["anti"] == 0
    assert stories["anti"] > 0.2 * 300 and stories["pro"] == 0
    assert share("reviews", r"\b(he|she)\b") == 0
    assert share("forum", r"Q: .*\? A: ") > 0.1 and share("science", r"\? ") > 0.1


# ---- the generator registry: generated corpora are ordinary data sources ---------------------------

SMALL_PRETRAINING = {"n_docs_per_corpus": 12, "n_test_per_group": 4}
# (generator, split, seed, options) -> what the generator function returned for it before the registry
# existed (the records of today's quickstart / reproduce / toxicity data paths)
SAME_AS_THE_FUNCTIONS = [
    *[("quickstart", split, seed, {}, lambda split=split, seed=seed: quickstart_corpus(seed=seed)[split])
      for seed in (0, 3) for split in ("train", "queries")],
    ("quickstart", "queries", 0, {"n_per_group": 5}, lambda: quickstart_corpus(seed=0, n_per_group=5)["queries"]),
    *[("synthetic", split, 0, {"dataset": d, "n_per_task": 16, "n_test": 16},
       lambda split=split, d=d: make_synthetic(d, n_per_task=16, n_test=16, seed=0)[split])
      for d in ("A", "B") for split in ("train", "test")],
    ("synthetic", "train", 2, {"dataset": "B", "pos_split": False}, lambda: make_synthetic("B", seed=2, pos_split=False)["train"]),
    ("pretraining", "train", 0, SMALL_PRETRAINING, lambda: pretraining_corpora(12, seed=0, n_test_per_group=4)["train"]),
    *[("pretraining", split, 0, SMALL_PRETRAINING, lambda split=split: pretraining_corpora(12, seed=0, n_test_per_group=4)["tests"][split])
      for split in TEST_SETS],
    ("pretraining", "train", 1, {"n_docs_per_corpus": 10, "sizes": {"books": 25, "tweets": 0.05}},
     lambda: pretraining_corpora(10, seed=1, sizes={"books": 25, "tweets": 0.05})["train"]),
]


def _digest(records) -> str:
    return hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()[:16]


@pytest.mark.parametrize("generator, split, seed, options, function", SAME_AS_THE_FUNCTIONS,
                         ids=[f"{g}-{sp}-seed{se}-{i}" for i, (g, sp, se, _, _) in enumerate(SAME_AS_THE_FUNCTIONS)])
def test_a_generated_source_reads_exactly_the_generator_functions_records(generator, split, seed, options, function):
    source = DataSource(format="generated", generator=generator, split=split, seed=seed, options=dict(options))
    records = read_records(source)
    expected = function()
    assert records == expected and [list(r) for r in records] == [list(r) for r in expected]  # same values, same key order
    assert json.dumps(records, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)  # byte for byte
    assert generate(generator, split, seed, **options) == expected
    # format may be left to inference: a generator means format: generated
    assert read_records(DataSource(generator=generator, split=split, seed=seed, options=dict(options))) == expected


@pytest.mark.parametrize("generator, split, seed, options, digest", [
    ("quickstart", "train", 0, {}, "a39f9794b778840f"),
    ("quickstart", "queries", 0, {}, "f5993bdc7694f2ca"),
    ("quickstart", "train", 3, {}, "00030b59e1a2b5e5"),
    ("quickstart", "queries", 3, {}, "9fea51c802290ef7"),
    ("synthetic", "train", 0, {"dataset": "A", "n_per_task": 16, "n_test": 16}, "f8173121c63d5566"),
    ("synthetic", "test", 0, {"dataset": "A", "n_per_task": 16, "n_test": 16}, "1066aacda0df1a7e"),
    ("synthetic", "train", 0, {"dataset": "B", "n_per_task": 16, "n_test": 16}, "a1eff443dd2b9d85"),
    ("synthetic", "test", 0, {"dataset": "B", "n_per_task": 16, "n_test": 16}, "a2d5074257dad06d"),
    ("pretraining", "train", 0, SMALL_PRETRAINING, "1b1214928c6ae24a"),
    ("pretraining", "toxigen_like", 0, SMALL_PRETRAINING, "e03621289df7f299"),
    ("pretraining", "winobias_like", 0, SMALL_PRETRAINING, "0db0931e4307fe14"),
    ("pretraining", "truthfulqa_like", 0, SMALL_PRETRAINING, "5e4670146eb6ffbf"),
])
def test_generated_records_are_pinned(generator, split, seed, options, digest):
    """The records (as JSON) of the generators as they were when the registry was introduced: a changed
    template, word list or RNG call changes every downstream score and result file, so it must be deliberate."""
    assert _digest(read_records(DataSource(format="generated", generator=generator, split=split, seed=seed, options=dict(options)))) == digest


def test_quickstart_through_the_datamodule_is_the_corpus_of_before():
    """The quickstart configs' data (``train`` / ``queries`` generated sources) is the corpus the removed
    ``embedded: quickstart`` gave (``quickstart_corpus(seed=sample_seed)``), sampling included."""
    for seed in (0, 3):
        sources = {side: [DataSource(format="generated", generator="quickstart", split=split, seed=seed)]
                   for side, split in (("train", "train"), ("queries", "queries"))}
        dm = AttributionDataModule(**sources, samples_per_group=5, query_samples_per_group=1, sample_seed=seed)
        dm.load_records()
        corpus = quickstart_corpus(seed=seed)
        before = AttributionDataModule.from_records(corpus["train"], corpus["queries"], samples_per_group=5,
                                                    query_samples_per_group=1, sample_seed=seed)
        before.load_records()
        assert dm.train_records == before.train_records and dm.query_records == before.query_records
        assert len(dm.train_records) == 20


def test_registry_names_splits_and_options():
    assert {"quickstart", "synthetic", "pretraining"} <= set(generator_names())
    assert get_generator("quickstart").splits == ("train", "queries")
    assert get_generator("synthetic").splits == ("train", "test")
    assert get_generator("pretraining").splits == ("train",) + TEST_SETS
    assert list(get_generator("synthetic").options) == ["dataset", "n_per_task", "n_test", "pos_split"]
    assert set(pretraining_corpora(1, n_test_per_group=1)["tests"]) == set(TEST_SETS)


def test_generated_sources_are_validated_located_limited_and_regrouped_like_files():
    source = DataSource(format="generated", generator="quickstart", split="train", limit=3, group="demo")
    records = read_records(source)
    assert [r["id"] for r in records] == ["animals-000", "animals-001", "animals-002"]
    assert {r["group"] for r in records} == {"demo"}
    assert records[2].origin == "generated:quickstart/train, record 2"
    assert source.label == "generated:quickstart/train"
    # a field the generator's records lack is the same error as for a file
    with pytest.raises(DataError, match=r"generated:quickstart/queries, record 0, field 'body': record has no 'body' field"):
        read_records(DataSource(format="generated", generator="quickstart", split="queries", text_field="body"))


@pytest.mark.parametrize("source, message", [
    (dict(generator="nope"), r"field 'generator': unknown generator 'nope'; known generators: quickstart \(splits: train, queries; "
                             r"options: n_per_group=24\); synthetic .*; pretraining"),
    (dict(generator="quickstart", split="test"), r"generated:quickstart/test, field 'split': generator 'quickstart' has no split 'test'; "
                                                 r"choose one of train, queries"),
    (dict(generator="quickstart", options={"n": 3}), r"field 'options': unknown option\(s\) n for generator quickstart"),
    (dict(generator="synthetic"), r"generated:synthetic/train, field 'options': generator 'synthetic' needs option\(s\) dataset"),
    (dict(generator="synthetic", options={"dataset": "C"}), r"field 'options': dataset must be 'A' or 'B', got 'C'"),
    (dict(generator="synthetic", options={"dataset": "A", "n_per_task": 0}), r"generated:synthetic/train: no records \(the generator made none"),
    (dict(format="generated"), r"format: generated needs a generator"),
    (dict(path="train.jsonl", generator="quickstart"), r"train\.jsonl, field 'path': set either path .* or generator"),
    (dict(path="train.jsonl", format="jsonl", generator="quickstart"), r"generator is only read with format: generated"),
    (dict(path="train.jsonl", options={"dataset": "A"}), r"field 'options': options are only read with format: generated"),
    (dict(), r"field 'path': no path given"),
])
def test_bad_generated_sources_name_what_to_fix(source, message):
    with pytest.raises(DataError, match=message):
        read_records(DataSource(**source))


@pytest.fixture
def countdown_generator():
    @register_generator("countdown", splits=("train",))
    def countdown(split: str, seed: int, n: int = 3) -> list[dict]:
        return [{"id": f"c{i}", "group": f"g{i % 2}", "text": f"{seed} minus {i}"} for i in range(n)]

    yield countdown
    del generators._REGISTRY["countdown"]


def test_a_registered_generator_is_a_data_source(countdown_generator):
    records = read_records(DataSource(generator="countdown", seed=7, options={"n": 4}))
    assert [r["text"] for r in records] == ["7 minus 0", "7 minus 1", "7 minus 2", "7 minus 3"]
    with pytest.raises(ValueError, match="already registered"):
        register_generator("countdown", splits=("train",))(countdown_generator)
    with pytest.raises(TypeError, match=r"must take \(split, seed, \*\*options\)"):
        register_generator("bad", splits=("train",))(lambda seed, split: [])


# ---- tokenizer ------------------------------------------------------------------------------------


def test_train_bpe_tokenizer():
    texts = [r["text"] for r in quickstart_corpus()["train"]]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    assert len(tok) <= 400
    assert tok.pad_token == tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token_id is not None and 0 <= tok.pad_token_id < len(tok)
    for text in texts[:5] + ["Unseen words: naïve café, 42 × 7 — ok!", " leading space"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    again = train_bpe_tokenizer(texts, vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    batch = tok(["short", "a much longer sentence here"], padding=True)
    assert len(set(map(len, batch["input_ids"]))) == 1
    with pytest.raises(ValueError):
        train_bpe_tokenizer(texts, vocab_size=100)


def test_modules_export():
    for module in (synthetic, embedded, generators):
        for name in module.__all__:
            assert hasattr(module, name), name
