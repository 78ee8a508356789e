"""Small helpers for the words of log lines and messages."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str = "") -> str:
    """'1 request', '2 requests', '0 requests' ("1 sequences" read as a slip in every log)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
