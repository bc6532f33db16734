"""Small helpers for the words of messages."""

from __future__ import annotations


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 modality', '3 modalities', '0 modalities'."""
    return f"{n} {one if n == 1 else (many or one + 's')}"
