"""MP4/M4A (AAC or ALAC): ``©gen`` atoms, marker as a freeform atom.

``©gen`` takes several values. The old numeric ``gnre`` atom (an ID3v1 genre
index) is read when there is no ``©gen`` and dropped when we write, so a file
never holds two disagreeing genres. Cover art (``covr``) is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mutagen._constants import GENRES
from mutagen.mp4 import MP4, AtomDataType, MP4FreeForm

from tagger.tags.base import MARKER_NAME

MARKER_KEY = f"----:org.tagger:{MARKER_NAME}"


class MP4Handler:
    """``©gen`` for the genre, ``----:org.tagger:TAGGER_GENRE`` for the marker."""

    def __init__(self, file: MP4) -> None:
        self._file = file

    def genres(self, separator: str) -> list[str]:
        tags = self._file.tags
        if tags is None:
            return []
        if "©gen" in tags:
            return [str(v).strip() for v in tags["©gen"] if str(v).strip()]
        # gnre holds ID3v1 index + 1.
        return [GENRES[n - 1] for n in tags.get("gnre", []) if 0 < n <= len(GENRES)]

    def marker(self) -> str | None:
        tags = self._file.tags
        values = tags.get(MARKER_KEY) if tags is not None else None
        return bytes(values[0]).decode("utf-8", "replace") if values else None

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        if self._file.tags is None:
            self._file.add_tags()
        tags = self._file.tags
        tags.pop("gnre", None)
        if genres:
            tags["©gen"] = list(genres)
        else:
            tags.pop("©gen", None)
        if marker is not None:
            tags[MARKER_KEY] = [MP4FreeForm(marker.encode("utf-8"), dataformat=AtomDataType.UTF8)]
        else:
            tags.pop(MARKER_KEY, None)

    def save(self) -> None:
        self._file.save()


def open_mp4(path: Path) -> MP4Handler:
    return MP4Handler(MP4(path))
