"""The small interface every tag-format handler implements.

Handlers deal only in plain strings: the genre values as the format stores
them and the marker's serialised text. Parsing the marker, policies, error
wrapping and the safe write all live in :mod:`tagger.tags`, so a new format
needs nothing but these four methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

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


class MultiValueHandler:
    """Formats whose tags map a key to a list of values (Vorbis comments, ASF).

    Subclasses name the genre and marker keys, and wrap values if the format
    wants typed attributes.
    """

    GENRE_KEY: ClassVar[str]
    MARKER_KEY: ClassVar[str]

    def __init__(self, file: Any) -> None:
        self._file = file

    def _get(self, key: str) -> list[str]:
        tags = self._file.tags
        if tags is None or key not in tags:
            return []
        return [str(v) for v in tags[key]]

    def _wrap(self, value: str) -> Any:
        return value

    def genres(self, separator: str) -> list[str]:
        return [v.strip() for v in self._get(self.GENRE_KEY) if v.strip()]

    def marker(self) -> str | None:
        values = self._get(self.MARKER_KEY)
        return values[0] if values else None

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        if self._file.tags is None:  # e.g. FLAC without a comment block
            self._file.add_tags()
        tags = self._file.tags
        for key, values in ((self.GENRE_KEY, list(genres)), (self.MARKER_KEY, [marker] if marker else [])):
            if values:
                tags[key] = [self._wrap(v) for v in values]  # replaces every case variant of the key
            elif key in tags:
                del tags[key]

    def save(self) -> None:
        self._file.save()
