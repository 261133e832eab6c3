"""MP4/M4A (AAC or ALAC): ``©gen`` atoms, marker as a freeform atom.

``©gen`` takes several values. Mutagen reads the old numeric ``gnre`` atom (an
ID3v1 genre index) as ``©gen`` and never writes it, so a tagged file holds one
genre atom, never two that disagree. Cover art (``covr``) is never touched.

A restore puts the genre atoms back byte for byte (a numeric ``gnre`` stays
numeric) through mutagen's path for atoms it could not parse, which it writes
back exactly as they were: ``MP4Tags._failed_atoms``, the one mutagen internal
used here (``tests/test_trust.py`` would notice it changing).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from mutagen.mp4 import MP4, AtomDataType, Atoms, MP4FreeForm

from tagger.tags.base import MARKER_NAME, Snapshot

MARKER_KEY = f"----:org.tagger:{MARKER_NAME}"
#: Atoms that hold a genre, as mutagen names them.
_GENRE_ATOMS = ("©gen", "gnre")


def _genre_atoms(path: str) -> dict[str, list[bytes]]:
    """The genre atoms' payloads exactly as stored in the file's ``ilst``."""
    found: dict[str, list[bytes]] = {}
    with open(path, "rb") as f:
        try:
            ilst = Atoms(f).path(b"moov", b"udta", b"meta", b"ilst")[-1]
        except KeyError:
            return found
        for atom in ilst.children:
            name = atom.name.decode("latin-1")
            if name in _GENRE_ATOMS:
                ok, data = atom.read(f)
                if ok:
                    found.setdefault(name, []).append(data)
    return found


class MP4Handler:
    """``©gen`` for the genre, ``----:org.tagger:TAGGER_GENRE`` for the marker."""

    FAMILY = "mp4"

    def __init__(self, file: MP4) -> None:
        self._file = file

    def genres(self, separator: str) -> list[str]:
        tags = self._file.tags
        if tags is None:
            return []
        return [str(v).strip() for v in tags.get("©gen", []) if str(v).strip()]

    def marker(self) -> str | None:
        tags = self._file.tags
        values = tags.get(MARKER_KEY) if tags is not None else None
        return bytes(values[0]).decode("utf-8", "replace") if values else None

    def set(self, genres: Sequence[str], marker: str | None, separator: str) -> None:
        if self._file.tags is None:
            self._file.add_tags()
        tags = self._file.tags
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

    def snapshot(self) -> Snapshot:
        tags = self._file.tags
        atoms = {k: [base64.b64encode(d).decode("ascii") for d in v] for k, v in _genre_atoms(self._file.filename).items()}
        marker = [[base64.b64encode(bytes(v)).decode("ascii"), int(v.dataformat)] for v in tags.get(MARKER_KEY, [])] if tags is not None else []
        return {"format": self.FAMILY, "block": tags is not None, "atoms": atoms, "marker": marker}

    def restore(self, snapshot: Snapshot) -> None:
        atoms, marker = snapshot["atoms"], snapshot["marker"]
        if self._file.tags is None:
            if not atoms and not marker:
                return
            self._file.add_tags()
        tags = self._file.tags
        for key in (*_GENRE_ATOMS, MARKER_KEY):
            tags.pop(key, None)
        failed = tags._failed_atoms  # written back verbatim on save (see the module doc)
        for key in _GENRE_ATOMS:
            failed.pop(key, None)
            if key in atoms:
                failed[key] = [base64.b64decode(d) for d in atoms[key]]
        if marker:
            tags[MARKER_KEY] = [MP4FreeForm(base64.b64decode(d), dataformat=f) for d, f in marker]
        if not snapshot["block"] and not tags and not failed:
            self._file.delete()  # the metadata atoms this tool added
            return
        self.save()


def open_mp4(path: Path) -> MP4Handler:
    return MP4Handler(MP4(path))
