"""Readers that turn JSONL, JSON arrays, CSV, plain text, `datasets` datasets, the project's generated
corpora (:mod:`untrac_pl.data.generators`) and in-memory lists into records.

A record is ``{"id": str, "group": str, "text": str}`` or ``{"id", "group", "prompt", "completion"}``
(loss on the completion only). Every reader validates as it goes and raises :class:`DataError`
naming the file, line and field at fault.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Union

from untrac_pl.data.generators import generate
from untrac_pl.errors import DataError

Format = Literal["auto", "jsonl", "json", "csv", "text", "hf", "generated"]
# Where a raw record came from: a 1-based file line (int), or a label such as "row 4" (a `datasets`
# row index), "item 3" (an index into a top-level JSON array) or "record 2" (a generated corpus's index).
Location = Optional[Union[int, str]]


class Record(dict):
    """A record (a plain ``dict`` in every respect) that also remembers where it was read from.

    ``origin`` is e.g. ``"train.jsonl, line 3"`` or ``"saved, row 4"`` (``None`` when unknown); it is
    not a key, so records compare, serialise and copy like ordinary dicts (a copy drops the origin).
    """

    origin: Optional[str] = None


def _where(path: str, line: Location) -> dict:
    """``DataError`` keyword arguments for a record at ``line`` of ``path``."""
    if isinstance(line, str):
        return dict(source=f"{path}, {line}", line=None)
    return dict(source=path, line=line)


def _describe(path: str, line: Location) -> str:
    if line is None:
        return str(path)
    return f"{path}, {line}" if isinstance(line, str) else f"{path}, line {line}"


@dataclass
class DataSource:
    """Where one set of records comes from and how its fields are named.

    A file or dataset (``{path: train.jsonl}``) or a corpus the project generates
    (``{format: generated, generator: quickstart, split: train}``; see :mod:`untrac_pl.data.generators`).

    Args:
        path: a .jsonl/.json/.csv/.txt file, a local `datasets` directory (``save_to_disk`` or a
            folder of data files) or a Hub dataset id (``format: hf``). Not set for ``format: generated``.
        format: ``auto`` (from the suffix; a directory is ``hf``; a ``generator`` means ``generated``),
            ``jsonl``, ``json`` (a top-level array of objects, or JSONL), ``csv`` (``.tsv``: tab-separated),
            ``text``, ``hf`` or ``generated``.
        group: one group for every record; otherwise ``group_field`` is read (default group: the
            file's stem).
        group_field: the field holding a record's group.
        text_field: the field holding a record's text.
        prompt_field: the field holding a record's prompt (loss on the completion only).
        completion_field: the field holding a record's completion.
        id_field: the field holding a record's id (default id: ``<file stem>:<position>``).
        split: the split of a `datasets` dataset, or of a generated corpus (e.g. ``train``,
            ``queries``, ``test``).
        text_unit: plain text: a record per ``line`` or per ``paragraph`` (blank-line separated).
        limit: read at most this many records.
        hf_config: the configuration name of a Hub dataset.
        extra: not read by any reader (accepted so that configs setting it still load).
        generator: ``format: generated``: the generator's name (``quickstart``, ``synthetic``,
            ``pretraining``, or one registered with ``register_generator``).
        seed: ``format: generated``: the seed of the draw (the same seed gives the same records; it is
            the source's own, independent of ``data.sample_seed``).
        options: ``format: generated``: the generator's options, e.g. ``{dataset: A, n_per_task: 64}``
            for ``synthetic``; a corpus's splits belong together only when read with the same options.
    """

    path: Optional[str] = None
    format: Format = "auto"
    group: Optional[str] = None
    group_field: str = "group"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    id_field: str = "id"
    split: str = "train"
    text_unit: Literal["line", "paragraph"] = "line"
    limit: Optional[int] = None
    hf_config: Optional[str] = None
    extra: dict = field(default_factory=dict)
    generator: Optional[str] = None
    seed: int = 0
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How messages and record origins name this source: its path, or ``generated:<generator>/<split>``."""
        if self.path is None and self.generator is not None:
            return f"generated:{self.generator}/{self.split}"
        return str(self.path)


def _stem(source: DataSource) -> str:
    """The default group (and id prefix) of records that name none: the file's stem, or ``<generator>_<split>``."""
    if source.path is None and source.generator is not None:
        return f"{source.generator}_{source.split}"
    return Path(source.path).stem


def _infer_format(source: DataSource) -> str:
    if source.generator is not None and source.format in ("auto", "generated"):
        if source.path is not None:
            raise DataError(f"set either path (a file or dataset) or generator (format: generated), not both (generator: {source.generator})",
                            source=source.label, field="path")
        return "generated"
    if source.format == "generated":
        raise DataError("format: generated needs a generator (e.g. generator: quickstart)", source=source.label, field="generator")
    if source.generator is not None:
        raise DataError(f"generator is only read with format: generated (this source has format: {source.format}); "
                        "if the command line replaced a generated source, reset the list first (e.g. --data.train=null)",
                        source=source.label, field="generator")
    if source.options:
        raise DataError("options are only read with format: generated (they are a generator's options); if the command line "
                        "replaced a generated source, reset the list first (e.g. --data.train=null)", source=source.label, field="options")
    if source.path is None:
        raise DataError("no path given: set path (a file or dataset), or format: generated and a generator", field="path")
    if source.format != "auto":
        return source.format
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"  # a top-level JSON array of objects, or JSONL
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".txt", ".text"):
        return "text"
    if path.is_dir():
        return "hf"
    if not path.exists():
        raise DataError("file not found", source=source.path)
    raise DataError(f"cannot infer the format from suffix '{suffix}'; set format: jsonl|json|csv|text|hf", source=source.path)


def _make_record(raw: dict, source: DataSource, position: int, line: Location) -> dict:
    record = _validate_record(raw, source, position, line)
    record.origin = _describe(source.label, line)
    return record


def _validate_record(raw: dict, source: DataSource, position: int, line: Location) -> Record:
    where = _where(source.label, line)
    if not isinstance(raw, dict):
        raise DataError(f"expected an object, got {type(raw).__name__}", **where)
    group = source.group if source.group is not None else raw.get(source.group_field)
    if group is None:
        group = _stem(source)
    if not str(group).strip():
        raise DataError("group is empty (every record needs a non-empty group name)", field=source.group_field, **where)
    rec_id = raw.get(source.id_field)
    rec_id = f"{_stem(source)}:{position}" if rec_id is None or rec_id == "" else str(rec_id)
    has_text = source.text_field in raw
    has_pair = source.prompt_field in raw or source.completion_field in raw
    if has_text:
        text = raw[source.text_field]
        if not isinstance(text, str):
            raise DataError(f"must be a string, got {type(text).__name__}", field=source.text_field, **where)
        if not text.strip():
            raise DataError("text is empty", field=source.text_field, **where)
        return Record(id=rec_id, group=str(group), text=text)
    if has_pair:
        for name in (source.prompt_field, source.completion_field):
            if name not in raw:
                raise DataError("missing (a prompt needs a completion and vice versa)", field=name, **where)
            if not isinstance(raw[name], str):
                raise DataError(f"must be a string, got {type(raw[name]).__name__}", field=name, **where)
        if not raw[source.completion_field].strip():
            raise DataError("completion is empty: there is nothing to take a loss on", field=source.completion_field, **where)
        return Record(id=rec_id, group=str(group), prompt=raw[source.prompt_field], completion=raw[source.completion_field])
    present = ", ".join(sorted(map(str, raw))) or "none"
    raise DataError(
        f"record has no '{source.text_field}' field and no '{source.prompt_field}'/'{source.completion_field}' "
        f"pair (fields present: {present}); set text_field/prompt_field/completion_field in the data source",
        field=source.text_field,
        **where,
    )


def _read_jsonl(source: DataSource) -> Iterable[tuple[dict, int]]:
    try:
        handle = open(source.path, encoding="utf-8-sig")  # -sig: a leading BOM is skipped
    except FileNotFoundError:
        raise DataError("file not found", source=source.path) from None
    with handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), line_no
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno})", source=source.path, line=line_no) from None
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", source=source.path) from None


def _first_char(path: str) -> str:
    """The first non-whitespace character of a UTF-8 file ("" if none or undecodable: the JSONL reader reports it)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            while True:
                chunk = handle.read(65536)
                if not chunk:
                    return ""
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[0]
    except (OSError, UnicodeDecodeError):
        return ""


def _read_utf8(path: str) -> str:
    """A whole text file (a leading BOM dropped), with the reader errors every format shares."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("file not found", source=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", source=path) from None


def _read_json(source: DataSource) -> Iterable[tuple[dict, Location]]:
    """A ``.json`` file: a top-level array of objects (rows named ``item <index>``), else JSONL."""
    if _first_char(source.path) != "[":
        yield from _read_jsonl(source)
        return
    content = _read_utf8(source.path)
    try:
        items = json.loads(content)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno})", source=source.path, line=exc.lineno) from None
    for index, item in enumerate(items):
        yield item, f"item {index}"


def _read_csv(source: DataSource) -> Iterable[tuple[dict, int]]:
    delimiter = "\t" if source.path.lower().endswith(".tsv") else ","
    try:
        handle = open(source.path, encoding="utf-8-sig", newline="")  # a BOM would rename the first column
    except FileNotFoundError:
        raise DataError("file not found", source=source.path) from None
    with handle:
        try:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                if None in row:
                    raise DataError("row has more columns than the header", source=source.path, line=reader.line_num)
                yield row, reader.line_num
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", source=source.path) from None
        except csv.Error as exc:
            raise DataError(f"malformed CSV ({exc})", source=source.path) from None


def _read_text(source: DataSource) -> Iterable[tuple[dict, int]]:
    content = _read_utf8(source.path)
    if source.text_unit == "line":
        for line_no, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                yield {source.text_field: line}, line_no
    else:
        line_no, start, buffer = 1, 1, []
        for line_no, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                if not buffer:
                    start = line_no
                buffer.append(line)
            elif buffer:
                yield {source.text_field: "\n".join(buffer)}, start
                buffer = []
        if buffer:
            yield {source.text_field: "\n".join(buffer)}, start


def _read_hf(source: DataSource) -> Iterable[tuple[dict, Location]]:
    import datasets  # heavy (pyarrow, ...): imported only when a source is a `datasets` dataset

    path = Path(source.path)
    try:
        if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[source.split]
        else:
            loaded = datasets.load_dataset(source.path, source.hf_config, split=source.split)
    except FileNotFoundError as exc:
        raise DataError(f"dataset not found ({exc})", source=source.path) from None
    except (ConnectionError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (the Hub is offline here: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set; use a local path)" if offline else ""
        raise DataError(f"could not load the dataset{hint}: {exc}", source=source.path) from None
    for row_no, row in enumerate(loaded):
        yield dict(row), f"row {row_no}"


def _read_generated(source: DataSource) -> Iterable[tuple[dict, str]]:
    """A corpus the project generates (:func:`untrac_pl.data.generators.generate`); rows named ``record <index>``."""
    for index, record in enumerate(generate(source.generator, source.split, source.seed, **source.options)):
        yield record, f"record {index}"


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "text": _read_text, "hf": _read_hf,
            "generated": _read_generated}


def as_source(source: DataSource | dict | str) -> DataSource:
    """A :class:`DataSource` from a path, a dict of its fields or a source."""
    if isinstance(source, str):
        return DataSource(path=source)
    if isinstance(source, dict):
        return DataSource(**source)
    return source


def iter_records(source: DataSource | dict | str) -> Iterator[Record]:
    """The validated records of one source, one at a time; raise :class:`DataError` on the first problem
    (also when the source has none)."""
    source = as_source(source)
    fmt = _infer_format(source)
    count = 0
    for position, (raw, line) in enumerate(_READERS[fmt](source)):
        if source.limit is not None and count >= source.limit:
            break
        count += 1
        yield _make_record(raw, source, position, line)
    if not count:
        empty = "the generator made none: check its options" if fmt == "generated" else "the file is empty"
        raise DataError(f"no records ({empty})", source=source.label)


def read_records(source: DataSource | dict | str) -> list[dict]:
    """Read and validate all records of one source; raise :class:`DataError` on the first problem."""
    return list(iter_records(source))


def records_from_list(items: Iterable[Any], name: str = "<list>", group: Optional[str] = None) -> list[dict]:
    """Records from an in-memory list of strings or dicts (same validation as the file readers)."""
    source = DataSource(path=name, group=group)
    records = []
    for position, item in enumerate(items):
        raw = {"text": item} if isinstance(item, str) else item
        records.append(_make_record(raw, source, position, position + 1))
    if not records:
        raise DataError("no records (the list is empty)", source=name)
    return records


def check_unique_ids(records: list[dict], what: str) -> None:
    """Raise :class:`DataError` on the first repeated id, naming both records and, where known
    (records from :func:`read_records`/:func:`records_from_list`), the file and line or row of each."""
    seen: dict[str, int] = {}
    for position, record in enumerate(records):
        if record["id"] in seen:
            first = seen[record["id"]]
            origins = [getattr(records[first], "origin", None), getattr(record, "origin", None)]
            located = ""
            if any(origins):
                first_at, again_at = (o or "unknown location" for o in origins)
                located = f" (first at {first_at}; again at {again_at})"
            raise DataError(
                f"duplicate id '{record['id']}' (records {first} and {position}); ids must be unique{located}",
                source=what,
                field="id",
            )
        seen[record["id"]] = position
