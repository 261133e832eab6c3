"""Scoring a model on labelled data: accuracy, per-genre precision/recall, confusion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dataset import Dataset


@dataclass
class Report:
    labels: list[str]
    truth: np.ndarray  # per clip
    predicted: np.ndarray  # per clip
    ids: list[str]
    probabilities: np.ndarray | None = None  # per clip, every model label

    @property
    def n(self) -> int:
        return int(len(self.truth))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.truth == self.predicted)) if self.n else 0.0

    def confusion(self) -> np.ndarray:
        k = len(self.labels)
        m = np.zeros((k, k), dtype=np.int64)
        np.add.at(m, (self.truth, self.predicted), 1)
        return m

    def per_genre(self) -> dict[str, dict[str, float | int]]:
        m = self.confusion()
        out: dict[str, dict[str, float | int]] = {}
        for i, g in enumerate(self.labels):
            tp = int(m[i, i])
            support = int(m[i].sum())
            predicted = int(m[:, i].sum())
            out[g] = {
                "precision": tp / predicted if predicted else 0.0,
                "recall": tp / support if support else 0.0,
                "support": support,
            }
        return out

    def to_json(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "n": self.n,
            "per_genre": self.per_genre(),
            "labels": self.labels,
            "confusion": self.confusion().tolist(),
        }

    def text(self) -> str:
        lines = [f"accuracy {self.accuracy:.2%} on {self.n} clips", "", f"{'genre':<12}{'precision':>10}{'recall':>8}{'n':>5}"]
        for g, r in self.per_genre().items():
            lines.append(f"{g:<12}{r['precision']:>10.2%}{r['recall']:>8.2%}{r['support']:>5}")
        lines += ["", "confusion (rows: truth, columns: predicted)", " " * 12 + "".join(f"{g[:5]:>6}" for g in self.labels)]
        for g, row in zip(self.labels, self.confusion(), strict=True):
            lines.append(f"{g:<12}" + "".join(f"{v:>6}" for v in row))
        return "\n".join(lines)


def clip_probabilities(window_probs: np.ndarray, data: Dataset) -> np.ndarray:
    """Mean of each clip's window probabilities (the same rule inference uses)."""
    sums = np.zeros((data.n_clips, window_probs.shape[1]))
    counts = np.bincount(data.clip, minlength=data.n_clips)[:, None]
    np.add.at(sums, data.clip, window_probs)
    return sums / np.maximum(counts, 1)


def report_from(window_probs: np.ndarray, data: Dataset, model_labels: list[str], among: list[str] | None = None) -> Report:
    """Score clip predictions; data labels are mapped onto the model's by name.

    With ``among`` (the data's genres), a model with a larger vocabulary is scored on
    its choice among those genres only (GTZAN has no electronic to be right about).
    """
    index = {g: i for i, g in enumerate(model_labels)}
    missing = [g for g in data.labels if g not in index]
    if missing:
        raise ValueError(f"data has genres the model does not know: {', '.join(missing)}")
    truth = np.zeros(data.n_clips, dtype=np.int64)
    truth[data.clip] = [index[data.labels[y]] for y in data.y]
    probs = clip_probabilities(window_probs, data)
    if among is not None and list(among) != list(model_labels):
        keep = np.array([index[g] for g in among])
        predicted = keep[probs[:, keep].argmax(axis=1)]
    else:
        predicted = probs.argmax(axis=1)
    return Report(list(model_labels), truth, predicted, data.ids, probs)


def abstentions(report: Report, min_confidence: float, none_label: str | None = None) -> dict[str, float | int]:
    """What a scan at ``min_confidence`` would write on these clips: nothing, right, wrong."""
    if report.probabilities is None:
        raise ValueError("the report has no probabilities")
    from .scoring import written

    top, write = written(report.probabilities, report.labels, min_confidence, none_label)
    none = np.array([report.labels[t] == none_label for t in top])
    nothing = ~write
    right = write & (top == report.truth)
    n = max(1, report.n)
    written = int((~nothing).sum())
    return {
        "min_confidence": float(min_confidence),
        "nothing": int(nothing.sum()),
        "none_of_its_genres": int(none.sum()),
        "written": written,
        "right": int(right.sum()),
        "wrong": written - int(right.sum()),
        "precision": float(right.sum() / written) if written else 0.0,
        "right_share": float(right.sum() / n),
    }


def plot_confusion(report: Report, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report.confusion()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    ax.imshow(m, cmap="Blues")
    k = len(report.labels)
    ax.set_xticks(range(k), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), report.labels)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title or f"accuracy {report.accuracy:.1%} (n={report.n})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(histories: list[list[dict]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for i, h in enumerate(histories):
        ep = [r["epoch"] for r in h]
        a1.plot(ep, [r["loss"] for r in h], label=f"member {i} train")
        watched = [r for r in h if "val_loss" in r]  # every epoch, or every few (--select last)
        if watched:
            vep = [r["epoch"] for r in watched]
            a1.plot(vep, [r["val_loss"] for r in watched], "--", label=f"member {i} valid")
            a2.plot(vep, [r["val_accuracy"] for r in watched], label=f"member {i}")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend(fontsize=7)
    a2.set_xlabel("epoch")
    a2.set_ylabel("valid accuracy (EMA weights)")
    if a2.lines:  # nothing to show when valid was never watched
        a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
