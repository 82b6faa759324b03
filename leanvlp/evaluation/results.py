"""Results into the model folder's eval_results.json (one entry per task, dataset, split) and onto the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..model_card import parse_eval_results


def update_eval_results(model_dir: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Add `entry` to eval_results.json, replacing the entry with the same task, dataset, split and kind; an entry
    on another slice of the same split (`held-out[:100]` vs `held-out[:8]`) stays beside it, and a line says so:
    a quick small run never silently replaces a larger one."""
    path = Path(model_dir) / "eval_results.json"
    entries = parse_eval_results(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else []

    def key(e: dict[str, Any], whole_split: bool = False) -> tuple:
        split = str(e.get("split")).split("[")[0] if whole_split else e.get("split")
        return e["task"], e["dataset"], split, e.get("kind")

    for e in entries:
        if key(e, True) == key(entry, True) and key(e) != key(entry):
            print(f"note: {path.name} keeps the {e['task']} entry on split {e.get('split')} beside this one on "
                  f"{entry.get('split')}; each is its own model-index entry")
    entries = [e for e in entries if key(e) != key(entry)] + [entry]
    parse_eval_results({"results": entries})  # never write a file the card cannot read
    path.write_text(json.dumps({"results": entries}, indent=2, ensure_ascii=False), encoding="utf-8")
    return entries


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned plain-text table."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [columns] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def print_entry(entry: dict[str, Any]) -> None:
    """One eval_results.json entry as a titled plain-text report."""
    where = entry.get("dataset_name", entry["dataset"])
    title = f"{entry['task']}{' sweep' if entry.get('kind') else ''} on {where} ({entry['split']})"
    print("\n" + title + "\n" + "=" * len(title))
    if "method" in entry:
        print(f"retrieval score: {entry['method']}; {entry['num_images']} images x {entry['num_texts']} captions")
    if entry.get("metrics"):
        print(format_table([{"metric": k, "value": v} for k, v in entry["metrics"].items()]))
    if entry.get("rows"):
        print(format_table(entry["rows"]))
    if "memory_measure" in entry:
        print(f"peak memory: {entry['memory_measure']}")
    if "example" in entry:
        print(f"example: {entry['example']!r}")
    for line in entry.get("warnings") or []:
        print(f"warning: {line}")
