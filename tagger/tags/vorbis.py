"""Vorbis comments: FLAC, Ogg Vorbis, Ogg Opus (and FLAC in Ogg).

Vorbis comments allow a field to repeat, so several genres are several
``GENRE`` comments; the marker is a ``TAGGER_GENRE`` comment. Pictures
(FLAC picture blocks, ``METADATA_BLOCK_PICTURE``) are never touched.
"""

from __future__ import annotations

from pathlib import Path

import mutagen
from mutagen.flac import FLAC
from mutagen.oggflac import OggFLAC
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis

from tagger.tags.base import MARKER_NAME, MultiValueHandler


class VorbisHandler(MultiValueHandler):
    """``GENRE`` (repeated) for the genre, ``TAGGER_GENRE`` for the marker."""

    FAMILY = "vorbis"
    GENRE_KEY = "GENRE"
    MARKER_KEY = MARKER_NAME

    def _drop_block(self) -> None:
        # Only native FLAC may lack a comment block (Ogg streams always carry one).
        if isinstance(self._file, FLAC):
            self._file.metadata_blocks.remove(self._file.tags)
            self._file.tags = None


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
