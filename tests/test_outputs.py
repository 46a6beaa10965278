"""What a run's files look like to a person: modes follow the umask, the group table has one group
order for rows and columns with each row's maximum marked, and the group heat map is a sane PNG."""
from __future__ import annotations

import csv
import io
import os
import stat

import pytest
import torch

from untrac_pl.callbacks.rankings import RankingWriter, aligned_groups
from untrac_pl.figures import group_heatmap, row_maxima
from untrac_pl.io import (
    save_figure_atomic,
    save_safetensors_atomic,
    write_json_atomic,
    write_text_atomic,
)
from untrac_pl.scores import ScoreTable


@pytest.fixture
def umask():
    """Set the process umask for the test; restored afterwards."""
    previous = []

    def set_mask(mask: int) -> int:
        previous.append(os.umask(mask))
        return mask

    yield set_mask
    if previous:
        os.umask(previous[0])


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_every_atomic_writer_gives_the_mode_a_plain_open_would(tmp_path, umask, mask, expected):
    """mkstemp creates 0600 files; the atomic writers give them the umask's mode before the rename
    (0644 under 022), like the PNGs and TensorBoard event files of the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    umask(mask)
    fig = plt.figure(figsize=(1, 1))
    written = [
        write_text_atomic(tmp_path / "a.md", "x\n"),
        write_json_atomic(tmp_path / "b.json", {"a": 1}),
        save_safetensors_atomic(tmp_path / "c.safetensors", {"t": torch.zeros(2)}, {"k": "v"}),
        save_figure_atomic(tmp_path / "d.png", fig),
    ]
    plt.close(fig)
    with open(tmp_path / "plain", "w") as handle:
        handle.write("x")
    assert _mode(tmp_path / "plain") == expected
    for path in written:
        assert _mode(path) == expected, f"{path.name}: {oct(_mode(path))}"
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def _group_table() -> ScoreTable:
    """Query groups insults/cooking/animals/sports/extra vs training groups animals/cooking/sports/insults:
    the first-seen query order puts the shared groups off the diagonal."""
    rows = ["insults", "cooking", "animals", "sports", "extra"]
    cols = ["animals", "cooking", "sports", "insults"]
    scores = torch.tensor([
        [0.1, 0.2, 0.3, 0.9],   # insults: max on insults
        [0.1, 0.8, 0.3, 0.2],   # cooking
        [0.7, 0.2, 0.3, 0.2],   # animals
        [0.1, 0.2, 0.6, 0.6],   # sports: a tie, both marked
        [0.5, float("nan"), 0.1, 0.1],  # a group not among the training groups; a failed cell
    ])
    return ScoreTable(scores, rows, rows, cols, cols, "group", "group", "untrac")


def test_group_tables_use_one_order_and_mark_row_maxima():
    table = _group_table()
    aligned = aligned_groups(table)
    assert aligned.row_ids == ["animals", "cooking", "sports", "insults", "extra"]  # column order, then the others
    assert aligned.col_ids == table.col_ids
    assert aligned.scores[0].tolist() == pytest.approx([0.7, 0.2, 0.3, 0.2])
    assert row_maxima(aligned.scores.tolist()) == [{0}, {1}, {2, 3}, {3}, {0}]

    csv_text, md_text = RankingWriter.group_tables(table)
    rows = list(csv.reader(io.StringIO(csv_text)))
    assert rows[0] == ["query_group", "animals", "cooking", "sports", "insults"]
    assert [r[0] for r in rows[1:]] == ["animals", "cooking", "sports", "insults", "extra"]
    assert "**" not in csv_text  # the csv stays plain numbers
    lines = [line for line in md_text.splitlines() if line.startswith("| ") and not line.startswith("| query group")]
    assert [line.split("|")[1].strip() for line in lines] == ["animals", "cooking", "sports", "insults", "extra"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines}
    assert cells["animals"] == ["**0.7**", "0.2", "0.3", "0.2"]
    assert cells["sports"] == ["0.1", "0.2", "**0.6**", "**0.6**"]
    assert cells["extra"] == ["**0.5**", "nan", "0.1", "0.1"]
    # the shared groups sit on the diagonal
    for i, name in enumerate(["animals", "cooking", "sports", "insults"]):
        assert rows[0][1 + i] == name and rows[1 + i][0] == name


def test_group_tables_leave_an_already_aligned_or_disjoint_table_alone():
    table = _group_table()
    disjoint = ScoreTable(table.scores, ["q1", "q2", "q3", "q4", "q5"], ["q1", "q2", "q3", "q4", "q5"], table.col_ids, table.col_groups, "group", "group", "m")
    assert aligned_groups(disjoint) is disjoint
    aligned = aligned_groups(table)
    assert aligned_groups(aligned) is aligned


def test_group_heatmap_is_a_sane_png(tmp_path, umask):
    from PIL import Image

    umask(0o022)
    path = group_heatmap(aligned_groups(_group_table()), tmp_path / "group_scores.png", title="UnTrac: query group × training group")
    assert _mode(path) == 0o644
    width, height = Image.open(path).size
    assert 400 <= width <= 2000 and 300 <= height <= 2000, (width, height)
    # many groups: still a bounded figure
    rows = [f"query group {i}" for i in range(120)]
    cols = [f"train group {i}" for i in range(30)]
    big = ScoreTable(torch.randn(120, 30, generator=torch.Generator().manual_seed(0)), rows, rows, cols, cols, "group", "group", "m")
    width, height = Image.open(group_heatmap(big, tmp_path / "big.png")).size
    assert width <= 24 * 110 and height <= 30 * 110
