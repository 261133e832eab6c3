"""ASF (WMA): repeated ``WM/Genre`` attributes, marker as ``TAGGER/Genre``.

Mutagen puts the first value in the extended content description and the
others in the metadata library object, the layout Windows Media Player
uses for multiple genres. ``WM/Picture`` and every other attribute are left
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mutagen.asf import ASF, ASFUnicodeAttribute

GENRE_KEY = "WM/Genre"
MARKER_KEY = "TAGGER/Genre"


class ASFHandler:
    """``WM/Genre`` (repeated) for the genre, ``TAGGER/Genre`` for the marker."""

    def __init__(self, file: ASF) -> None:
        self._file = file

    def _get(self, key: str) -> list[str]:
        tags = self._file.tags
        if tags is None or key not in tags:
            return []
        return [str(v) for v in tags[key]]

    def genres(self, separator: str) -> list[str]:
        return [v.strip() for v in self._get(GENRE_KEY) if v.strip()]

    def marker(self) -> str | None:
        values = self._get(MARKER_KEY)
        return values[0] if values else None

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        if self._file.tags is None:
            self._file.add_tags()
        tags = self._file.tags
        for key, values in ((GENRE_KEY, list(genres)), (MARKER_KEY, [marker] if marker else [])):
            if values:
                tags[key] = [ASFUnicodeAttribute(v) for v in values]
            elif key in tags:
                del tags[key]

    def save(self) -> None:
        self._file.save()


def open_asf(path: Path) -> ASFHandler:
    return ASFHandler(ASF(path))
