"""ID3v2 genres for MP3, AIFF and WAV (the last two keep their tag in an ``ID3 `` chunk).

The tag keeps the ID3 version it had: v2.3 files are saved as v2.3 and v2.4 as
v2.4, loaded *untranslated* so nothing else in the tag is converted (mutagen's
v2.3 translation would, for instance, drop the common off-spec TSOP/TSOA
frames). Files with no ID3v2 tag, or an old v2.2 / ID3v1-only one, get v2.4
(mutagen's and beets' default).

Several genres are several TCON values in v2.4. v2.3 has no multi-value text,
so they are joined with the caller's separator (not mutagen's ``/``, which
collides with genres such as "Drum/Bass") and split on it again when read.
An existing ID3v1 tag is updated, never added or removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mutagen.aiff import AIFF
from mutagen.id3 import TCON, TXXX, Encoding, ID3v1SaveOptions
from mutagen.mp3 import MP3
from mutagen.wave import WAVE

from tagger.tags.base import MARKER_NAME

_MARKER_KEY = f"TXXX:{MARKER_NAME}"
#: Version given to files whose tag we create or cannot keep (v2.2, ID3v1 only).
NEW_TAG_VERSION = 4


class ID3Handler:
    """TCON for the genre, ``TXXX:TAGGER_GENRE`` for the marker."""

    def __init__(self, file: Any, *, id3v1: bool) -> None:
        self._file = file
        self._id3v1 = id3v1
        tags = file.tags
        if tags is not None and tuple(tags.version[:2]) in ((2, 3), (2, 4)):
            self.version = tags.version[1]
        else:
            if tags is not None:
                # What translate=True would have done on load: v2.2/v1 frames -> v2.4.
                tags.update_to_v24()
            self.version = NEW_TAG_VERSION

    def genres(self, separator: str) -> list[str]:
        tags = self._file.tags
        frame = tags.get("TCON") if tags is not None else None
        if frame is None:
            return []
        values = list(frame.genres)
        if self.version == 3 and separator:
            values = [part for value in values for part in value.split(separator)]
        return [v.strip() for v in values if v.strip()]

    def marker(self) -> str | None:
        tags = self._file.tags
        frame = tags.get(_MARKER_KEY) if tags is not None else None
        return str(frame.text[0]) if frame is not None and frame.text else None

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        if self._file.tags is None:
            self._file.add_tags()
        tags = self._file.tags
        tags.delall("TCON")
        if genres:
            # A leading "(" would be read as an ID3v1 genre reference; "((" escapes it.
            values = ["(" + g if g.startswith("(") else g for g in genres]
            text = values if self.version == 4 else [separator.join(values)]
            tags.add(TCON(encoding=Encoding.UTF8, text=text))
        tags.delall(_MARKER_KEY)
        if marker is not None:
            tags.add(TXXX(encoding=Encoding.UTF8, desc=MARKER_NAME, text=[marker]))

    def save(self) -> None:
        # UTF-8 frames become UTF-16 in v2.3 (mutagen does that on save);
        # v23_sep=None keeps other frames' multiple values as they were.
        kwargs: dict[str, Any] = {"v2_version": self.version, "v23_sep": None}
        if self._id3v1:  # only MP3 can carry an ID3v1 tag
            kwargs["v1"] = ID3v1SaveOptions.UPDATE
        self._file.save(**kwargs)


def open_mp3(path: Path) -> ID3Handler:
    """MPEG audio with an ID3v2 tag at the front (and maybe ID3v1 at the end)."""
    return ID3Handler(MP3(path, translate=False), id3v1=True)


def open_aiff(path: Path) -> ID3Handler:
    """AIFF/AIFC: the tag lives in an ``ID3 `` chunk."""
    return ID3Handler(AIFF(path, translate=False), id3v1=False)


def open_wave(path: Path) -> ID3Handler:
    """WAV: the tag lives in an ``id3 `` chunk; RIFF INFO is left untouched."""
    return ID3Handler(WAVE(path, translate=False), id3v1=False)
