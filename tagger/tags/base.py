"""The small interface every tag-format handler implements.

Handlers deal only in plain strings: the genre values as the format stores
them and the marker's serialised text. Parsing the marker, policies, error
wrapping and the safe write all live in :mod:`tagger.tags`, so a new format
needs nothing but these four methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

#: Name of the field that records what this tool wrote (ID3 TXXX description,
#: Vorbis comment name, MP4 freeform name).
MARKER_NAME = "TAGGER_GENRE"


class Handler(Protocol):
    """One opened file in one tag format; changes stay in memory until :meth:`save`."""

    def genres(self, separator: str) -> list[str]:
        """Genre values as stored; formats that hold one value split it on ``separator``."""
        ...

    def marker(self) -> str | None:
        """The raw marker text, or None when the file has none."""
        ...

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        """Replace the genre (empty: remove it) and the marker (None: remove it)."""
        ...

    def save(self) -> None:
        """Write the changes to the file this handler was opened on."""
        ...
