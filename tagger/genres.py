"""The genres people typed, made comparable: one label per spelling family.

A library spells one genre many ways (``Hip Hop``, ``hip-hop``, ``HipHop``; ``Drum &
Bass``, ``Drum and Bass``, ``Drum'n'Bass``; ID3v1's numeric ``(17)`` for Rock), and
often holds several values in one (``Rap; Hip Hop``). :func:`first_genre` picks the
first genre of a file's values, :func:`key` folds spellings together, and
:func:`vocabulary` groups a library's spellings into labels, applying the owner's
aliases (``[learn.aliases]``) and the minimum number of tracks per label.

Pure functions, no I/O: ``tagger learn`` reads the values (a person's only, never
tagger's) with :mod:`tagger.tags`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mutagen.id3 import TCON

#: What separates several genres typed into one value: ``;`` (Picard, foobar2000), ``|``,
#: ``\\`` (Mp3tag), ``,`` (Discogs) and a slash with spaces around it. A bare slash is part
#: of a name (``Drum/Bass``, ``Rock/Pop``).
_SPLIT = re.compile(r"\s*(?:;|\||\\\\|\\|,|\s/\s)\s*")
_AND = re.compile(r"['’`]n['’`]|\bn\b|&|\+")
_NOT_ALNUM = re.compile(r"[\W_]+")
_NUMERIC = re.compile(r"^\s*(?:\(\d+\)|\((?:RX|CR)\)|\d+\s*$)")


def expand_numeric(value: str) -> list[str]:
    """ID3v1 genre numbers as their names (``(17)`` and ``17`` are Rock), with mutagen's table.

    ``(17)Rock & Roll`` (a number refined by text) is ``['Rock', 'Rock & Roll']``.
    Values that do not start with a number are returned as they are.
    """
    if not _NUMERIC.match(value):
        return [value]
    # mutagen names a number outside the table (255 is ID3v1's "none") "Unknown": no genre.
    return [g for g in TCON(encoding=3, text=[value]).genres if g.strip() and (g != "Unknown" or "Unknown" in value)]


def split_values(values: Iterable[str]) -> list[str]:
    """Every genre in ``values``: separators split, numbers named, blanks dropped, in order."""
    out: list[str] = []
    for value in values:
        for part in _SPLIT.split(value):
            out.extend(g.strip() for g in expand_numeric(part.strip()) if g.strip())
    return out


def first_genre(values: Iterable[str]) -> tuple[str | None, int]:
    """The label a file's genre values give (the first genre) and how many genres they hold."""
    genres = split_values(values)
    return (genres[0] if genres else None), len(genres)


def key(name: str) -> str:
    """The spelling-free form of a genre: case, accents, spacing, hyphens and ``&``/``and`` folded.

    ``Hip-Hop``, ``hip hop`` and ``HipHop`` are ``hiphop``; ``Drum & Bass``, ``drum and
    bass`` and ``Drum'n'Bass`` are ``drumandbass``; ``Música`` is ``musica``.
    """
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", name).casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _AND.sub(" and ", text)
    return _NOT_ALNUM.sub("", text)


@dataclass
class Label:
    """One label of the owner's vocabulary and the spellings that make it up."""

    name: str
    key: str
    #: spelling as typed (after numbers were named) → tracks
    spellings: Counter[str] = field(default_factory=Counter)
    #: the spellings that reached this label through ``[learn.aliases]``
    aliased: set[str] = field(default_factory=set)

    @property
    def tracks(self) -> int:
        return sum(self.spellings.values())

    @property
    def merged(self) -> bool:
        """More than one spelling, or an alias: worth telling the owner."""
        return len(self.spellings) > 1 or bool(self.aliased)

    def to_json(self) -> dict:
        return {
            "label": self.name,
            "tracks": self.tracks,
            "spellings": dict(self.spellings.most_common()),
            "aliased": sorted(self.aliased),
        }


@dataclass
class Vocabulary:
    """The owner's labels: kept (enough tracks) and dropped, and each spelling's label."""

    kept: list[Label]
    dropped: list[Label]
    min_tracks: int
    _by_key: dict[str, Label] = field(default_factory=dict, repr=False)
    _alias: dict[str, str] = field(default_factory=dict, repr=False)

    def label_of(self, spelling: str) -> Label | None:
        """The kept label a spelling belongs to, None if dropped."""
        lab = self._by_key.get(_resolve(key(spelling), self._alias)[0])
        return lab if lab is not None and lab.tracks >= self.min_tracks else None

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.kept]


def _resolve(k: str, alias: Mapping[str, str]) -> tuple[str, str | None]:
    """Follow the aliases from key ``k``: the final key and the name the last alias gave."""
    name = None
    seen = {k}
    while k in alias:
        name = alias[k]
        k = key(name)
        if k in seen:  # a loop of aliases: stop where it closes
            break
        seen.add(k)
    return k, name


def vocabulary(spellings: Sequence[str], aliases: Mapping[str, str] | None = None, *, min_tracks: int = 1) -> Vocabulary:
    """Group the first genre of every track (``spellings``, one per track) into labels.

    Each label is named by an alias that leads to it, else its most common spelling (the
    first seen among equals). Labels with fewer than ``min_tracks`` tracks are dropped.
    Kept labels come most tracks first.
    """
    alias = {key(src): dst for src, dst in (aliases or {}).items() if key(src) and key(dst)}
    labels: dict[str, Label] = {}
    named: dict[str, str] = {}
    for s in spellings:
        k0 = key(s)
        if not k0:
            continue
        k, name = _resolve(k0, alias)
        lab = labels.setdefault(k, Label(name or s, k))
        lab.spellings[s] += 1
        if name is not None:
            lab.aliased.add(s)
            named[k] = name
    for k, lab in labels.items():
        if k in named:
            lab.name = named[k]
        else:
            order = {s: i for i, s in enumerate(lab.spellings)}  # first seen wins a tie
            lab.name = max(lab.spellings, key=lambda s: (lab.spellings[s], -order[s]))
    ranked = sorted(labels.values(), key=lambda lab: (-lab.tracks, lab.name.casefold()))
    kept = [lab for lab in ranked if lab.tracks >= min_tracks]
    dropped = [lab for lab in ranked if lab.tracks < min_tracks]
    return Vocabulary(kept, dropped, min_tracks, labels, alias)
