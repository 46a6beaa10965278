"""What a command prints when it ends (stdout): what was found and where it is.

``attribute``: the run in one line, "resumed k of N targets" after a resume, the failed targets, the top
training groups of each query group (a small table), the top training examples of the first few
queries (with their texts, from ``rankings.json``), the files written and the TensorBoard command.
``fit``: the files and the TensorBoard command (:func:`files_block`, :func:`tensorboard_line`).
``reproduce``: each method's mean Pearson per setting and test set, the files and the TensorBoard command
(:func:`reproduce_report`). ``toxicity``: the top influences and the top group of the first test cases and
the file written (:func:`toxicity_report`).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

from untrac_pl import outputs
from untrac_pl.callbacks.rankings import aligned_groups
from untrac_pl.evaluation.report import display

__all__ = ["attribution_report", "files_block", "reproduce_report", "tensorboard_line", "toxicity_report"]

#: run files -> what they hold (the order of the listing)
DESCRIPTIONS = {
    outputs.SCORES: "the score matrix (untrac_pl.ScoreTable.load)",
    outputs.RANKINGS: "top-k training units per query and per query group, with texts",
    outputs.GROUP_SCORES_CSV: "query group x training group mean scores",
    outputs.GROUP_SCORES_MD: "the same table in Markdown",
    outputs.GROUP_HEATMAP: "the same table as a heat map",
    outputs.BASELINE_GROUP_SCORES: "the baseline's own group-level scores",
    outputs.SUMMARY: "settings, timings, failed and resumed targets",
    outputs.MEMORY: "peak memory per phase",
    outputs.CONFIG: "the resolved config (-c it to run again)",
    outputs.MANIFEST: "provenance (config hash, versions)",
    outputs.TENSORBOARD: "TensorBoard logs",
}
FIT_DESCRIPTIONS = {
    "model": "the trained model and tokenizer (save_pretrained: --model.model.name_or_path)",
    "checkpoints": "intermediate weights with their lr (TracIn's attribution.baseline.checkpoints)",
    "final": "the final weights with the lr of the last step",
    "fit_summary.json": "steps, losses per group, timings",
    "config.yaml": "the resolved config",
    "tensorboard": "TensorBoard logs",
}
TOP_GROUPS = 3  # training groups per query group
TOP_EXAMPLES = 3  # training examples per query
FIRST_QUERIES = 3  # queries shown
TEXT_CHARS = 60


def _score(value: float) -> str:
    return f"{value:+.3g}"


def _snippet(text: Optional[str], chars: int = TEXT_CHARS) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return json.dumps(text if len(text) <= chars else text[: chars - 1] + "…", ensure_ascii=False)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def tensorboard_line(output_dir: Path) -> Optional[str]:
    """``TensorBoard: tensorboard --logdir <dir>`` when the run wrote event files (``None`` otherwise)."""
    output_dir = Path(output_dir)
    events = sorted(output_dir.rglob("events.out.tfevents*"))
    if not events:
        return None
    board = output_dir / outputs.TENSORBOARD
    logdir = board if board.is_dir() and any(board in e.parents for e in events) else output_dir
    return f"TensorBoard: tensorboard --logdir {shlex.quote(str(logdir))}"


def files_block(output_dir: Path, descriptions: dict) -> list[str]:
    """``files in <dir>:`` and one line per entry (known names first, in ``descriptions``' order)."""
    output_dir = Path(output_dir)
    present = {p.name: p for p in output_dir.iterdir()} if output_dir.is_dir() else {}
    names = [n for n in descriptions if n in present] + sorted(n for n in present if n not in descriptions)
    if not names:
        return []
    rows = [[n + ("/" if present[n].is_dir() else ""), descriptions.get(n, "")] for n in names]
    return [f"files in {output_dir}/:", *_table(rows)]


def _group_block(table) -> list[str]:
    group = aligned_groups(table.group_level())  # group_scores.md's and the heat map's row order
    if not group.row_ids or not group.col_ids:
        return []
    top = group.top_k(TOP_GROUPS)
    if not any(top.values()):
        return ["top training groups per query group: none (no finite scores)"]
    n = min(TOP_GROUPS, len(group.col_ids))
    header = ["query group", *[("1st", "2nd", "3rd")[i] for i in range(n)]]
    rows = [header] + [[row, *[f"{col} {_score(v)}" for col, v in top[row]]] + ["-"] * (n - len(top[row])) for row in group.row_ids]
    return ["top training groups per query group (mean score; positive = helped produce the query):", *_table(rows)]


def _examples_block(table, rankings: Optional[dict]) -> list[str]:
    rows_word = "query groups" if table.row_unit == "group" else "queries"
    cols_word = "training groups" if table.col_unit == "group" else "training examples"
    shown = table.row_ids[:FIRST_QUERIES]
    if not shown:
        return []
    entries = {q.get("query_id"): q for q in (rankings or {}).get("queries", [])}
    texts = {}
    for q in entries.values():
        for item in q.get("top", []):
            texts.setdefault(item.get("id"), item.get("text"))
    top = table.top_k(TOP_EXAMPLES)
    which = f"the first {len(shown)} of {len(table.row_ids)} {rows_word}" if len(table.row_ids) > len(shown) else f"the {rows_word}"
    lines = [f"top {cols_word} of {which}:"]
    for row, row_id in enumerate(shown):
        entry = entries.get(row_id, {})
        group = table.row_groups[row] if table.row_groups and table.row_groups[row] != row_id else None
        lines.append(f"  {row_id}" + (f" ({group})" if group else "") + (f" {_snippet(entry.get('query_text'))}" if entry.get("query_text") else ""))
        if entry.get("failed"):
            lines.append("    (failed: no scores)")
            continue
        ranked = [[f"{rank}.", _score(v), col, _snippet(texts.get(col))] for rank, (col, v) in enumerate(top[row_id], start=1)]
        lines += _table(ranked, indent="    ") if ranked else ["    (no finite scores)"]
    return lines


def attribution_report(result, command: str = "attribute") -> str:
    """The end of ``untrac-pl attribute``: findings, then where they are (see the module docstring)."""
    table, out = result.table, Path(result.output_dir)
    summary = _read_json(out / outputs.SUMMARY) or {}
    rankings = _read_json(out / outputs.RANKINGS)
    total = summary.get("num_targets", result.timings.get("num_targets", len(table.row_ids)))
    rows_word = "query groups" if table.row_unit == "group" else "queries"
    cols_word = "training groups" if table.col_unit == "group" else "training examples"
    lines = [f"untrac-pl {command}: {table.method}, {len(table.row_ids)} {rows_word} x {len(table.col_ids)} {cols_word}, "
             f"{len(result.failed)} failed targets, {result.timings.get('total_s', 0.0):.1f} s"]
    resumed = int(summary.get("resumed_targets") or 0)
    if resumed:
        lines.append(f"resumed {resumed} of {total} targets (finished by the interrupted run); computed {max(0, total - resumed)} now")
    for target, info in list(result.failed.items())[:5]:
        reason = info.get("reason", info) if isinstance(info, dict) else info
        lines.append(f"failed target {target}: {reason}")
    if len(result.failed) > 5:
        lines.append(f"... and {len(result.failed) - 5} more failed targets (summary.json)")
    for block in (_group_block(table), _examples_block(table, rankings), files_block(out, DESCRIPTIONS)):
        if block:
            lines += ["", *block]
    board = tensorboard_line(out)
    if board:
        lines += ["", board]
    return "\n".join(lines)


REPRODUCE_DESCRIPTIONS = {
    "results.md": "the tables (Pearson / Spearman, standardised influence) and figures",
    "metrics.json": "every metric per setting, method and seed",
    "ablation.json": "the optimizer x learning-rate ablation",
    "scores": "the score files, <setting>/seed<k>/<method>.safetensors (untrac_pl.ScoreTable.load)",
}


def _pearson(value: Optional[dict]) -> str:
    mean = (value or {}).get("mean")
    return "n/a" if mean is None else f"{mean:+.3f}"


def reproduce_report(written: dict, log_dir: Optional[str] = None, command: str = "reproduce") -> str:
    """The end of ``untrac-pl reproduce``: mean Pearson per method x setting / test set, the files, TensorBoard."""
    out = Path(written["metrics"]).parent
    metrics = _read_json(Path(written["metrics"])) or {}
    settings, sweep = metrics.get("settings") or {}, metrics.get("sweep") or {}
    configured = [m.get("label") or m.get("name") for m in (metrics.get("config") or {}).get("methods", [])]
    present = list(dict.fromkeys(m for r in settings.values() for m in r.get("methods", {})))
    names = [m for m in dict.fromkeys([*configured, *present]) if m in present and m not in sweep]
    seeds = sorted({len(r.get("seeds", [])) for r in settings.values()})
    head = f"untrac-pl {command}: {metrics.get('name') or out.name}, settings {', '.join(settings) or 'none'}"
    head += f", {'/'.join(map(str, seeds)) or 0} seed(s), {len(names)} method(s)"
    if sweep:
        head += f" (+{len(sweep)} ablation cells)"
    if metrics.get("wall_seconds") is not None:
        head += f", {metrics['wall_seconds']:.1f} s"
    lines = [head]
    columns = [(s, t) for s, r in settings.items()
               for t in dict.fromkeys(t for m in names for t in r.get("methods", {}).get(m, {}).get("test_sets", {}))]
    if names and columns:
        lines += ["mean Pearson with the leave-group-out ground truth (over seeds; per setting and test set):"]
        rows = [["method", *[s if t == "test" else f"{s}/{t}" for s, t in columns]]]
        for m in names:
            rows.append([display(m), *[_pearson(settings[s]["methods"].get(m, {}).get("test_sets", {}).get(t, {}).get("pearson"))
                                       for s, t in columns]])
        lines += _table(rows)
    files = [[n + ("/" if (out / n).is_dir() else ""), d] for n, d in REPRODUCE_DESCRIPTIONS.items() if (out / n).exists()]
    figures = list(written.get("figures") or [])
    if figures:
        shown = ", ".join(figures)
        files.insert(2, [f"{len(figures)} figure(s)", shown if len(shown) <= 80 else ", ".join(figures[:2]) + ", ... (*.png)"])
    if files:
        lines += ["", f"files in {out}/:", *_table(files)]
    board = tensorboard_line(Path(log_dir) if log_dir else out / outputs.TENSORBOARD)
    if board:
        lines += ["", board]
    return "\n".join(lines)


def toxicity_report(results: dict, path: Path, command: str = "toxicity") -> str:
    """The end of ``untrac-pl toxicity``: the top influences and top group of the first test cases, the file."""
    cases = results.get("test_cases", [])
    failed = results.get("failed_targets") or {}
    total = (results.get("timings") or {}).get("total_s", 0.0)
    lines = [f"untrac-pl {command}: {results.get('method', 'untrac_inv')}, {len(cases)} test cases, {len(failed)} failed targets, {total:.1f} s"]
    shown = cases[:FIRST_QUERIES]
    if shown:
        which = f"the first {len(shown)} of {len(cases)} test cases" if len(cases) > len(shown) else "the test cases"
        lines += ["", f"top training examples of {which}:"] + ([f"  ({results['sign']})"] if results.get("sign") else [])
    for case in shown:
        toxicity = case.get("toxicity")
        head = f"  case {case.get('test_case_id')}: {_snippet(case.get('prompt'), 30)} -> {_snippet(case.get('completion'), 30)}"
        if toxicity is not None:
            head += f" (toxicity {toxicity:.2f})"
        groups = case.get("group_scores") or {}
        if groups:
            top_group = max(groups, key=groups.get)
            head += f"; top group {top_group} {_score(groups[top_group])}"
        lines.append(head)
        if case.get("skipped"):
            lines.append(f"    (skipped: {case['skipped']})")
            continue
        ranked = [[f"{item.get('rank', i)}.", _score(item["score"]), str(item.get("group", "")), _snippet(item.get("text"))]
                  for i, item in enumerate(case.get("top_influences", [])[:TOP_EXAMPLES], start=1)]
        lines += _table(ranked, indent="    ") if ranked else ["    (no finite scores)"]
    lines += ["", f"wrote {path} (every test case: completion, toxicity, top-k influences, group scores)"]
    return "\n".join(lines)
