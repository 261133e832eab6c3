"""One genre write, as any machine that sees the file makes it: the order and its result.

Apart from :mod:`tagger.library` (which decides the writes and records them) so that a
machine that only writes, a Ray worker node's writer, imports the tag handlers and
nothing of the database layer (SQLAlchemy): the writer's CPU in a scan fell by about half
(``benchmarks/ray_by_hand.py``, docs/cluster.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from tagger import tags


def fold(genres: Iterable[str]) -> tuple[str, ...]:
    return tuple(g.casefold() for g in genres)


@dataclass(frozen=True)
class WriteOrder:
    """One genre write, all that the machine making it needs (small, picklable).

    ``seen`` is the file as the scan last looked at it: ``(st_dev, st_ino, st_size,
    st_mtime_ns)``. ``remote``: the write is made on another machine than the one that
    looked (a cluster node), whose device and inode numbers for the same file may differ,
    or match by chance (FUSE and SMB mounts number them per mount): only size and mtime
    are compared there.
    """

    path: str
    genres: tuple[str, ...]
    marker: tags.Marker | None
    separator: str
    seen: tuple[int, int, int, int]
    remote: bool = False


@dataclass(frozen=True)
class Written:
    """What became of a :class:`WriteOrder`: the file's new size and mtime, or why not."""

    size: int = 0
    mtime: float = 0.0
    changed: bool = False  # the file was not the one looked at: nothing was written
    error: str | None = None  # the one-line reason the write failed


def write_tags(order: WriteOrder) -> Written:
    """Make ``order``'s write on this machine; a bad file is a :class:`Written`, never a raise.

    Safe to run twice (a task retried after its machine was lost): a file that already
    holds exactly this write is reported written, not changed. Device and inode numbers
    are compared only on the machine that looked at the file (``order.remote`` is false
    there): another machine's mount of the same share has its own.
    """
    path = order.path
    dev, ino, size, mtime_ns = order.seen
    try:
        now: os.stat_result | None = os.stat(path)
    except OSError:
        now = None  # write_genres says why, as it does locally
    if now is not None:
        same_file = order.remote or (now.st_dev, now.st_ino) == (dev, ino)
        if not (same_file and (now.st_size, now.st_mtime_ns) == (size, mtime_ns)):
            return _already(order) or Written(changed=True)
    try:
        tags.write_genres(path, order.genres, order.marker, separator=order.separator, expect=now)
    except tags.FileChanged:
        # Changed under the write: by someone else, or by this very write's other run (a
        # task retried while its first run still went on, on a node cut off for a while).
        return _already(order) or Written(changed=True)
    except tags.TagError as exc:
        return Written(error=exc.reason)
    st = os.stat(path)
    return Written(st.st_size, st.st_mtime)


def _already(order: WriteOrder) -> Written | None:
    """The file as written, where it already holds exactly ``order``'s write; else ``None``."""
    if not _holds(order):
        return None
    try:
        st = os.stat(order.path)
    except OSError:
        return None
    return Written(st.st_size, st.st_mtime)


def _holds(order: WriteOrder) -> bool:
    """Whether the file already holds exactly what ``order`` writes (genres and marker)."""
    try:
        state = tags.read_state(order.path, separator=order.separator)
    except tags.TagError:
        return False
    return fold(state.genres) == fold(order.genres) and state.marker == order.marker


__all__ = ["WriteOrder", "Written", "fold", "write_tags"]
