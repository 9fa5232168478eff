"""The ``writing "..."`` phrase of a caption: which texts a row asks to be written (read by the row checker when a
row has boxes but no ``texts``; written by the captioners)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_QUOTED = r'"[^"]*"|“[^”]*”'
_WRITING = re.compile(rf"writing\s*((?:(?:{_QUOTED})\s*(?:(?:,|，|、|and|&|和)\s*)?)+)", re.IGNORECASE)


def texts_from_caption(caption: str | None, box_count: int | None = None) -> list[str]:
    """The strings a caption asks to be written (the reverse of :func:`writing_phrase`): ``writing "前往"`` -> ``["前往"]``.

    Several are allowed, in order: ``writing "a", writing "b"`` or ``writing "a" and "b"`` or ``writing "a" "b"``.
    Straight and curly double quotes both work; empty quotes are ignored.

    caption.py writes all of a row's texts in one quoted string joined by spaces (``writing "前往 搜索"``).
    With ``box_count`` (the row's number of boxes), when the quoted strings are not one per box but their
    space-separated words are, the words are returned: ``("writing \"前往 搜索\"", 2)`` -> ``["前往", "搜索"]``.
    """
    quoted = [inner for match in _WRITING.finditer(caption or "") for inner in _quoted_texts(match.group(1))]
    if box_count is not None and len(quoted) != box_count:
        words = [word for text in quoted for word in text.split()]
        if len(words) == box_count:
            return words
    return quoted


def _quoted_texts(phrase: str) -> list[str]:
    inner = (quoted[1:-1].strip() for quoted in re.findall(_QUOTED, phrase))
    return [text for text in inner if text]


def writing_phrase(texts: Sequence[str]) -> str:
    """``writing "前往 搜索"``: every text of the row, joined by a space; empty when there is none."""
    words = [str(text).strip() for text in texts if str(text).strip()]
    return f'writing "{" ".join(words)}"' if words else ""
