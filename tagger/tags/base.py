"""The small interface every tag-format handler implements.

Handlers deal only in plain strings: the genre values as the format stores
them and the marker's serialised text. Parsing the marker, policies, error
wrapping and the safe write all live in :mod:`tagger.tags`, so a new format
needs nothing but these methods.

:meth:`Handler.snapshot` and :meth:`Handler.restore` are the exception to
"plain strings": they record the genre and marker fields exactly as the file
stores them (numeric ID3 references, padding, text encodings, ASF value types,
where in the tag they sat, whether the tag block existed at all), so that
``tagger restore`` gives back what was there, not mutagen's reading of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

#: Name of the field that records what this tool wrote (ID3 TXXX description,
#: Vorbis comment name, MP4 freeform name).
MARKER_NAME = "TAGGER_GENRE"

#: A handler's record of its genre and marker fields: JSON-serialisable, stored in the
#: database (``tag_writes.raw_before``). ``"format"`` names the handler family.
Snapshot = dict[str, Any]


class Handler(Protocol):
    """One opened file in one tag format; changes stay in memory until :meth:`save`."""

    #: Tag family ("id3", "vorbis", "mp4", "asf"), recorded in snapshots.
    FAMILY: ClassVar[str]

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

    def snapshot(self) -> Snapshot:
        """The genre and marker fields exactly as stored, and whether the tag block exists."""
        ...

    def restore(self, snapshot: Snapshot) -> None:
        """Put the fields back as ``snapshot`` has them and save; a tag block that did
        not exist then and holds nothing else now is removed."""
        ...


class MultiValueHandler:
    """Formats whose tags are an ordered list of (key, value) pairs (Vorbis comments, ASF).

    Subclasses name the genre and marker keys, and wrap values if the format
    wants typed attributes.
    """

    FAMILY: ClassVar[str]
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

    def _dump(self, value: Any) -> Any:
        """A stored value as JSON (for snapshots)."""
        return value

    def _load(self, data: Any) -> Any:
        """The inverse of :meth:`_dump`."""
        return data

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

    def _ours(self, key: str) -> bool:
        return key.lower() in (self.GENRE_KEY.lower(), self.MARKER_KEY.lower())

    def snapshot(self) -> Snapshot:
        tags = self._file.tags
        if tags is None:
            return {"format": self.FAMILY, "block": False, "fields": []}
        # Each field with its position, so a restore puts it back where it was.
        fields = [[i, key, self._dump(value)] for i, (key, value) in enumerate(tags) if self._ours(key)]
        return {"format": self.FAMILY, "block": True, "fields": fields}

    def restore(self, snapshot: Snapshot) -> None:
        if self._file.tags is None:
            if not snapshot["fields"]:
                return  # nothing of ours, nothing to put back: leave the file alone
            self._file.add_tags()
        tags = self._file.tags
        pairs = [(k, v) for k, v in tags if not self._ours(k)]
        for index, key, data in sorted(snapshot["fields"], key=lambda f: f[0]):
            pairs.insert(min(index, len(pairs)), (key, self._load(data)))
        tags[:] = pairs
        if not snapshot["block"] and not pairs:
            self._drop_block()
        self.save()

    def _drop_block(self) -> None:
        """Remove the (empty) tag block this tool added; formats that always have one keep it."""
