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

A restore puts back the TCON and marker frames as they were stored (encoding and
raw text: ``(17)`` stays ``(17)``), the ID3v1 tag byte for byte, and removes an
ID3v2 tag this tool created when nothing else was added to it since.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mutagen.aiff
import mutagen.id3
import mutagen.wave
from mutagen.aiff import AIFF
from mutagen.id3 import TCON, TXXX, Encoding, ID3v1SaveOptions
from mutagen.mp3 import MP3
from mutagen.wave import WAVE

from tagger.tags.base import MARKER_NAME, Snapshot

_MARKER_KEY = f"TXXX:{MARKER_NAME}"
#: Version given to files whose tag we create or cannot keep (v2.2, ID3v1 only).
NEW_TAG_VERSION = 4


def _v1_block(path: str) -> bytes | None:
    """The 128-byte ID3v1 tag at the end of the file, if there is one."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) < 128:
            return None
        f.seek(-128, os.SEEK_END)
        data = f.read(128)
    return data if data[:3] == b"TAG" else None


def _frames(tags: Any, key: str) -> list[list[Any]]:
    return [[int(frame.encoding), [str(t) for t in frame.text]] for frame in tags.getall(key)]


class ID3Handler:
    """TCON for the genre, ``TXXX:TAGGER_GENRE`` for the marker."""

    FAMILY = "id3"

    def __init__(self, file: Any, *, id3v1: bool, delete_v2: Callable[[str], None]) -> None:
        self._file = file
        self._id3v1 = id3v1
        self._delete_v2 = delete_v2
        tags = file.tags
        # An ID3v2 tag is in the file (not just frames mutagen made from an ID3v1 tag).
        self.had_v2 = tags is not None and tags.version >= (2, 2, 0)
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

    def _others(self) -> list[str]:
        """Every frame but the genre and the marker, as text that compares exactly."""
        tags = self._file.tags
        return sorted(repr(f) for k, f in tags.items() if k != "TCON" and k != _MARKER_KEY) if tags is not None else []

    def snapshot(self) -> Snapshot:
        tags = self._file.tags
        v1 = _v1_block(self._file.filename) if self._id3v1 else None
        snap: Snapshot = {
            "format": self.FAMILY,
            "block": self.had_v2,
            "TCON": _frames(tags, "TCON") if self.had_v2 else [],
            "marker": _frames(tags, _MARKER_KEY) if self.had_v2 else [],
            "v1": base64.b64encode(v1).decode("ascii") if v1 else None,
        }
        if not self.had_v2:
            # Frames mutagen read from an ID3v1 tag: a v2 tag holding just these was ours.
            snap["v1_frames"] = self._others()
        return snap

    def restore(self, snapshot: Snapshot) -> None:
        if self._file.tags is None:
            self._file.add_tags()
        tags = self._file.tags
        tags.delall("TCON")
        tags.delall(_MARKER_KEY)
        for encoding, text in snapshot["TCON"]:
            tags.add(TCON(encoding=Encoding(encoding), text=text))
        for encoding, text in snapshot["marker"]:
            tags.add(TXXX(encoding=Encoding(encoding), desc=MARKER_NAME, text=text))
        path = self._file.filename
        if not snapshot["block"] and self._others() == snapshot.get("v1_frames", []):
            self._delete_v2(path)  # the ID3v2 tag this tool created; nothing else was added to it
        else:
            self.save()
        if snapshot["v1"]:
            self._put_v1(path, base64.b64decode(snapshot["v1"]))

    @staticmethod
    def _put_v1(path: str, block: bytes) -> None:
        """The ID3v1 tag exactly as it was (a save regenerates it from the v2 frames)."""
        with open(path, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            if _v1_block(path) is not None:
                f.seek(end - 128)
            f.write(block)


def _delete_mp3_v2(path: str) -> None:
    mutagen.id3.delete(path, delete_v1=False, delete_v2=True)


def open_mp3(path: Path) -> ID3Handler:
    """MPEG audio with an ID3v2 tag at the front (and maybe ID3v1 at the end)."""
    return ID3Handler(MP3(path, translate=False), id3v1=True, delete_v2=_delete_mp3_v2)


def open_aiff(path: Path) -> ID3Handler:
    """AIFF/AIFC: the tag lives in an ``ID3 `` chunk."""
    return ID3Handler(AIFF(path, translate=False), id3v1=False, delete_v2=mutagen.aiff.delete)


def open_wave(path: Path) -> ID3Handler:
    """WAV: the tag lives in an ``id3 `` chunk; RIFF INFO is left untouched."""
    return ID3Handler(WAVE(path, translate=False), id3v1=False, delete_v2=mutagen.wave.delete)
