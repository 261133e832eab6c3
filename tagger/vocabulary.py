"""tagger's genre vocabulary and the one table that maps other sources' genres onto it.

Training data comes labelled in other people's words: GTZAN's ten folder names,
AllMusic's coarse genres (``Pop/Rock`` is one genre there: pop *or* rock *or*
metal), Emotify's four Magnatune folders. :data:`SOURCE_MAP` says, for each such
name, which of our labels it allows. A window whose source names several genres
(``Electronic; Pop/Rock``) allows the union; a window whose names are all outside
the vocabulary (``Comedy/Spoken``, ``Holiday``) allows only :data:`NONE_LABEL`,
"none of my genres". Names that cut across the others (``International``,
``Vocal``) are ignored beside a real genre; alone they say "none of my genres" too
(world music, vocal standards: none of our labels would be right for them).

The same table scores what tagger writes (``benchmarks/real_music.py``): a written
genre is right when the source's names allow it. Pure functions, no I/O but the
optional TOML override (``tagger train --label-map FILE``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from .genres import key, split_values

#: The label a model may carry for "none of my genres": never written into a file.
NONE_LABEL = "other"

#: GTZAN's ten, the vocabulary every earlier model had.
GTZAN = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")

#: Source genre (any spelling: matched through :func:`tagger.genres.key`) → the labels it allows.
#: An empty set: a name that cuts across genres and says nothing of its own.
SOURCE_MAP: dict[str, frozenset[str]] = {
    key(k): frozenset(v)
    for k, v in {
        # GTZAN folders and Emotify (Magnatune) folders: their own names
        **{g: {g} for g in GTZAN},
        "hip-hop": {"hiphop"},
        "electronic": {"electronic"},
        # AllMusic's top-level genres
        "Pop/Rock": {"pop", "rock", "metal"},
        "Rap": {"hiphop"},
        "R&B": {"rnb"},
        "Folk": {"folk"},
        "Latin": {"latin"},
        "New Age": {"newage"},
        "Jazz": {"jazz"},
        "Blues": {"blues"},
        "Country": {"country"},
        "Reggae": {"reggae"},
        "Classical": {"classical"},
        "Electronic": {"electronic"},
        # Outside any vocabulary of ours: a window with only these is "none of my genres"
        "Comedy/Spoken": {NONE_LABEL},
        "Holiday": {NONE_LABEL},
        "Religious": {NONE_LABEL},
        "Children's": {NONE_LABEL},
        "Stage & Screen": {NONE_LABEL},
        "Easy Listening": {NONE_LABEL},
        "Avant-Garde": {NONE_LABEL},
        # Cutting across the others (a language, a singing style): ignored beside a real
        # genre; alone, "none of my genres" (allowed() maps an empty union to NONE_LABEL)
        "International": set(),
        "Vocal": set(),
    }.items()
}

#: How each label is written into tags (``[tags.names]`` overrides it).
DISPLAY = {
    "blues": "Blues",
    "classical": "Classical",
    "country": "Country",
    "disco": "Disco",
    "electronic": "Electronic",
    "folk": "Folk",
    "hiphop": "Hip-Hop",
    "jazz": "Jazz",
    "latin": "Latin",
    "metal": "Metal",
    "newage": "New Age",
    "pop": "Pop",
    "reggae": "Reggae",
    "rnb": "R&B",
    "rock": "Rock",
}


class LabelMapError(ValueError):
    """A label map that cannot be used (one line)."""


def load_label_map(path: str | Path | None) -> dict[str, frozenset[str]]:
    """:data:`SOURCE_MAP`, with the entries of a TOML file (``"Name" = ["label", …]``) on top."""
    table = dict(SOURCE_MAP)
    if path is None:
        return table
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabelMapError(f"{path}: {exc}") from None
    for name, labels in data.items():
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise LabelMapError(f"{path}: {name!r} must map to a label or a list of labels")
        table[key(name)] = frozenset(x.strip().lower() for x in labels)
    return table


def allowed(names: Iterable[str], table: Mapping[str, frozenset[str]] = SOURCE_MAP, vocabulary: Iterable[str] | None = None) -> frozenset[str] | None:
    """The labels a window's source genres allow; ``None`` when no name is in the table.

    ``names`` are the source's values (``"Pop/Rock; Electronic"`` or a list). Labels
    outside ``vocabulary`` are dropped; a window whose genres are all outside it allows
    only :data:`NONE_LABEL`, and so does a window named only by cross-cutting names
    (``International`` alone is music from elsewhere: none of our genres fits it).
    """
    out: set[str] = set()
    known = False
    for n in split_values([names] if isinstance(names, str) else names):
        k = key(n)
        if k in table:
            known = True
            out |= table[k]
    if not known:  # nothing in the table
        return None
    if not out:  # only names that cut across genres (world music, vocal standards): none of ours
        return frozenset({NONE_LABEL})
    real = out - {NONE_LABEL}
    if vocabulary is not None:
        real &= set(vocabulary)
    return frozenset(real) if real else frozenset({NONE_LABEL})


def display(label: str, names: Mapping[str, str] | None = None) -> str:
    """How ``label`` is written: the owner's ``[tags.names]``, else :data:`DISPLAY`, else Title Case."""
    if names and label in names:
        return names[label]
    return DISPLAY.get(label, label.title())
