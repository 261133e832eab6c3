"""``tagger learn``: the genres of the owner's own library, learnt from the owner's own tags.

1. Read the genre a *person* set in each file (:mod:`tagger.tags`: every value but those
   tagger's marker names as its own), take the first genre of it and fold its spelling
   (:mod:`tagger.genres`, with ``[learn.aliases]``); keep the labels with at least
   ``min_tracks`` tracks.
2. Take those tracks' embeddings from the database (stored by ``tagger scan``; no audio is
   decoded here, and no TensorFlow is imported).
3. Validate honestly: k folds of whole albums (album tag, else folder), so no track of a
   held-out album is ever in training with its album mates; per-genre precision and
   recall over the held-out predictions.
4. Fit the head on every track and save it as a head bundle (:mod:`tagger.model.head`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tags
from .genres import Vocabulary, first_genre, vocabulary
from .library import FileStat
from .model.bundle import Bundle
from .model.evaluate import Report
from .model.head import HeadBundle, fit_head, save_head
from .store import embeddings
from .store.db import Database

DEFAULT_FOLDS = 5
#: Inverse L2 strength of the head (scikit-learn's C): fixed rather than tuned on the
#: validation folds, so their figure stays an honest estimate.
DEFAULT_C = 0.1


class LearnRefused(Exception):
    """Nothing sensible can be learnt from this library as it is; the message says why."""


@dataclass
class Sample:
    """One track whose genre a person set."""

    path: str
    spelling: str  # the first genre, as typed (an ID3v1 number named)
    genres: int  # how many genres the person's values held
    group: str  # album (album tag, else folder): what validation keeps together


@dataclass
class Reading:
    """What the library's tags say: the samples, and what was left out and why."""

    samples: list[Sample] = field(default_factory=list)
    files: int = 0
    without: int = 0  # no genre a person set (none at all, or only tagger's)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def several(self) -> int:
        return sum(1 for s in self.samples if s.genres > 1)


def _first_text(value: Any) -> str | None:
    """The first text of a mutagen tag value (a list, an ID3 frame, an ASF attribute)."""
    if value is None:
        return None
    if hasattr(value, "text"):  # ID3 frame
        value = value.text
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    text = str(value).strip() if value is not None else ""
    return text or None


def album_of(path: str) -> str | None:
    """The album a file belongs to: ``album artist / album`` from its tags, None without an album tag."""
    import mutagen

    try:
        f = mutagen.File(path, easy=True)
    except Exception:  # mutagen parses untrusted bytes; an unreadable file has no album
        return None
    t = getattr(f, "tags", None)
    if t is None:
        return None

    def first(*keys: str) -> str | None:
        # Each format names it its own way (easy ID3/MP4 and Vorbis: "album"; ID3 in WAV
        # and AIFF: TALB; ASF: WM/AlbumTitle); Vorbis comments refuse other key shapes.
        for k in keys:
            try:
                if k in t:
                    return _first_text(t[k])
            except (KeyError, ValueError):
                continue
        return None

    album = first("album", "TALB", "WM/AlbumTitle")
    artist = first("albumartist", "album_artist", "album artist", "TPE2", "WM/AlbumArtist")
    if not album:
        return None
    return f"{(artist or '').casefold()}/{album.casefold()}"


def read_library(files: Iterable[FileStat], *, separator: str = tags.DEFAULT_SEPARATOR, progress: Callable[[], None] | None = None) -> Reading:
    """The first genre a person set in each file, and its album (tags only, no audio)."""
    out = Reading()
    for f in files:
        out.files += 1
        if progress is not None:
            progress()
        try:
            state = tags.read_state(f.path, separator=separator)
        except tags.TagError as exc:
            out.unreadable.append((f.path, exc.reason))
            continue
        # A marker of an older tagger named every value written, a person's merged ones
        # too: its values count as tagger's here (never learn from tagger's own guesses).
        spelling, n = first_genre(state.theirs)
        if spelling is None:
            out.without += 1
            continue
        album = album_of(f.path)
        group = f"album:{album}" if album else f"folder:{os.path.dirname(f.path)}"
        out.samples.append(Sample(f.path, spelling, n, group))
    return out


@dataclass
class Validation:
    """Held-out predictions of every track, each from a head trained without its album."""

    report: Report
    folds: int
    groups: int

    @property
    def chance(self) -> float:
        """Accuracy of always answering the most common label."""
        counts = np.bincount(self.report.truth, minlength=len(self.report.labels))
        return float(counts.max() / counts.sum()) if counts.sum() else 0.0

    @property
    def balanced_accuracy(self) -> float:
        recalls = [g["recall"] for g in self.report.per_genre().values() if g["support"]]
        return float(np.mean(recalls)) if recalls else 0.0

    def to_json(self) -> dict:
        return {
            **self.report.to_json(),
            "balanced_accuracy": self.balanced_accuracy,
            "chance": self.chance,
            "folds": self.folds,
            "albums": self.groups,
        }


def validate(x: np.ndarray, y: np.ndarray, groups: list[str], labels: list[str], *, folds: int = DEFAULT_FOLDS, seed: int = 0, c: float = DEFAULT_C) -> Validation | None:
    """Grouped, stratified k-fold: a held-out fold is whole albums. None when nothing can be
    held out (one album; or no label with two tracks)."""
    from sklearn.model_selection import StratifiedGroupKFold

    g_ids = np.unique(np.asarray(groups), return_inverse=True)[1]
    n_groups = int(g_ids.max()) + 1 if len(g_ids) else 0
    # scikit-learn wants at least one label with a track per fold
    k = min(folds, n_groups, int(np.bincount(y).max()) if len(y) else 0)
    if k < 2:
        return None
    predicted = np.zeros(len(y), dtype=np.int64)
    import warnings

    with warnings.catch_warnings():  # "the least populated class has only N members": expected
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y, g_ids))
    for train, test in splits:
        assert not set(g_ids[train]) & set(g_ids[test])  # no album on both sides
        head = fit_head(x[train], y[train], len(labels), c=c, seed=seed)
        predicted[test] = head.probabilities(x[test]).argmax(axis=1)
    return Validation(Report(list(labels), np.asarray(y), predicted, [str(i) for i in range(len(y))]), k, n_groups)


@dataclass
class Learnt:
    """Everything ``tagger learn`` found and did, for the text and JSON reports."""

    reading: Reading
    vocab: Vocabulary
    base: Bundle
    no_embedding: list[str]
    tracks: int
    validation: Validation | None
    bundle: HeadBundle

    def to_json(self) -> dict:
        r = self.reading
        return {
            "files": r.files,
            "with_genre": len(r.samples),
            "without_genre": r.without,
            "several_genres": r.several,
            "unreadable": [{"path": p, "reason": why} for p, why in r.unreadable],
            "no_embedding": len(self.no_embedding),
            "min_tracks": self.vocab.min_tracks,
            "kept": [lab.to_json() for lab in self.vocab.kept],
            "dropped": [lab.to_json() for lab in self.vocab.dropped],
            "merged": [lab.to_json() for lab in self.vocab.kept + self.vocab.dropped if lab.merged],
            "tracks": self.tracks,
            "validation": self.validation.to_json() if self.validation else None,
            "bundle": {"path": str(self.bundle.path), "sha256": self.bundle.sha256, "labels": self.bundle.labels},
            "base": {"name": self.base.name, "sha256": self.base.sha256},
        }


def learn(
    db: Database,
    reading: Reading,
    base: Bundle,
    out: str | Path,
    *,
    aliases: Mapping[str, str] | None = None,
    min_tracks: int = 15,
    folds: int = DEFAULT_FOLDS,
    c: float = DEFAULT_C,
    seed: int = 0,
    name: str | None = None,
) -> Learnt:
    """Labels from ``reading``, embeddings of ``base`` from ``db``, validation, the saved head.

    Raises :class:`LearnRefused` (with the reason) when fewer than two labels have
    ``min_tracks`` tracks with an embedding.
    """
    if not reading.samples:
        raise LearnRefused(f"none of the {reading.files} files has a genre a person set: nothing to learn from")
    with db.session(write=False) as s:
        model_id = embeddings.model_id_of(s, base.sha256)
        vectors = embeddings.for_paths(s, model_id, (x.path for x in reading.samples)) if model_id is not None else {}
    usable = [x for x in reading.samples if x.path in vectors]
    missing = [x.path for x in reading.samples if x.path not in vectors]
    if not usable:
        raise LearnRefused(
            f"none of the {len(reading.samples)} tracks with a genre has an embedding of the model "
            f"{base.name} yet: run `tagger scan --embed` on them first"
        )
    vocab = vocabulary([x.spelling for x in usable], aliases, min_tracks=min_tracks)
    if len(vocab.kept) < 2:
        have = ", ".join(f"{lab.name} ({lab.tracks})" for lab in (vocab.kept + vocab.dropped)[:5])
        raise LearnRefused(
            f"{len(vocab.kept)} genre{'s' if len(vocab.kept) != 1 else ''} with at least {min_tracks} tracks "
            f"({have}{', …' if len(vocab.kept) + len(vocab.dropped) > 5 else ''}); learning needs two or more: "
            "tag more files, merge spellings with [learn.aliases], or lower --min-tracks"
        )
    index = {lab.key: i for i, lab in enumerate(vocab.kept)}
    chosen = [(x, vocab.label_of(x.spelling)) for x in usable]
    chosen = [(x, lab) for x, lab in chosen if lab is not None]
    x = np.stack([vectors[s.path] for s, _ in chosen])
    y = np.array([index[lab.key] for _, lab in chosen], dtype=np.int64)
    groups = [s.group for s, _ in chosen]
    labels = vocab.names
    val = validate(x, y, groups, labels, folds=folds, seed=seed, c=c)
    head = fit_head(x, y, len(labels), c=c, seed=seed)
    metrics: dict[str, Any] = {"validation": val.to_json() if val else None}
    training = {
        "tracks": len(y),
        "albums": len(set(groups)),
        "per_label": {lab: int(n) for lab, n in zip(labels, np.bincount(y, minlength=len(labels)), strict=True)},
        "min_tracks": min_tracks,
        "aliases": dict(aliases or {}),
        "folds": val.folds if val else 0,
        "c": c,
    }
    bundle = save_head(out, head, labels, base, name=name or f"learnt-{Path(out).name}", training=training, metrics=metrics)
    return Learnt(reading, vocab, base, missing, len(y), val, bundle)


def render(result: Learnt) -> str:
    """The text report: what was read, kept, merged, dropped; validation; where the head is."""
    r, v = result.reading, result.vocab
    lines = [
        f"read {r.files} files: {len(r.samples)} with a genre a person set, {r.without} without one "
        f"(or only tagger's){f', {len(r.unreadable)} unreadable' if r.unreadable else ''}"
    ]
    if r.several:
        lines.append(f"  {r.several} files hold several genres: the first is their label")
    if result.no_embedding:
        lines.append(f"  {len(result.no_embedding)} of them have no embedding yet (run `tagger scan --embed` on them): left out")
    lines.append(f"kept {_n(len(v.kept), 'genre')} with at least {_n(v.min_tracks, 'track')}:")
    for lab in v.kept:
        lines.append(f"  {lab.name:<24}{lab.tracks:>6}" + (f"   merged: {_spellings(lab)}" if lab.merged else ""))
    if v.dropped:
        shown = ", ".join(f"{lab.name} ({lab.tracks})" for lab in v.dropped[:20])
        more = f", and {len(v.dropped) - 20} more" if len(v.dropped) > 20 else ""
        lines.append(f"dropped {_n(len(v.dropped), 'genre')} with fewer than {_n(v.min_tracks, 'track')}: {shown}{more}")
    val = result.validation
    if val is None:
        lines.append("not validated: all these tracks are in one album (validation holds out whole albums)")
    else:
        rep = val.report
        lines += [
            f"validation: {val.folds} folds of whole albums ({val.groups} albums), each track predicted by a head "
            "that never saw its album",
            f"  accuracy {rep.accuracy:.1%} on {rep.n} tracks (balanced {val.balanced_accuracy:.1%}; always "
            f"answering the most common genre: {val.chance:.1%})",
            f"  {'genre':<24}{'precision':>10}{'recall':>8}{'tracks':>8}",
        ]
        for g, m in rep.per_genre().items():
            lines.append(f"  {g:<24}{m['precision']:>10.1%}{m['recall']:>8.1%}{m['support']:>8}")
    b = result.bundle
    lines += [
        f"saved {b.path} ({len(b.labels)} genres, sha256 {b.sha256[:12]}, on the model {result.base.name})",
        f"use it: tagger scan --model {b.path}   (or [model] path = \"{b.path}\" for every scan and the daemon)",
    ]
    return "\n".join(lines)


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _spellings(lab) -> str:
    parts = [f"{s} ({n}{', alias' if s in lab.aliased else ''})" for s, n in lab.spellings.most_common(6)]
    if len(lab.spellings) > 6:
        parts.append(f"{len(lab.spellings) - 6} more")
    return ", ".join(parts)
