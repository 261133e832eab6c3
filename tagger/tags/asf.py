"""ASF (WMA): repeated ``WM/Genre`` attributes, marker as ``TAGGER/Genre``.

Mutagen puts the first value in the extended content description and the
others in the metadata library object, the layout Windows Media Player
uses for multiple genres. ``WM/Picture`` and every other attribute are left
alone.
"""

from __future__ import annotations

from pathlib import Path

from mutagen.asf import ASF, ASFUnicodeAttribute

from tagger.tags.base import MultiValueHandler

GENRE_KEY = "WM/Genre"
MARKER_KEY = "TAGGER/Genre"


class ASFHandler(MultiValueHandler):
    """``WM/Genre`` (repeated) for the genre, ``TAGGER/Genre`` for the marker."""

    GENRE_KEY = GENRE_KEY
    MARKER_KEY = MARKER_KEY

    def _wrap(self, value: str) -> ASFUnicodeAttribute:
        return ASFUnicodeAttribute(value)


def open_asf(path: Path) -> ASFHandler:
    return ASFHandler(ASF(path))
