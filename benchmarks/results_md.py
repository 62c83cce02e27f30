"""Appending a benchmark's figures to its Markdown file in benchmarks/results/ (only when asked with --results)."""

from __future__ import annotations

from pathlib import Path


def append(path: Path, intro: str, lines: list[str]) -> None:
    """Append `lines` to the Markdown file `path`, creating it with `intro` (its heading and a sentence) first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(intro.rstrip() + "\n")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")
