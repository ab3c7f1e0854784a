"""Turn foreign exceptions into the short reasons our one-line errors carry."""

from __future__ import annotations


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (or its type name), cut to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
