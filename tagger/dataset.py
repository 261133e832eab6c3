"""Labelled data for training and evaluation, in the two layouts people have.

- *PNG layout*: ``<genre>/<id>.png`` images drawn from the representation
  (``shared/data/gtzan-mel-png``), optionally with ``splits/*.txt`` files.
- *Audio layout*: ``<Genre>/…/*.flac`` (any depth, any format ``tagger.audio`` decodes).

Both become ``Dataset`` objects holding uint8 windows. Audio is decoded once into a
cache (``.npz`` per file, keyed by path, size, mtime and representation version)
so a second ``tagger train`` does not decode again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import features

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".aif", ".aiff", ".aifc", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".wma", ".asf"}
)


@dataclass
class Dataset:
    """Windows with labels; ``clip`` says which track each window came from."""

    x: np.ndarray  # (n_windows, N_MELS, N_COLUMNS) uint8
    y: np.ndarray  # (n_windows,) int64 index into labels
    clip: np.ndarray  # (n_windows,) int64 index into ids
    ids: list[str]  # "<genre>/<name>" per clip
    labels: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_clips(self) -> int:
        return len(self.ids)

    def summary(self) -> dict[str, object]:
        per = {g: int(np.sum(self.y[np.unique(self.clip, return_index=True)[1]] == i)) for i, g in enumerate(self.labels)}
        return {"clips": self.n_clips, "windows": int(len(self.x)), "per_genre": per, "failed": len(self.failures)}


def read_split(path: str | Path) -> list[str]:
    """``<genre>/<id>`` lines (blank lines and ``#`` comments ignored)."""
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line.removesuffix(".png"))
    return ids


def is_png_layout(root: str | Path) -> bool:
    root = Path(root)
    return any(True for _ in root.glob("*/*.png"))


def genre_folders(root: str | Path) -> list[str]:
    """Genre labels are the sub-folder names, lower-cased, sorted."""
    root = Path(root)
    names = sorted({p.name.lower() for p in root.iterdir() if p.is_dir() and p.name not in {"splits"} and not p.name.startswith(".")})
    if not names:
        raise ValueError(f"{root}: no genre sub-folders")
    return names


def list_items(root: str | Path) -> list[tuple[str, Path, str]]:
    """Every labelled file under ``root`` as ``(id, path, genre)``; id is ``<genre>/<stem>``."""
    root = Path(root)
    png = is_png_layout(root)
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "splits" and not p.name.startswith(".")):
        genre = d.name.lower()
        if png:
            files = sorted(d.glob("*.png"))
        else:
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith("."))
        for f in files:
            items.append((f"{genre}/{f.stem}", f, genre))
    return items


def _cache_key(path: Path, max_windows: int) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{features.REPRESENTATION_VERSION}|{max_windows}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def load_windows_cached(path: Path, cache_dir: Path | None, max_windows: int) -> np.ndarray:
    """Decode a file's windows, through the feature cache when one is given."""
    if path.suffix.lower() == ".png":
        return features.decode_png(path)[None]
    from . import audio

    if cache_dir is None:
        return audio.load_windows(path, max_windows)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{_cache_key(path, max_windows)}.npz"
    if target.exists():
        with np.load(target) as z:
            return z["x"]
    x = audio.load_windows(path, max_windows)
    tmp = target.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, x=x)
    os.replace(tmp, target)
    return x


def load_dataset(
    root: str | Path,
    ids: Iterable[str] | None = None,
    *,
    labels: list[str] | None = None,
    cache_dir: Path | None = None,
    max_windows: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Load the items of ``root`` (restricted to ``ids`` when given).

    Unreadable files are collected in ``failures`` rather than stopping the load,
    so one broken file in a user's folder does not sink a training run.
    """
    root = Path(root)
    labels = labels or genre_folders(root)
    index = {g: i for i, g in enumerate(labels)}
    items = list_items(root)
    if ids is not None:
        wanted = list(ids)
        by_id = {i: (p, g) for i, p, g in items}
        missing = [i for i in wanted if i.lower() not in {k.lower() for k in by_id}]
        if missing:
            raise ValueError(f"{len(missing)} ids of the split are not in {root} (first: {missing[0]})")
        lower = {k.lower(): k for k in by_id}
        items = [(lower[i.lower()], *by_id[lower[i.lower()]]) for i in wanted]
    xs, ys, clips, kept, failures = [], [], [], [], []
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    if not is_png_layout(root):
        from .audio import AudioError

        errors = (AudioError, *errors)
    for n, (item_id, path, genre) in enumerate(items):
        if progress:
            progress(n, len(items))
        if genre not in index:
            failures.append((str(path), f"genre {genre!r} is not one of the model's labels"))
            continue
        try:
            w = load_windows_cached(path, cache_dir, max_windows)
        except errors as exc:
            failures.append((str(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        xs.append(w)
        ys.append(np.full(len(w), index[genre], dtype=np.int64))
        clips.append(np.full(len(w), len(kept), dtype=np.int64))
        kept.append(item_id)
    if progress:
        progress(len(items), len(items))
    if not xs:
        raise ValueError(f"{root}: no usable labelled files" + (f" ({failures[0][1]})" if failures else ""))
    return Dataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(clips), kept, labels, failures)
