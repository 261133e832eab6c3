"""Vorbis comments: FLAC, Ogg Vorbis, Ogg Opus (and FLAC in Ogg).

Vorbis comments allow a field to repeat, so several genres are several
``GENRE`` comments; the marker is a ``TAGGER_GENRE`` comment. Pictures
(FLAC picture blocks, ``METADATA_BLOCK_PICTURE``) are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mutagen
from mutagen.flac import FLAC
from mutagen.oggflac import OggFLAC
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis

from tagger.tags.base import MARKER_NAME


class VorbisHandler:
    """``GENRE`` (repeated) for the genre, ``TAGGER_GENRE`` for the marker."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def _get(self, key: str) -> list[str]:
        tags = self._file.tags
        if tags is None or key not in tags:
            return []
        return [str(v) for v in tags[key]]

    def genres(self, separator: str) -> list[str]:
        return [v.strip() for v in self._get("GENRE") if v.strip()]

    def marker(self) -> str | None:
        values = self._get(MARKER_NAME)
        return values[0] if values else None

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        if self._file.tags is None:  # FLAC without a comment block
            self._file.add_tags()
        tags = self._file.tags
        for key, value in (("GENRE", list(genres)), (MARKER_NAME, [marker] if marker else [])):
            if value:
                tags[key] = value  # replaces every case variant of the key
            elif key in tags:
                del tags[key]

    def save(self) -> None:
        self._file.save()


def open_flac(path: Path) -> VorbisHandler:
    """Native FLAC (an ID3 tag some tools prepend is kept as it is)."""
    return VorbisHandler(FLAC(path))


def open_opus(path: Path) -> VorbisHandler:
    return VorbisHandler(OggOpus(path))


def open_ogg(path: Path) -> VorbisHandler:
    """``.ogg``/``.oga`` may hold Vorbis, Opus or FLAC; the stream header decides."""
    file = mutagen.File(path, options=[OggVorbis, OggOpus, OggFLAC])
    if file is None:
        raise mutagen.MutagenError("not an Ogg Vorbis, Opus or FLAC stream")
    return VorbisHandler(file)
