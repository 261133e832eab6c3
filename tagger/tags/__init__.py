"""Reading and writing the genre tag: mutagen, one handler per tag format behind one interface.

* :func:`read_state` says what genre a file holds and whether this tool wrote it.
* :func:`decide` turns that, the model's genres and a policy into "write this" or
  "leave the file alone" (pure, no I/O).
* :func:`write_genres` writes genres plus a marker recording what we wrote, by
  tagging a copy and renaming it over the original, so a crash never leaves a
  half-written file.

Where the format allows several values (ID3v2.4 TCON, Vorbis ``GENRE``, MP4
``©gen``, ASF ``WM/Genre``) several genres are several values; ID3v2.3 joins
them with ``separator``. The marker is compact JSON, e.g.
``{"genres":["Rock","Jazz"],"model":"densenet-v1","confidence":0.91}``, stored as
ID3 ``TXXX:TAGGER_GENRE``, Vorbis ``TAGGER_GENRE``, MP4
``----:org.tagger:TAGGER_GENRE`` or ASF ``TAGGER/Genre``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tagger.tags import asf, id3, mp4, vorbis
from tagger.tags.base import Handler

__all__ = [
    "DEFAULT_SEPARATOR",
    "POLICIES",
    "GenreState",
    "Marker",
    "FileChanged",
    "TagError",
    "clean_genres",
    "decide",
    "read_state",
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
#: Suffix of the temporary copy; not a supported extension, so a file watcher skips it.
_TMP_SUFFIX = ".tagger-tmp"


class TagError(Exception):
    """A file's tags cannot be read or written; ``str()`` is a one-line reason."""


class FileChanged(TagError):
    """The file was moved, deleted or rewritten by someone else while we tagged it.

    Nothing was written: renaming our copy over it would bring back a file the user
    moved away, or undo their edit. The caller looks at the file again later.
    """


@dataclass(frozen=True)
class Marker:
    """What this tool wrote: the genres, the model that chose them, its confidence."""

    genres: tuple[str, ...]
    model: str
    confidence: float

    def dumps(self) -> str:
        """Compact JSON, small enough for any tag field."""
        data = {"genres": list(self.genres), "model": self.model, "confidence": self.confidence}
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def loads(cls, text: str | None) -> Marker | None:
        """Parse a stored marker; anything malformed (say, hand-edited) counts as no marker."""
        if not text:
            return None
        try:
            data = json.loads(text)
            genres = data["genres"]
            model = data["model"]
            confidence = float(data["confidence"])
        except (ValueError, TypeError, KeyError):
            return None
        if (
            not isinstance(genres, list)
            or not all(isinstance(g, str) for g in genres)
            or not isinstance(model, str)
            or not math.isfinite(confidence)
        ):
            return None
        return cls(tuple(genres), model, confidence)


def _fold(genres: Iterable[str]) -> tuple[str, ...]:
    return tuple(g.casefold() for g in genres)


@dataclass(frozen=True)
class GenreState:
    """The genre a file holds now and the marker found next to it (if any)."""

    genres: tuple[str, ...]
    marker: Marker | None

    @property
    def ours(self) -> bool:
        """True while the genre is still exactly what this tool wrote (case aside)."""
        return self.marker is not None and _fold(self.genres) == _fold(self.marker.genres)


def supported(path: str | os.PathLike[str]) -> bool:
    """Whether the extension is one we can tag (cheap: no I/O)."""
    return os.path.splitext(os.fspath(path))[1].lower() in _OPENERS  # no pathlib: called per file of a walk


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


def decide(
    state: GenreState, ours: Sequence[str], policy: str
) -> tuple[tuple[str, ...] | None, str]:
    """The genres to write under ``policy``, or None to leave the file alone, plus why.

    ``keep`` never overwrites a genre a person set, but refreshes one this tool
    wrote; ``merge`` appends ours after theirs; ``replace`` overwrites (the
    caller keeps the old value). A result equal (case aside) to what the file
    holds is None.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown genre policy {policy!r}; expected one of {POLICIES}")
    new = clean_genres(ours)
    if not new:
        return None, "no genres to write"
    current = state.genres
    if policy == "keep":
        if not current:
            reason = "file had no genre"
        elif state.ours:
            reason = "refreshing the genre this tool wrote"
        else:
            return None, "keeping the genre set by a person"
    elif policy == "merge":
        new = clean_genres([*current, *new])
        reason = "merged with the existing genre" if current else "file had no genre"
    else:
        reason = "replacing the existing genre" if current else "file had no genre"
    if _fold(new) == _fold(current):  # a change of case alone is not worth a rewrite
        return None, "file already has these genres"
    return new, reason


def _open(path: Path, kind: Path | None = None) -> Handler:
    """The handler for ``path``, chosen by the extension of ``kind`` (default: ``path``)."""
    suffix = (kind or path).suffix.lower()
    opener = _OPENERS.get(suffix)
    if opener is None:
        raise TagError(f"{kind or path}: unsupported format {suffix or '(no extension)'}")
    try:
        return opener(path)
    except Exception as exc:  # mutagen parses untrusted bytes; any failure means "unreadable"
        raise _error(kind or path, exc, "unreadable or corrupt") from exc


def _error(path: Path, exc: BaseException, what: str) -> TagError:
    """A TagError with a one-line reason, spotting permission problems mutagen wraps."""
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, PermissionError):
            return TagError(f"{path}: permission denied")
        if isinstance(chain, FileNotFoundError):
            return TagError(f"{path}: no such file")
        chain = chain.__cause__ or chain.__context__
    lines = str(exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    return TagError(f"{path}: {what} ({detail})")


def read_state(path: str | os.PathLike[str], *, separator: str = DEFAULT_SEPARATOR) -> GenreState:
    """What genre the file holds and our marker; ``separator`` splits ID3v2.3's single value."""
    handler = _open(Path(path))
    try:
        genres = clean_genres(handler.genres(separator))
        marker = Marker.loads(handler.marker())
    except Exception as exc:
        raise _error(Path(path), exc, "unreadable tags") from exc
    return GenreState(genres, marker)


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
    if marker is not None and _fold(clean_genres(marker.genres)) != _fold(values):
        raise ValueError("marker.genres must be the genres being written")
    text = marker.dumps() if marker is not None else None

    def tag(copy: Path) -> None:
        handler = _open(copy, kind=path)
        try:
            handler.set(values, text, separator)
            handler.save()
        except Exception as exc:
            raise _error(path, exc, "cannot write tags") from exc

    _replace_safely(path, tag, expect)


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
        raise TagError(f"{path}: not a regular file")
    if expect is not None and _identity(st) != _identity(expect):
        raise FileChanged(f"{path}: changed since its tags were read; left as it is")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=_TMP_SUFFIX, dir=real.parent)
    except OSError as exc:
        raise _error(path, exc, "cannot create a temporary file next to it") from exc
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as dst, real.open("rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        change(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        _copy_metadata(real, tmp, st)
        try:
            now = os.stat(real)
        except FileNotFoundError:
            raise FileChanged(f"{path}: moved or deleted while being tagged; left as it is") from None
        if _identity(now) != _identity(st):
            raise FileChanged(f"{path}: changed while being tagged; left as it is")
        os.replace(tmp, real)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _error(path, exc, "cannot write") from exc
        raise
    _fsync_dir(real.parent)


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
