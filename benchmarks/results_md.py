"""What the benchmarks share about their results: the machine they were measured on, and appending the figures to
a Markdown file in benchmarks/results/ (only when asked with --results)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(device=None) -> str:
    """The machine the figures come from: the GPU's name for a cuda `device`, else the CPU's cores and architecture."""
    if device is not None and device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def append(path: Path, intro: str, lines: list[str]) -> None:
    """Append `lines` to the Markdown file `path`, creating it with `intro` (its heading and a sentence) first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(intro.rstrip() + "\n")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")
