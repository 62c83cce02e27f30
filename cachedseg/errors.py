"""The one exception type the CLI turns into a clean, one-line message."""

from __future__ import annotations

import re


class CachedsegError(Exception):
    """A user-facing error: the message says what is wrong and what to do next."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """A library exception's message for a one-line error: the first sentence of its first line with content (not
    a heading that ends in a colon), else its type name; shortened to `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.rstrip().endswith(":")]
    text = lines[0].split(". ")[0] if lines else type(exc).__name__  # the first sentence: the rest is advice
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def load_failure(exc: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in a few words (torch's own message leads with advice)."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if refused:
        return f"it holds Python objects other than tensors ({refused.group(1)}), which a safe load refuses"
    if "Weights only load failed" in str(exc):
        return "it holds data other than tensors and plain containers, which a safe load refuses"
    return first_line(exc)
