"""Reading and writing the genre tag: mutagen, one handler per tag format behind one interface.

* :func:`read_state` says what genre a file holds, which of its values this tool
  added, and records the genre fields exactly as stored (for :func:`restore_fields`).
* :func:`decide` turns that, the model's genres and a policy into "write this" or
  "leave the file alone" (pure, no I/O).
* :func:`write_genres` writes genres plus a marker recording which of them this
  tool added, by tagging a copy and renaming it over the original, so a crash
  never leaves a half-written file.

The handler follows the file's content, not its name: a FLAC file called
``.mp3`` is tagged as the FLAC it is.

Where the format allows several values (ID3v2.4 TCON, Vorbis ``GENRE``, MP4
``©gen``, ASF ``WM/Genre``) several genres are several values; ID3v2.3 joins
them with ``separator``. The marker is compact JSON naming only the values this
tool added, e.g. ``{"added":["Rock"],"model":"densenet-v1","confidence":0.91}``
next to a person's ``Post-Rock``, stored as ID3 ``TXXX:TAGGER_GENRE``, Vorbis
``TAGGER_GENRE``, MP4 ``----:org.tagger:TAGGER_GENRE`` or ASF ``TAGGER/Genre``.
Every other value is the person's, and no policy but ``replace`` removes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from tagger.tags import asf, id3, mp4, vorbis
from tagger.tags.base import Handler, Snapshot

__all__ = [
    "DEFAULT_SEPARATOR",
    "POLICIES",
    "Decision",
    "GenreState",
    "Marker",
    "FileChanged",
    "Snapshot",
    "TagError",
    "clean_genres",
    "decide",
    "is_temporary_copy",
    "named_kind",
    "read_state",
    "remove_stale_copy",
    "restore_fields",
    "supported",
    "write_genres",
]

DEFAULT_SEPARATOR = "; "
POLICIES = ("keep", "merge", "replace")

_OPENERS: dict[str, Callable[[Path], Handler]] = {
    ".mp3": id3.open_mp3,
    ".aif": id3.open_aiff,
    ".aiff": id3.open_aiff,
    ".aifc": id3.open_aiff,
    ".wav": id3.open_wave,
    ".flac": vorbis.open_flac,
    ".ogg": vorbis.open_ogg,
    ".oga": vorbis.open_ogg,
    ".opus": vorbis.open_opus,
    ".m4a": mp4.open_mp4,
    ".m4b": mp4.open_mp4,
    ".mp4": mp4.open_mp4,
    ".wma": asf.open_asf,
    ".asf": asf.open_asf,
}
#: What each opener reads, for messages about a file whose name says otherwise.
_KINDS: dict[Callable[[Path], Handler], str] = {
    id3.open_mp3: "MP3",
    id3.open_aiff: "AIFF",
    id3.open_wave: "WAV",
    vorbis.open_flac: "FLAC",
    vorbis.open_ogg: "Ogg",
    vorbis.open_opus: "Ogg",
    mp4.open_mp4: "MP4",
    asf.open_asf: "ASF",
}
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
#: Suffix of the temporary copy; not a supported extension, so a file watcher skips it.
_TMP_SUFFIX = ".tagger-tmp"


class TagError(Exception):
    """A file's tags cannot be read or written; ``str()`` is ``"<path>: <reason>"``, one line.

    ``reason`` is the same without the path, for messages that name the file already.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class FileChanged(TagError):
    """The file was moved, deleted or rewritten by someone else while we tagged it.

    Nothing was written: renaming our copy over it would bring back a file the user
    moved away, or undo their edit. The caller looks at the file again later.
    """


@dataclass(frozen=True)
class Marker:
    """What this tool wrote: the values it added, the model that chose them, its confidence.

    ``added`` names only this tool's values: the person's genres a ``merge`` kept
    next to them are not in it, so a later refresh replaces ours and nothing else.
    ``legacy`` markers come from older versions, whose list held every value written
    (a person's merged ones too); the caller narrows them with what it recorded.
    """

    added: tuple[str, ...]
    model: str
    confidence: float
    legacy: bool = False

    def dumps(self) -> str:
        """Compact JSON, small enough for any tag field."""
        data = {"added": list(self.added), "model": self.model, "confidence": self.confidence}
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def loads(cls, text: str | None) -> Marker | None:
        """Parse a stored marker; anything malformed (say, hand-edited) counts as no marker."""
        if not text:
            return None
        try:
            data = json.loads(text)
            legacy = "added" not in data
            added = data["genres" if legacy else "added"]
            model = data["model"]
            confidence = float(data["confidence"])
        except (ValueError, TypeError, KeyError):
            return None
        if (
            not isinstance(added, list)
            or not all(isinstance(g, str) for g in added)
            or not isinstance(model, str)
            or not math.isfinite(confidence)
        ):
            return None
        return cls(tuple(added), model, confidence, legacy)


def _fold(genres: Iterable[str]) -> tuple[str, ...]:
    return tuple(g.casefold() for g in genres)


@dataclass(frozen=True)
class GenreState:
    """The genre a file holds now, the marker found next to it (if any), and, for a
    restore, the genre and marker fields exactly as stored (``raw``)."""

    genres: tuple[str, ...]
    marker: Marker | None
    raw: Snapshot | None = field(default=None, compare=False, repr=False)
    #: What the content is ("FLAC", "MP3", ...), whatever the file's name says.
    kind: str = field(default="", compare=False)

    @property
    def added(self) -> tuple[str, ...]:
        """The values in the file this tool added, as the file spells them.

        Only while every value the marker names is still there (case aside): once a
        person removed or renamed one of ours, what is left is theirs.
        """
        if self.marker is None or not self.marker.added:
            return ()
        mine = set(_fold(self.marker.added))
        if not mine <= set(_fold(self.genres)):
            return ()
        return tuple(g for g in self.genres if g.casefold() in mine)

    @property
    def theirs(self) -> tuple[str, ...]:
        """Every other value: what a person (or another program) set."""
        mine = set(_fold(self.added))
        return tuple(g for g in self.genres if g.casefold() not in mine)

    @property
    def ours(self) -> bool:
        """True while the file holds values this tool added, untouched by a person."""
        return bool(self.added)

    def with_added(self, added: Sequence[str]) -> GenreState:
        """The same state with the marker narrowed to ``added`` (for legacy markers)."""
        if self.marker is None:
            return self
        return replace(self, marker=replace(self.marker, added=tuple(added), legacy=False))


def supported(path: str | os.PathLike[str]) -> bool:
    """Whether the extension is one we can tag (cheap: no I/O)."""
    return os.path.splitext(os.fspath(path))[1].lower() in _OPENERS  # no pathlib: called per file of a walk


def named_kind(path: str | os.PathLike[str]) -> str:
    """The format a file's extension names ("FLAC", "MP3", ...; "" if unsupported)."""
    opener = _OPENERS.get(os.path.splitext(os.fspath(path))[1].lower())
    return _KINDS[opener] if opener else ""


def clean_genres(genres: Iterable[str]) -> tuple[str, ...]:
    """Strip, drop empties and case-insensitive duplicates; first spelling and order win."""
    seen: set[str] = set()
    out: list[str] = []
    for genre in genres:
        genre = genre.strip()
        if genre and genre.casefold() not in seen:
            seen.add(genre.casefold())
            out.append(genre)
    return tuple(out)


class Decision(NamedTuple):
    """What :func:`decide` says: the genres to write (None: leave the file alone), the
    ones among them this tool adds (what the marker records), and why."""

    genres: tuple[str, ...] | None
    added: tuple[str, ...]
    reason: str


def decide(state: GenreState, ours: Sequence[str], policy: str) -> Decision:
    """The genres to write under ``policy``, or None to leave the file alone, plus why.

    A person's values (``state.theirs``) are kept by ``keep`` and ``merge``; only
    ``replace`` removes them (the caller keeps the old value). The values this tool
    added earlier (``state.added``) are replaced by ``ours`` under every policy.
    ``keep`` writes to a file with no genre, or refreshes ours next to theirs, but
    never adds to a genre a person set alone; ``merge`` appends ours after theirs;
    ``replace`` writes ours only. A result equal (case aside) to what the file holds
    is None.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown genre policy {policy!r}; expected one of {POLICIES}")
    new = clean_genres(ours)
    if not new:
        return Decision(None, (), "no genres to write")
    current, theirs = state.genres, state.theirs
    if policy == "keep":
        if not current:
            reason = "file had no genre"
        elif state.ours:
            new = clean_genres([*theirs, *new])
            reason = "refreshing the genre this tool added" + (", keeping the person's" if theirs else "")
        else:
            return Decision(None, (), "keeping the genre set by a person")
    elif policy == "merge":
        new = clean_genres([*theirs, *new])
        reason = "merged with the existing genre" if theirs else "file had no genre" if not current else "refreshing the genre this tool added"
    else:
        reason = "replacing the existing genre" if current else "file had no genre"
    if _fold(new) == _fold(current):  # a change of case alone is not worth a rewrite
        return Decision(None, (), "file already has these genres")
    keep = set() if policy == "replace" else set(_fold(theirs))
    return Decision(new, tuple(g for g in new if g.casefold() not in keep), reason)


def _sniff(path: Path) -> Callable[[Path], Handler] | None:
    """The opener the content calls for (magic bytes), or None when it is not clear."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
            if head[:3] == b"ID3" and len(head) >= 10:
                # An ID3v2 tag in front: MP3, or FLAC some tools prefix with one.
                size = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F)
                f.seek(size + (10 if head[5] & 0x10 else 0))
                return vorbis.open_flac if f.read(4) == b"fLaC" else id3.open_mp3
    except OSError:
        return None  # the opener reports it
    if head[:4] == b"fLaC":
        return vorbis.open_flac
    if head[:4] == b"OggS":
        return vorbis.open_ogg
    if head[4:8] == b"ftyp":
        return mp4.open_mp4
    if head == _ASF_GUID:
        return asf.open_asf
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return id3.open_aiff
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return id3.open_wave
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG frame sync
        return id3.open_mp3
    return None


def _open(path: Path, kind: Path | None = None) -> tuple[Handler, str]:
    """The handler for ``path`` and what its content is.

    The content decides (magic bytes), so a FLAC named ``.mp3`` is read as FLAC;
    the extension (of ``kind``, default ``path``) only when the bytes say nothing.
    """
    name = kind or path
    suffix = name.suffix.lower()
    by_name = _OPENERS.get(suffix)
    if by_name is None:
        raise TagError(name, f"unsupported format {suffix or '(no extension)'}")
    opener = _sniff(path) or by_name
    what = _KINDS[opener]
    try:
        return opener(path), what
    except Exception as exc:  # mutagen parses untrusted bytes; any failure means "unreadable"
        raise _error(name, exc, "unreadable or corrupt" if opener is by_name else f"unreadable or corrupt {what}") from exc


def _error(path: Path, exc: BaseException, what: str) -> TagError:
    """A TagError with a one-line reason, spotting permission problems mutagen wraps."""
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, PermissionError):
            return TagError(path, "permission denied")
        if isinstance(chain, FileNotFoundError):
            return TagError(path, "no such file")
        chain = chain.__cause__ or chain.__context__
    lines = str(exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    return TagError(path, f"{what} ({detail})")


def read_state(path: str | os.PathLike[str], *, separator: str = DEFAULT_SEPARATOR) -> GenreState:
    """What genre the file holds and our marker; ``separator`` splits ID3v2.3's single value."""
    handler, kind = _open(Path(path))
    try:
        genres = clean_genres(handler.genres(separator))
        marker = Marker.loads(handler.marker())
        raw = handler.snapshot()
    except Exception as exc:
        raise _error(Path(path), exc, "unreadable tags") from exc
    return GenreState(genres, marker, raw, kind)


def write_genres(
    path: str | os.PathLike[str],
    genres: Sequence[str],
    marker: Marker | None,
    *,
    separator: str = DEFAULT_SEPARATOR,
    expect: os.stat_result | None = None,
) -> None:
    """Write ``genres`` (empty: remove the genre) and ``marker`` (None: remove ours).

    Everything else in the file is left as it was. The file is replaced
    atomically; its size and mtime change, which the caller records. ``expect``
    is the file as the caller last saw it (when it read the tags it decided on);
    if the file is not that one any more, :class:`FileChanged` is raised.
    """
    path = Path(path)
    values = clean_genres(genres)
    if marker is not None and not set(_fold(clean_genres(marker.added))) <= set(_fold(values)):
        raise ValueError("marker.added must be among the genres being written")
    text = marker.dumps() if marker is not None else None

    def tag(copy: Path) -> None:
        handler, _ = _open(copy, kind=path)
        try:
            handler.set(values, text, separator)
            handler.save()
        except Exception as exc:
            raise _error(path, exc, "cannot write tags") from exc

    _replace_safely(path, tag, expect)


def restore_fields(path: str | os.PathLike[str], snapshot: Snapshot, *, expect: os.stat_result | None = None) -> None:
    """Put the genre and marker fields back exactly as ``snapshot`` (``GenreState.raw``) has them.

    Numeric or padded values, text encodings and value types come back as they were
    stored, and a tag block that did not exist then is removed again when it holds
    nothing else. The same atomic replace as :func:`write_genres`.
    """
    path = Path(path)

    def put_back(copy: Path) -> None:
        handler, what = _open(copy, kind=path)
        if snapshot.get("format") != handler.FAMILY:
            raise TagError(path, f"the recorded tags are {snapshot.get('format')} tags, the file is {what} now")
        try:
            handler.restore(snapshot)
        except Exception as exc:
            raise _error(path, exc, "cannot write tags") from exc

    _replace_safely(path, put_back, expect)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """Same file, same content as far as a stat can tell (what a rename or a write changes)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _replace_safely(path: Path, change: Callable[[Path], None], expect: os.stat_result | None = None) -> None:
    """Apply ``change`` to a copy in the same directory, fsync it, rename it over ``path``.

    A crash leaves either the old file or the new one (plus at worst a stray
    ``.*.tagger-tmp``). Permission bits, owner (where allowed) and extended
    attributes are carried over. A symlink is followed and its target
    replaced; a hard link is broken (the other names keep the old file).

    Just before the rename the original is checked to still be the file that was
    copied: if it was moved, deleted or rewritten meanwhile, the copy is dropped
    (:class:`FileChanged`). Only the instant between that check and the rename
    stays open to a concurrent change.
    """
    real = Path(os.path.realpath(path))
    try:
        st = real.stat()
        # Renaming needs only the directory, so refuse read-only files explicitly;
        # opening for writing honours mode bits, ACLs and read-only mounts alike.
        os.close(os.open(real, os.O_WRONLY))
    except OSError as exc:
        raise _error(path, exc, "cannot open for writing") from exc
    if not stat.S_ISREG(st.st_mode):
        raise TagError(path, "not a regular file")
    if expect is not None and _identity(st) != _identity(expect):
        raise FileChanged(path, "changed since its tags were read; left as it is")
    fd, tmp = _locked_copy_name(path, real)
    try:
        with os.fdopen(os.dup(fd), "wb") as dst, real.open("rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        change(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        _copy_metadata(real, tmp, st)
        try:
            now = os.stat(real)
        except FileNotFoundError:
            raise FileChanged(path, "moved or deleted while being tagged; left as it is") from None
        if _identity(now) != _identity(st):
            raise FileChanged(path, "changed while being tagged; left as it is")
        os.replace(tmp, real)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _error(path, exc, "cannot write") from exc
        raise
    finally:
        os.close(fd)  # releases the lock: the copy is renamed or gone by now
    _fsync_dir(real.parent)


def _locked_copy_name(path: Path, real: Path) -> tuple[int, Path]:
    """A new, empty ``.NAME.xxxxxxxx.tagger-tmp`` beside ``real``, with an exclusive lock held.

    The lock (``flock``) lives as long as the returned descriptor, so it dies with a
    killed process: :func:`remove_stale_copy` tells a copy being written from one left
    behind by it. Between creating the name and locking it a sweep may remove it; the
    name is then made again.
    """
    for _ in range(8):
        try:
            fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=_TMP_SUFFIX, dir=real.parent)
        except OSError as exc:
            raise _error(path, exc, "cannot create a temporary file next to it") from exc
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweep holds it only for its unlink
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(name)):
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)
    raise TagError(path, "cannot keep a temporary file next to it (removed as soon as made)")


def is_temporary_copy(name: str) -> bool:
    """Whether a file name is one of this tool's temporary copies (``.NAME.xxxxxxxx.tagger-tmp``)."""
    return name.startswith(".") and name.endswith(_TMP_SUFFIX) and len(name) > len(_TMP_SUFFIX) + 1


def remove_stale_copy(path: str | os.PathLike[str]) -> bool:
    """Delete a temporary copy that no live tagger holds; True when it was deleted.

    A copy being written is locked by its writer (see :func:`_locked_copy_name`); one
    whose writer was killed (``kill -9``, a lost node, a power cut) is not, and is
    never renamed over anything, so it is litter. Anything that is not such a copy, or
    is locked, or is replaced while we look, is left alone.
    """
    path = os.fspath(path)
    if not is_temporary_copy(os.path.basename(path)):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a tagger is writing it now
            return False
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or not os.path.samestat(held, os.lstat(path)):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _copy_metadata(src: Path, dst: Path, st: os.stat_result) -> None:
    """Owner (root only, best effort), extended attributes (best effort), mode bits."""
    if hasattr(os, "chown"):
        with contextlib.suppress(OSError):
            os.chown(dst, st.st_uid, st.st_gid)
    if hasattr(os, "listxattr"):
        with contextlib.suppress(OSError):
            for name in os.listxattr(src):
                with contextlib.suppress(OSError):
                    os.setxattr(dst, name, os.getxattr(src, name))
    os.chmod(dst, stat.S_IMODE(st.st_mode))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
