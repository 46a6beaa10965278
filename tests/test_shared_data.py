"""The readers on the real data in ../shared/data (skipped with a reason where it is absent)."""
from __future__ import annotations

from untrac_pl.data.records import DataSource, read_records


def test_real_test_sets_and_corpora_read_with_their_groups(shared_data):
    toxigen = read_records(str(shared_data / "tests" / "toxigen.jsonl"))
    winobias = read_records(str(shared_data / "tests" / "winobias.jsonl"))
    truthfulqa = read_records(str(shared_data / "tests" / "truthfulqa.jsonl"))
    assert len({r["group"] for r in toxigen}) == 13
    assert {r["group"] for r in winobias} == {"pro_female", "pro_male", "anti_female", "anti_male"}
    assert len({r["group"] for r in truthfulqa}) == 9 and all("completion" in r for r in truthfulqa)
    corpora = sorted((shared_data / "corpora").glob("*.jsonl"))
    assert len(corpora) == 8
    books = read_records(DataSource(path=str(corpora[0]), limit=5))
    assert len(books) == 5 and books[0]["group"] == corpora[0].stem
