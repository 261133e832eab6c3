"""What a person sees: of the files tagger writes a genre into, how many are right.

A written genre is right when the track's source allows it (the label map in
:mod:`tagger.vocabulary`), wrong otherwise; a track tagger writes nothing into
(below ``min_confidence``, or "none of my genres" first) counts as nothing. The
figures a threshold buys: ``right`` and ``wrong`` as shares of all tracks,
``nothing``, and ``precision`` = right / written. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..vocabulary import NONE_LABEL

DEFAULT_THRESHOLDS = (0.0, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)


def track_mean(window_probs: np.ndarray, tracks: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Mean of each track's window probabilities (the rule a scan uses), tracks in first-seen order."""
    order: dict[str, int] = {}
    inv = np.array([order.setdefault(t, len(order)) for t in tracks])
    sums = np.zeros((len(order), window_probs.shape[1]))
    np.add.at(sums, inv, window_probs)
    return sums / np.bincount(inv)[:, None], list(order)


def written(probs: np.ndarray, labels: Sequence[str], threshold: float, none_label: str | None = NONE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """The top label of each row and whether a scan at ``threshold`` writes it."""
    top = probs.argmax(axis=1)
    none = np.array([labels[t] == none_label for t in top], dtype=bool)
    return top, (probs.max(axis=1) >= threshold) & ~none


def outcomes(probs: np.ndarray, labels: Sequence[str], allowed: Sequence[frozenset[str]], threshold: float) -> dict[str, float | int]:
    """Right / wrong / nothing / precision of writing the top genre at ``threshold``."""
    top, write = written(probs, labels, threshold)
    right = write & np.array([labels[t] in a for t, a in zip(top, allowed, strict=True)])
    n = max(1, len(top))
    w = int(write.sum())
    return {
        "n": int(len(top)),
        "right": float(right.sum() / n),
        "wrong": float((write & ~right).sum() / n),
        "nothing": float(1 - w / n),
        "precision": float(right.sum() / w) if w else 0.0,
    }


def curve(probs: np.ndarray, labels: Sequence[str], allowed: Sequence[frozenset[str]], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict]:
    """:func:`outcomes` at every threshold."""
    return [{"threshold": float(t), **outcomes(probs, labels, allowed, t)} for t in thresholds]


def choose_threshold(rows: Sequence[dict], precision: float = 0.8) -> float:
    """The lowest threshold whose precision reaches ``precision`` (the highest tried if none does)."""
    for r in sorted(rows, key=lambda r: r["threshold"]):
        if r["precision"] >= precision and r["right"] > 0:
            return float(r["threshold"])
    return float(max(r["threshold"] for r in rows))


def by_group(probs: np.ndarray, labels: Sequence[str], allowed: Sequence[frozenset[str]], groups: Sequence[str], threshold: float) -> dict[str, dict]:
    """:func:`outcomes` for each group (e.g. the source's genre names)."""
    out = {}
    g = np.asarray(groups)
    for name in sorted(set(groups)):
        m = g == name
        out[name] = outcomes(probs[m], labels, [a for a, k in zip(allowed, m, strict=True) if k], threshold)
    return out


def plot_curve(rows: Sequence[dict], path, marks: Mapping[str, float] | None = None, title: str = "") -> None:
    """Precision and right/wrong shares against ``min_confidence`` (``tagger evaluate --plot``).

    ``marks``: vertical lines, each with what it is (``{"min_confidence in the config": 0.6}``):
    the legend names them, so a training run's suggestion is not read as the default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(t, [r["precision"] for r in rows], "o-", label="precision of written genres")
    ax.plot(t, [r["right"] for r in rows], "s-", label="right (share of all tracks)")
    ax.plot(t, [r["wrong"] for r in rows], "^-", label="wrong (share of all tracks)")
    ax.plot(t, [r["nothing"] for r in rows], "x--", label="nothing written")
    for (what, at), style in zip((marks or {}).items(), (":", "-."), strict=False):
        ax.axvline(at, color="grey", ls=style, label=f"{what} {at:.2f}")
    ax.set_xlabel("min_confidence")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
