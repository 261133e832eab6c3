"""Training on mixed data: GTZAN's folders plus windows labelled in another source's words.

``tagger train DATA --teacher musicnn --labelled windows.npz`` (the ``.csv`` beside
it gives each window's source genres, artist and source) builds the frozen-branch
model on a larger vocabulary:

1. Every window's labels become the *set* its source allows (:mod:`tagger.vocabulary`);
   the vocabulary is GTZAN's folders plus every mapped label with at least
   ``min_windows`` windows, plus "none of my genres" where the data has it.
2. The head (standardise → principal components → softmax) is fitted on the sets
   (:func:`tagger.model.partial.fit_softmax`).
3. Artist-grouped k-fold cross-validation over all the windows gives held-out logits:
   the temperature is fitted on them (so probabilities mean what they say), and they
   give the precision/coverage curve the default ``min_confidence`` is read from.
4. The head is fitted once more on everything, the temperature folded into it.

GTZAN has no artist names here: its clips are grouped in runs of ten consecutive
numbers within each genre and split (GTZAN is mostly ordered by artist; the
fault-filtered split itself keeps artists apart), a documented approximation.
Training-side only.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import vocabulary as vocab_
from ..dataset import Dataset
from ..model import partial, scoring
from .branch import Head, HeadConfig, PatchCache, head_features
from .top import TopConfig, fit_tops, interleave, musicnn_top_weights, tops_logits


@dataclass
class Labelled:
    """Windows with their source's genre names, and what groups and tracks they belong to."""

    x: np.ndarray  # (N, N_MELS, N_COLUMNS) uint8
    names: list[str]  # the source's genres of each window, as the source wrote them
    groups: list[str]  # cross-validation groups (artist)
    tracks: list[str]  # windows of one track are averaged, as a scan does
    sources: list[str]

    def __len__(self) -> int:
        return len(self.x)


class LabelledError(ValueError):
    """Labelled windows that cannot be used (one line)."""


def from_dataset(ds: Dataset, split: str = "train", source: str = "gtzan") -> Labelled:
    """A folder dataset (GTZAN) as labelled windows; groups are runs of ten clip numbers."""
    names, groups, tracks = [], [], []
    for c, y in zip(ds.clip, ds.y, strict=True):
        cid = ds.ids[c]
        genre = ds.labels[y]
        m = re.search(r"(\d+)$", cid)
        block = int(m.group(1)) // 10 if m else cid
        names.append(genre)
        groups.append(f"{source}/{genre}/{split}/{block}")
        tracks.append(cid)
    return Labelled(ds.x, names, groups, tracks, [source] * len(ds.x))


def load_labelled(path: str | Path) -> Labelled:
    """``levels`` and ``ids`` from ``path`` (.npz) and ``genres`` (+ ``artist``, ``source``) from the .csv beside it.

    A window id ``X#n`` is window n of track X. Windows without an artist are grouped by track.
    """
    path = Path(path)
    table = path.with_suffix(".csv")
    try:
        with np.load(path) as z:
            if "levels" not in z.files or "ids" not in z.files:
                raise LabelledError(f"{path}: needs arrays 'levels' and 'ids'")
            x, ids = z["levels"], [str(i) for i in z["ids"]]
    except (OSError, ValueError) as exc:
        if isinstance(exc, LabelledError):
            raise
        raise LabelledError(f"{path}: not a readable .npz ({exc})") from None
    if x.dtype != np.uint8 or x.ndim != 3:
        raise LabelledError(f"{path}: 'levels' must be uint8 (N, bands, columns), not {x.dtype} {x.shape}")
    if not table.is_file():
        raise LabelledError(f"{path}: no {table.name} beside it with each window's genres")
    with table.open(newline="", encoding="utf-8") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    if rows and "genres" not in next(iter(rows.values())):
        raise LabelledError(f"{table}: needs columns 'id' and 'genres'")
    missing = [i for i in ids if i not in rows]
    if missing:
        raise LabelledError(f"{table}: {len(missing)} windows have no row (first: {missing[0]})")
    names, groups, tracks, sources = [], [], [], []
    for i in ids:
        r = rows[i]
        track = i.split("#")[0]
        artist = (r.get("artist") or "").strip().casefold()
        names.append(r["genres"])
        groups.append(f"artist/{artist}" if artist else f"track/{track}")
        tracks.append(track)
        sources.append((r.get("source") or path.stem).strip())
    return Labelled(x, names, groups, tracks, sources)


def concat(parts: Sequence[Labelled]) -> Labelled:
    return Labelled(
        np.concatenate([p.x for p in parts]),
        [n for p in parts for n in p.names],
        [g for p in parts for g in p.groups],
        [t for p in parts for t in p.tracks],
        [s for p in parts for s in p.sources],
    )


def choose_vocabulary(base: Sequence[str], data: Labelled, table: Mapping[str, frozenset[str]], min_windows: int = 20) -> list[str]:
    """``base`` plus every label the data allows on at least ``min_windows`` windows (sorted)."""
    counts: Counter[str] = Counter()
    for n in data.names:
        a = vocab_.allowed(n, table)
        if a:
            counts.update(a)
    extra = {g for g, k in counts.items() if k >= min_windows}
    return sorted(set(base) | extra)


def targets(data: Labelled, vocabulary: Sequence[str], table: Mapping[str, frozenset[str]]) -> tuple[np.ndarray, np.ndarray]:
    """The training mask ``(N, K)`` (labels each window allows) and which windows have one."""
    index = {g: i for i, g in enumerate(vocabulary)}
    mask = np.zeros((len(data), len(vocabulary)), bool)
    for i, n in enumerate(data.names):
        a = vocab_.allowed(n, table, vocabulary)
        for g in a or ():
            if g in index:
                mask[i, index[g]] = True
    return mask, mask.any(axis=1)


def truth_sets(data: Labelled, table: Mapping[str, frozenset[str]]) -> list[frozenset[str]]:
    """What a written genre is scored against: every label the source allows (none: all wrong)."""
    out = []
    for n in data.names:
        a = vocab_.allowed(n, table) or frozenset()
        out.append(a - {vocab_.NONE_LABEL})
    return out


def grouped_folds(groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold number of every window: whole groups (artists) go to one fold."""
    names = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    fold = {names[j]: n % k for n, j in enumerate(order)}
    return np.array([fold[g] for g in groups])


def fit_head(f: np.ndarray, mask: np.ndarray, cfg: HeadConfig, weights: np.ndarray | None = None) -> Head:
    """Standardise, principal components, softmax fitted on label sets (temperature 1)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(f)
    z = sc.transform(f)
    dim = min(cfg.embedding_dim, z.shape[0] - 1, z.shape[1])
    pca = PCA(n_components=dim, random_state=0).fit(z)
    coef, intercept = partial.fit_softmax(pca.transform(z), mask, weights=weights, l2=cfg.l2)
    return Head(sc.mean_, sc.scale_, pca.components_, pca.mean_, coef, intercept)


@dataclass
class Fitted:
    """The linear head and the fine-tuned tops fitted on some windows, pooled as the shipped model pools them."""

    head: Head
    tops: list
    cfg: HeadConfig

    def logits(self, f: np.ndarray, xt: np.ndarray | None) -> np.ndarray:
        """Pooled logits over the temperature (``xt``: the heard patches): ``softmax`` of these is what a scan sees."""
        c = self.cfg
        z = self.head.logits(f) / c.linear_temperature
        if self.tops and xt is not None:
            z = (1 - c.top_weight) * z + c.top_weight * tops_logits(self.tops, xt) / c.top_temperature
        return z / c.temperature + _bias(c, z.shape[-1])

    def folded(self) -> tuple[Head, list]:
        """The head and tops with the pool's weights and temperatures folded into their last
        layers: the sum of their logits is :meth:`logits`, what the exported graph adds up."""
        c = self.cfg
        w_lin = (1 - c.top_weight) if self.tops else 1.0
        scale = w_lin / (c.linear_temperature * c.temperature)
        h = self.head
        head = Head(h.mean, h.scale, h.components, h.pca_mean, h.coef * scale, h.intercept * scale + _bias(c, len(h.intercept)))
        tops = [t.scaled(c.top_weight / (len(self.tops) * c.top_temperature * c.temperature)) for t in self.tops]
        return head, tops


def fit_all(f: np.ndarray, xt: np.ndarray | None, mask: np.ndarray, cfg: HeadConfig, start: dict | None, say: Callable[[str], None] = lambda s: None) -> Fitted:
    """The linear head on ``f`` and, when ``cfg.top`` asks for members, the tops on ``xt`` ``(N, 10, 1506)``."""
    head = fit_head(f, mask, cfg)
    tops: list = []
    if xt is not None and cfg.top.get("members", 0) > 0:
        tops = fit_tops(xt, mask, TopConfig(**cfg.top), cfg.patches, start=start or {}, seed=cfg.seed, say=say)
    return Fitted(head, tops, cfg)


def held_out(
    f: np.ndarray,
    xt: np.ndarray | None,
    mask: np.ndarray,
    keep: np.ndarray,
    groups: Sequence[str],
    cfg: HeadConfig,
    start: dict | None,
    k: int,
    say: Callable[[str], None] = lambda s: None,
    fold_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out logits of the linear head and of the tops (``None`` without tops): k folds grouped by artist.

    The folds are drawn with ``fold_seed`` (default ``cfg.seed``, which also seeds the tops):
    another draw of the folds with the same tops' seeds, to see how much a figure owes to one
    draw (``benchmarks/real_music.py --fold-seed``)."""
    from .musicnn import Bridge

    fold = grouped_folds(groups, k, cfg.seed if fold_seed is None else fold_seed)
    lin = np.zeros(mask.shape)
    top = np.zeros(mask.shape) if xt is not None and cfg.top.get("members", 0) > 0 else None
    idx = Bridge.patch_indices(cfg.patches)
    for i in range(k):
        tr = (fold != i) & keep
        te = fold == i
        fitted = fit_all(f[tr], xt[tr] if top is not None else None, mask[tr], cfg, start, say)
        lin[te] = fitted.head.logits(f[te])
        if top is not None:
            top[te] = tops_logits(fitted.tops, xt[te][:, idx])
        say(f"  fold {i + 1}/{k}: {int(tr.sum())} windows fitted, {int(te.sum())} held out")
    return lin, top


def _bias(cfg: HeadConfig, n: int) -> np.ndarray:
    return np.zeros(n) if cfg.prior_bias is None else np.asarray(cfg.prior_bias, dtype=np.float64)


def prior_bias(z: np.ndarray, shift: float) -> np.ndarray:
    """Per-genre logit shift toward balanced genres: ``-shift * log(mean softmax(z))``, centred.

    No labels are read: only how often the model itself leans to each genre on ``z``."""
    p = partial.softmax(z).mean(axis=0)
    b = -shift * np.log(np.clip(p, 1e-12, None))
    return b - b.mean()


def calibrate(lin: np.ndarray, top: np.ndarray | None, mask: np.ndarray, keep: np.ndarray, cfg: HeadConfig) -> np.ndarray:
    """Each branch's temperature, then the pool's (all fitted on held-out logits, set in ``cfg``); the pooled probabilities."""
    return partial.softmax(calibrated_logits(lin, top, mask, keep, cfg))


def calibrated_logits(lin: np.ndarray, top: np.ndarray | None, mask: np.ndarray, keep: np.ndarray, cfg: HeadConfig) -> np.ndarray:
    """:func:`calibrate`'s pooled logits, over every row, with the temperatures (and the prior
    shift's bias, :func:`prior_bias`) fitted on the rows ``keep`` (set in ``cfg``)."""
    cfg.linear_temperature = partial.fit_temperature(lin[keep], mask[keep])
    z = lin / cfg.linear_temperature
    if top is not None:
        cfg.top_temperature = partial.fit_temperature(top[keep], mask[keep])
        z = (1 - cfg.top_weight) * z + cfg.top_weight * top / cfg.top_temperature
    cfg.temperature = partial.fit_temperature(z[keep], mask[keep])
    z = z / cfg.temperature
    cfg.prior_bias = prior_bias(z[keep], cfg.prior_shift).tolist() if cfg.prior_shift else None
    return z + _bias(cfg, z.shape[-1])


def cv_report(probs: np.ndarray, data: Labelled, labels: Sequence[str], table: Mapping[str, frozenset[str]], base: Sequence[str], precision: float) -> dict:
    """Held-out figures: GTZAN accuracy among its genres, and the real-music curve per track."""
    labels = list(labels)
    src = np.array(data.sources)
    report: dict = {}
    g = src == "gtzan"
    if g.any():
        gi = [labels.index(x) for x in base if x in labels]
        tp, tracks = scoring.track_mean(probs[g], [t for t, m in zip(data.tracks, g, strict=True) if m])
        truth = {t: n for t, n, m in zip(data.tracks, data.names, g, strict=True) if m}
        pred = [labels[gi[j]] for j in tp[:, gi].argmax(axis=1)]
        report["gtzan"] = {"tracks": len(tracks), "accuracy_among_its_genres": float(np.mean([p == truth[t] for p, t in zip(pred, tracks, strict=True)]))}
    idx = np.where(~g)[0]
    if len(idx):
        tp, tracks, allowed, names = per_track(probs[idx], data, idx, table)
        rows = scoring.curve(tp, labels, allowed)
        chosen = scoring.choose_threshold(rows, precision)
        report["real_music"] = {
            "tracks": len(tracks),
            "curve": rows,
            "min_confidence": chosen,
            "at_min_confidence": scoring.outcomes(tp, labels, allowed, chosen),
            "per_source_genre": scoring.by_group(tp, labels, allowed, names, chosen),
        }
    return report


def per_track(probs: np.ndarray, data: Labelled, rows: Sequence[int], table: Mapping[str, frozenset[str]]) -> tuple[np.ndarray, list[str], list[frozenset[str]], list[str]]:
    """Window probabilities of ``data``'s windows ``rows`` as tracks: their mean, the tracks,
    what each track's source allows, and its source genre group (for per-genre tables)."""
    tp, tracks = scoring.track_mean(probs, [data.tracks[i] for i in rows])
    first: dict[str, int] = {}
    for i in rows:
        first.setdefault(data.tracks[i], i)
    truth = truth_sets(data, table)
    allowed = [truth[first[t]] for t in tracks]
    names = [_genre_group(data.names[first[t]], data.sources[first[t]]) for t in tracks]
    return tp, tracks, allowed, names


def _genre_group(names: str, source: str) -> str:
    """The first genre a source names (``Pop/Rock; Electronic`` → ``Pop/Rock``), with the source's short name."""
    first = re.split(r"\s*;\s*", names.strip())[0] or "?"
    short = source.split()[0] if source else ""
    return f"{short}: {first}" if short else first


def run_mixed_training(
    train: Dataset,
    valid: Dataset | None,
    labelled: Labelled,
    cfg: HeadConfig,
    out_dir: Path,
    *,
    name: str,
    data_summary: dict,
    cache_dir: Path | None,
    table: Mapping[str, frozenset[str]] | None = None,
    vocabulary: Sequence[str] | None = None,
    cv: int = 5,
    precision: float = 0.8,
    progress: Callable[[str], None] | None = None,
):
    """Cross-validate, calibrate, fit on everything, build, evaluate on ``valid``, save the bundle."""
    from ..model.evaluate import plot_confusion, report_from
    from ..model.export import save_bundle
    from .branch import build_branch_model
    from .checkpoint import load_musicnn

    say = progress or (lambda s: None)
    table = dict(table or vocab_.SOURCE_MAP)
    t0 = time.time()
    data = concat([from_dataset(train), labelled])
    labels = list(vocabulary) if vocabulary else choose_vocabulary(train.labels, data, table)
    unknown = [g for g in train.labels if g not in labels]
    if unknown:
        raise ValueError(f"the vocabulary leaves out the data's genres: {', '.join(unknown)}")
    mask, keep = targets(data, labels, table)
    say(f"vocabulary ({len(labels)}): {', '.join(labels)}; {int(keep.sum())} of {len(data)} windows have a label in it")
    cache = PatchCache(cache_dir, cfg.log10_gain)
    say(f"teacher features of {len(data)} windows (cached in {cache_dir})")
    mean, mx = cache.outputs(data.x, progress=lambda i, n: say(f"  {i}/{n}") if i % 128 == 0 or i == n else None)
    f = head_features(mean, mx, data.x, cfg)
    with_tops = cfg.top.get("members", 0) > 0
    xt = interleave(mean, mx) if with_tops else None
    musicnn = load_musicnn()
    start = musicnn_top_weights(musicnn) if with_tops else None
    metrics: dict = {}
    if cv >= 2:
        say(f"{cv}-fold cross-validation, grouped by artist" + (f" ({cfg.top['members']} fine-tuned tops a fold)" if with_tops else ""))
        lin, top = held_out(f, xt, mask, keep, data.groups, cfg, start, cv, say)
        probs = calibrate(lin, top, mask, keep, cfg)
        pooled = np.log(np.clip(probs, 1e-12, None))
        metrics["cv"] = {"folds": cv, "temperature": cfg.temperature, "held_out_set_nll": partial.set_nll(pooled[keep], mask[keep]), **cv_report(probs, data, labels, table, train.labels, precision)}
        say(f"temperature {cfg.temperature:.3f}")
    say("fitting on every window")
    fitted = fit_all(f[keep], xt[keep] if with_tops else None, mask[keep], cfg, start, say)
    head, tops = fitted.folded()
    model = build_branch_model(musicnn, head, cfg, len(labels), tops=tops)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if valid is not None:
        say(f"evaluating on {len(valid.x)} validation windows")
        wp = np.concatenate([np.asarray(model.predict_on_batch(valid.x[i : i + 16])[0]) for i in range(0, len(valid.x), 16)])
        report = report_from(wp, valid, labels, among=valid.labels)
        metrics["valid"] = report.to_json()
        plot_confusion(report, Path(out_dir) / "confusion.png", title=f"valid accuracy {report.accuracy:.1%} (n={report.n})")
    if "real_music" in metrics.get("cv", {}):
        rm = metrics["cv"]["real_music"]
        scoring.plot_curve(rm["curve"], Path(out_dir) / "precision.png", {"suggested by this training run": rm["min_confidence"]}, title=f"held-out real music ({rm['tracks']} tracks, {cv}-fold by artist)")
    seconds = time.time() - t0
    training = {
        "data": {**data_summary, "labelled": {"windows": len(labelled), "with_a_label": int(keep[len(train.x):].sum()), "groups": len(set(labelled.groups))}},
        "route": "frozen musicnn branch + linear head" + (f" + {len(tops)} fine-tuned musicnn tops" if tops else "") + " on label sets, calibrated",
        "head": cfg.to_dict(),
        "vocabulary": labels,
        "label_map": {k: sorted(v) for k, v in sorted(table.items())},
        "teacher": {
            "model": "MSD_musicnn (musicnn 0.1.0, ISC licence, Music Technology Group, Universitat Pompeu Fabra)",
            "checkpoint": "MSD_musicnn",
        },
        "densenet": None,
        "seconds": round(seconds, 1),
        "parameters": int(model.count_params()),
    }
    bundle = save_bundle(out_dir, model, labels, name=name, training=training, metrics=metrics, extra={"embedding_dim": int(head.components.shape[0]), "runtime": {"cpu_chunk": 1}})
    return bundle, metrics
