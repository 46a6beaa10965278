"""Readers, tokenisation with loss masks, truncation, sampling, length-sorted batching."""
from __future__ import annotations

import pytest
import torch

from untrac_pl.data.collate import LengthSortedBatchSampler, PadCollator
from untrac_pl.data.records import DataSource, read_records, records_from_list
from untrac_pl.data.schedule import (
    UnlearningSchedule,
    num_optimizer_steps,
    plan_micro_batches,
)
from untrac_pl.data.tokenize import sample_per_group, tokenize_records
from untrac_pl.errors import DataError
from untrac_pl.losses import IGNORE_INDEX


def test_jsonl_csv_text_and_list_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello there", "group": "g1"}\n\n{"id": "x", "prompt": "Q?", "completion": " A", "group": "g2"}\n')
    (tmp_path / "b.csv").write_text('text,group\n"one, two",g3\nthree,g3\n')
    (tmp_path / "c.txt").write_text("first line\n\nsecond line\n")
    jsonl = read_records(str(tmp_path / "a.jsonl"))
    assert jsonl == [
        {"id": "a:0", "group": "g1", "text": "hello there"},
        {"id": "x", "group": "g2", "prompt": "Q?", "completion": " A"},
    ]
    assert [r["text"] for r in read_records(DataSource(path=str(tmp_path / "b.csv")))] == ["one, two", "three"]
    text = read_records(DataSource(path=str(tmp_path / "c.txt"), group="plain"))
    assert [(r["text"], r["group"]) for r in text] == [("first line", "plain"), ("second line", "plain")]
    para = read_records(DataSource(path=str(tmp_path / "c.txt"), text_unit="paragraph"))
    assert len(para) == 2 and para[0]["group"] == "c"
    listed = records_from_list(["x y", {"text": "z", "group": "k"}], group=None)
    assert listed[0]["group"] == "<list>" and listed[1]["group"] == "k"


def test_json_file_may_be_an_array_or_json_lines(tmp_path):
    import json

    items = [{"id": "a1", "text": "hello there", "group": "g1"}, {"prompt": "Q?", "completion": " A", "group": "g2"}]
    (tmp_path / "arr.json").write_text("\n  " + json.dumps(items, indent=2), encoding="utf-8")
    (tmp_path / "bom.json").write_bytes("\ufeff".encode() + json.dumps(items[:1]).encode())
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    expected = [
        {"id": "a1", "group": "g1", "text": "hello there"},
        {"id": "arr:1", "group": "g2", "prompt": "Q?", "completion": " A"},
    ]
    assert read_records(str(tmp_path / "arr.json")) == expected
    assert read_records(str(tmp_path / "bom.json")) == expected[:1]
    assert read_records(str(tmp_path / "lines.json")) == [expected[0], {**expected[1], "id": "lines:1"}]
    assert read_records(DataSource(path=str(tmp_path / "arr.json"), limit=1)) == expected[:1]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: no records"):
        read_records(str(tmp_path / "empty.json"))
    (tmp_path / "scalars.json").write_text('[{"text": "fine"}, 3]')
    with pytest.raises(DataError, match=r"scalars\.json, item 1: expected an object, got int"):
        read_records(str(tmp_path / "scalars.json"))


def _sources_as_configs_parse_them(value: str) -> list[DataSource]:
    """A list of data sources parsed as the CLI parses ``data.train`` (jsonargparse, typed fields)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--train", type=list[DataSource])
    return parser.instantiate_classes(parser.parse_args(["--train", value])).train


def test_format_json_may_be_set_explicitly(tmp_path):
    """``format: json`` is accepted wherever a ``.json`` file infers it (the config parser refused it: the
    format's choices lacked ``json``); set explicitly, it reads a JSON array whatever the file's name."""
    import json

    items = [{"id": "a1", "text": "hello there", "group": "g1"}, {"id": "a2", "prompt": "Q?", "completion": " A", "group": "g2"}]
    (tmp_path / "arr.json").write_text(json.dumps(items), encoding="utf-8")
    (tmp_path / "arr.export").write_text(json.dumps(items), encoding="utf-8")
    inferred = read_records(str(tmp_path / "arr.json"))
    for name in ("arr.json", "arr.export"):
        (source,) = _sources_as_configs_parse_them(f"[{{path: {tmp_path / name}, format: json}}]")
        assert source.format == "json"
        assert read_records(source) == inferred
    with pytest.raises(DataError, match=r"cannot infer the format from suffix '\.export'; set format: jsonl\|json\|"):
        read_records(str(tmp_path / "arr.export"))


def test_a_generated_source_in_a_config(tmp_path):
    """``{format: generated, generator, split, seed, options}`` parses like any source and reads the generator's records."""
    from untrac_pl.data.synthetic import make_synthetic

    (source,) = _sources_as_configs_parse_them("[{format: generated, generator: synthetic, split: test, seed: 4, "
                                               "options: {dataset: B, n_per_task: 2, n_test: 3}}]")
    assert (source.generator, source.split, source.seed, source.options) == ("synthetic", "test", 4, {"dataset": "B", "n_per_task": 2, "n_test": 3})
    assert read_records(source) == make_synthetic("B", n_per_task=2, n_test=3, seed=4)["test"]


def test_datasets_reader_local_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["alpha beta", "gamma delta"], "source": ["s1", "s2"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    records = read_records(DataSource(path=str(tmp_path / "saved"), text_field="content", group_field="source"))
    assert [(r["text"], r["group"]) for r in records] == [("alpha beta", "s1"), ("gamma delta", "s2")]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "part.jsonl").write_text('{"text": "from files"}\n')
    files = read_records(DataSource(path=str(tmp_path / "files"), format="hf", group="g"))
    assert files[0]["text"] == "from files"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no records"),
        ('{"text": "ok"}\n{not json}\n', "line 2: not valid JSON"),
        ('{"group": "g"}\n', "line 1, field 'text': record has no 'text'"),
        ('{"text": "   "}\n', "line 1, field 'text': text is empty"),
        ('{"txt": "typo"}\n', "fields present: txt"),
        ('{"prompt": "Q"}\n', "line 1, field 'completion': missing"),
        ('{"text": 5}\n', "must be a string"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_records(str(path))
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_records(str(tmp_path / "latin.jsonl"))


def test_prompt_tokens_are_masked_and_truncation_counted(tiny_tokenizer):
    records = [
        {"id": "qa", "group": "g", "prompt": "What is the number after seven?", "completion": " eight"},
        {"id": "t", "group": "g", "text": "the cat sat on the mat " * 20},
    ]
    corpus = tokenize_records(records, tiny_tokenizer, max_length=32, name="test")
    qa, long = corpus.examples
    prompt_len = len(tiny_tokenizer("What is the number after seven?")["input_ids"])
    completion = tiny_tokenizer(" eight", add_special_tokens=False)["input_ids"]
    assert qa["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert qa["labels"][prompt_len:] == completion and qa["input_ids"][prompt_len:] == completion
    assert len(long["input_ids"]) == 32 and long["labels"] == long["input_ids"]
    assert corpus.num_truncated == 1


def test_completion_cut_away_is_an_error(tiny_tokenizer):
    records = [{"id": "qa", "group": "g", "prompt": "a long prompt " * 10, "completion": " x"}]
    with pytest.raises(DataError, match="record 'qa' has no target token.*raise max_length"):
        tokenize_records(records, tiny_tokenizer, max_length=8, name="queries")
    with pytest.raises(DataError, match="max_length must be >= 2"):
        tokenize_records(records, tiny_tokenizer, max_length=1, name="queries")


def test_per_group_sampling_is_seeded_and_equal_size():
    records = [{"id": f"{g}{i}", "group": g, "text": "t"} for g, n in (("a", 10), ("b", 4)) for i in range(n)]
    one = sample_per_group(records, 5, seed=1)
    assert sum(r["group"] == "a" for r in one) == 5 and sum(r["group"] == "b" for r in one) == 4
    assert one == sample_per_group(records, 5, seed=1)
    assert one != sample_per_group(records, 5, seed=2)


def test_length_sorted_batches_cover_everything_with_less_padding():
    lengths = [3, 9, 1, 7, 5, 2, 8]
    batches = list(LengthSortedBatchSampler(lengths, 3))
    assert sorted(i for b in batches for i in b) == list(range(7))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    naive = sum(max(lengths[i : i + 3]) * len(lengths[i : i + 3]) for i in range(0, 7, 3))
    assert padded < naive


def test_collator_pads_right_and_masks_labels():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "index": 3}, {"input_ids": [8], "labels": [8], "index": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["index"].tolist() == [3, 1]
    assert all(value.dtype == torch.long for value in batch.values())  # the embedding and cross_entropy need int64


def test_num_steps_plans_never_repeat_an_example_within_a_step_and_cover_every_epoch():
    """Brute force: a step that straddles two epochs (3 examples, batch 2: [a, b] then [c, ?]) must
    not take c twice; and the stream of steps, cut into epochs, is a permutation per epoch."""
    for n in range(1, 8):
        for batch in range(1, n + 1):
            for seed in range(4):
                plan = plan_micro_batches(n, UnlearningSchedule(num_steps=11, num_epochs=None, batch_size=batch), seed=seed)
                steps = [e["positions"] for e in plan]
                assert len(steps) == 11 and all(len(step) == batch == len(set(step)) for step in steps), (n, batch, seed, steps)
                stream = [p for step in steps for p in step]
                for start in range(0, len(stream) - n + 1, n):
                    assert sorted(stream[start : start + n]) == list(range(n)), (n, batch, seed, stream)


def test_ascent_plan_steps_epochs_and_accumulation():
    epochs = plan_micro_batches(5, UnlearningSchedule(num_epochs=2, batch_size=2), seed=0)
    assert num_optimizer_steps(epochs) == 6 and sorted(p for e in epochs[:3] for p in e["positions"]) == list(range(5))
    steps = plan_micro_batches(4, UnlearningSchedule(num_steps=5, num_epochs=None, batch_size=None, micro_batch_size=3), seed=0)
    assert num_optimizer_steps(steps) == 5 and len(steps) == 10
    assert all(e["denominator"] == 4 for e in steps) and [e["step_end"] for e in steps[:2]] == [False, True]
    with pytest.raises(ValueError, match="exactly one of num_steps and num_epochs"):
        UnlearningSchedule(num_steps=3, num_epochs=1)
