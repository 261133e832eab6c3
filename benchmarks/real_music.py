"""What users see on real music: right / wrong / nothing / precision of the written genre.

The visible proxy of the owners' real-song check: the extra-music windows
(AllMusic previews, Magnatune excerpts; ``../shared/data/extra-music``), scored per
track (windows of one track averaged, as a scan does) against the source's genres
through the label map (``tagger/vocabulary.py``), next to GTZAN valid.

- A bundle trained on those windows (the shipped model) cannot be scored on them:
  its recipe (``training.head`` in ``bundle.json``: patches, embedding size, L2) is
  refitted under artist-grouped k-fold cross-validation over GTZAN train + valid and
  the windows, temperature included; GTZAN valid comes from the same recipe fitted on
  GTZAN train + the windows (the selection run).
- Any other bundle (e.g. an earlier model) is run as it is, with ONNX Runtime.

    python benchmarks/real_music.py [--model BUNDLE] [--threshold P] [--folds 5]
        [--fold-seed N] [--head mel_stats=false] [--top KEY=VALUE]

Needs the train extra (the teacher) for the first kind. Prints tables; ``--json`` too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
#: The linear head's settings that ``--head`` may change; the recipe refitted is these and
#: the ones after, read from the bundle (the temperatures are fitted again).
HEAD_SETTINGS = ("patches", "embedding_dim", "l2", "mel_stats", "patch_std", "band_corr", "prior_shift")
RECIPE_SETTINGS = (*HEAD_SETTINGS, "log10_gain", "seed", "top", "top_weight")


def _table(rows, chosen: float) -> str:
    out = [f"{'min_confidence':>14} {'right':>6} {'wrong':>6} {'nothing':>8} {'precision':>9}"]
    for r in rows:
        mark = "  <- threshold" if abs(r["threshold"] - chosen) < 1e-9 else ""
        out.append(f"{r['threshold']:>14.2f} {r['right']:>6.1%} {r['wrong']:>6.1%} {r['nothing']:>8.1%} {r['precision']:>9.1%}{mark}")
    return "\n".join(out)


def _groups(per: dict) -> str:
    out = [f"{'source genre':<28}{'n':>5} {'right':>6} {'wrong':>6} {'nothing':>8} {'precision':>9}"]
    for g, r in sorted(per.items(), key=lambda kv: -kv[1]["n"]):
        out.append(f"{g:<28}{r['n']:>5} {r['right']:>6.1%} {r['wrong']:>6.1%} {r['nothing']:>8.1%} {r['precision']:>9.1%}")
    return "\n".join(out)


def first_windows(data, rows, n: int) -> list[int]:
    """Of ``rows``, the first ``n`` windows of each track (a scan hears at most ``max_windows``).

    The first, not the middle ones a scan of the excerpt would take: the data holds windows,
    not the audio. For a 30-second preview (one window) the two are the same; for a
    one-minute Emotify excerpt (two) the scan's middle 30 s would straddle both."""
    seen: dict[str, int] = {}
    out = []
    for i in rows:
        k = seen.get(data.tracks[i], 0)
        if k < n:
            out.append(i)
        seen[data.tracks[i]] = k + 1
    return out


def calibration_variants(lin, top, mask, keep, fold, cfg, data, idx, labels, table, gtzan_labels, gtzan_rows, threshold: float, k: int) -> dict:
    """Calibrations of the pooled held-out logits, each fitted on k-1 folds and applied to the kth.

    - ``temperatures``: the shipped calibration (each branch's, then the pool's);
    - ``+ per-genre bias`` / ``+ vector scaling (L2 λ)``: a bias (and a scale) per genre on
      top of the temperatures, fitted by the same label-set likelihood, pulled towards none
      by an L2 penalty;
    - ``per-genre thresholds``: the temperatures, and for each genre the lowest threshold
      (at least the default) at which its writes on the other folds' real tracks reach
      80 % precision (never written where none does, with at least 5 tracks to judge by).

    Scored at ``threshold`` (``--threshold``, else the configured ``min_confidence``) like
    the main table.
    """
    import dataclasses

    from scipy.optimize import minimize

    from tagger import vocabulary
    from tagger.model import partial, scoring
    from tagger.teacher import mixed

    n, c = mask.shape

    def temperatures(sel):  # on a copy: the caller's cfg keeps the temperatures fitted on every fold
        return mixed.calibrated_logits(lin, top, mask, sel, dataclasses.replace(cfg))

    def affine(z, sel, lam, scale):
        zs, ms, w = z[sel], mask[sel], np.full(int(sel.sum()), 1.0 / int(sel.sum()))

        def loss(th):
            a, b = (th[:c], th[c:]) if scale else (np.ones(c), th)
            value, gz = partial._set_nll(zs * a + b, ms, w)
            value += lam * (np.sum((a - 1) ** 2) + np.sum(b**2))
            gb = gz.sum(0) + 2 * lam * b
            return value, (np.r_[(gz * zs).sum(0) + 2 * lam * (a - 1), gb] if scale else gb)

        th = minimize(loss, np.r_[np.ones(c), np.zeros(c)] if scale else np.zeros(c), jac=True, method="L-BFGS-B").x
        return (th[:c], th[c:]) if scale else (np.ones(c), th)

    kinds = {"temperatures (shipped)": None, "+ per-genre bias": (1e-3, False)}
    kinds.update({f"+ vector scaling (L2 {lam:g})": (lam, True) for lam in (1e-3, 1e-2, 1e-1)})
    probs = {name: np.zeros((n, c)) for name in kinds}
    for i in range(k):
        tr, te = (fold != i) & keep, fold == i
        z = temperatures(tr)
        for name, how in kinds.items():
            a, b = (np.ones(c), np.zeros(c)) if how is None else affine(z, tr, *how)
            probs[name][te] = partial.softmax(z[te] * a + b)

    gi = [labels.index(x) for x in gtzan_labels if x in labels]
    truth = {t: nm for t, nm, m in zip(data.tracks, data.names, gtzan_rows, strict=True) if m}

    def gtzan_accuracy(p):
        tp, tracks = scoring.track_mean(p[gtzan_rows], [t for t, m in zip(data.tracks, gtzan_rows, strict=True) if m])
        return float(np.mean([labels[gi[j]] == truth[t] for j, t in zip(tp[:, gi].argmax(axis=1), tracks, strict=True)]))

    grid = np.round(np.arange(0.30, 0.96, 0.01), 2)
    out = {}
    for name, p in probs.items():
        tp, tracks, allowed, names = mixed.per_track(p[idx], data, idx, table)
        rows = scoring.curve(tp, labels, allowed, grid)
        best = max((r for r in rows if r["precision"] >= 0.8), key=lambda r: r["right"], default=None)
        out[name] = {**scoring.outcomes(tp, labels, allowed, threshold), "best_right": best["right"] if best else 0.0, "best_threshold": best["threshold"] if best else None, "gtzan_cv_accuracy": gtzan_accuracy(p)}

    # per-genre thresholds on the temperatures' probabilities, chosen on the other folds' tracks
    p = probs["temperatures (shipped)"]
    tp, tracks, allowed, names = mixed.per_track(p[idx], data, idx, table)
    first: dict[str, int] = {}
    for i in idx:
        first.setdefault(data.tracks[i], i)
    tf = np.array([fold[first[t]] for t in tracks])
    choice, conf = tp.argmax(axis=1), tp.max(axis=1)
    ok = np.array([labels[j] in al for j, al in zip(choice, allowed, strict=True)])
    none = labels.index(vocabulary.NONE_LABEL) if vocabulary.NONE_LABEL in labels else -1
    write = np.zeros(len(tracks), bool)
    for i in range(k):
        tr, te = tf != i, tf == i
        cut = np.full(c, np.inf)
        for j in range(c):
            for t in grid[grid >= threshold]:
                m = tr & (choice == j) & (conf >= t)
                if m.sum() < 5 or ok[m].mean() >= 0.8:
                    cut[j] = t
                    break
        write[te] = (conf[te] >= cut[choice[te]]) & (choice[te] != none)
    right, wrong = float((write & ok).mean()), float((write & ~ok).mean())
    out["per-genre thresholds (80 %)"] = {"n": len(tracks), "right": right, "wrong": wrong, "nothing": 1 - right - wrong, "precision": right / max(right + wrong, 1e-9), "best_right": None, "best_threshold": None, "gtzan_cv_accuracy": out["temperatures (shipped)"]["gtzan_cv_accuracy"]}
    return out


def _settings(config: type, given: list[str], flag: str, names: tuple[str, ...] | None = None) -> dict:
    """``KEY=VALUE`` settings of the dataclass ``config`` (only ``names``, if given) as typed
    values, checked before anything is loaded; ``{}`` without importing anything for none."""
    import dataclasses

    types = {f.name: type(f.default) for f in dataclasses.fields(config) if names is None or f.name in names}
    out: dict = {}
    for item in given:
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise SystemExit(f"{flag} {item}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        if types[key] is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"{flag} {item}: expected true or false")
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            out[key] = types[key](value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle directory (default: the shipped model)")
    ap.add_argument("--data", default=str(SHARED / "gtzan-mel-png"))
    ap.add_argument("--labelled", default=str(SHARED / "extra-music" / "windows.npz"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=None, help="min_confidence to report per genre (default: [tags] min_confidence)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "teacher-cache"), help="teacher feature cache")
    ap.add_argument("--windows", type=int, default=None, help="windows of a track scored, its first ones, as a scan with [model] max_windows hears them (default: the config's)")
    ap.add_argument("--variants", action="store_true", help="also compare calibrations, each fitted on 4 folds' held-out logits and applied to the 5th: temperatures, per-genre bias, vector scaling, per-genre thresholds (the shipped model's kind of bundle only)")
    ap.add_argument("--top", action="append", default=[], metavar="KEY=VALUE", help="refit the shipped recipe with this setting of its fine-tuned tops changed (tagger.teacher.top.TopConfig: members, epochs, learning_rate, mixup_alpha, first_seed, ...); repeatable")
    ap.add_argument("--head", action="append", default=[], metavar="KEY=VALUE", help="refit the shipped recipe with this setting of its linear head changed (tagger.teacher.branch.HeadConfig: mel_stats, patch_std, band_corr, patches, embedding_dim, l2); repeatable")
    ap.add_argument("--fold-seed", type=int, default=None, help="draw the artist-grouped folds with this seed instead of the recipe's (the tops keep their seeds): another draw of the same cross-validation")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    head_overrides, top_overrides = {}, {}
    if a.head or a.top:  # the teacher's settings classes import Keras
        from tagger.teacher.branch import HeadConfig
        from tagger.teacher.top import TopConfig

        head_overrides = _settings(HeadConfig, a.head, "--head", HEAD_SETTINGS)
        top_overrides = _settings(TopConfig, a.top, "--top")
    if not Path(a.labelled).is_file() or not Path(a.data).is_dir():
        print(f"needs {a.labelled} and {a.data} (../shared)", file=sys.stderr)
        return 2

    from tagger import vocabulary
    from tagger.config import ModelConfig, TagsConfig
    from tagger.dataset import load_dataset, read_split
    from tagger.model import scoring
    from tagger.model.bundle import load_bundle
    from tagger.model.evaluate import abstentions, report_from
    from tagger.teacher import mixed

    # scoring's thresholds, and every hundredth from 0.50 to 0.70, where a default is chosen
    curve_thresholds = sorted({*scoring.DEFAULT_THRESHOLDS, *(round(0.5 + i / 100, 2) for i in range(21))})

    threshold = TagsConfig().min_confidence if a.threshold is None else a.threshold
    windows = ModelConfig().max_windows if a.windows is None else a.windows
    bundle = load_bundle(a.model)
    labels = bundle.labels
    training = bundle.meta.get("training", {})
    data_root = Path(a.data)
    train = load_dataset(data_root, read_split(data_root / "splits/train.txt"))
    valid = load_dataset(data_root, read_split(data_root / "splits/valid.txt"), labels=train.labels)
    extra = mixed.load_labelled(a.labelled)
    table = {k: frozenset(v) for k, v in training.get("label_map", {}).items()} or vocabulary.SOURCE_MAP
    saw_extra = "labelled" in training.get("data", {})
    if not saw_extra and (a.top or a.head or a.fold_seed is not None):
        print(f"--top, --head and --fold-seed refit a recipe; {bundle.name} is run as it is (it never saw the extra-music windows)", file=sys.stderr)
        return 2
    result: dict = {"windows_per_track": windows, "model": {"name": bundle.name, "sha256": bundle.sha256}, "threshold": threshold}
    if saw_extra:
        from tagger.model import partial
        from tagger.teacher.branch import HeadConfig, PatchCache, head_features
        from tagger.teacher.musicnn import Bridge
        from tagger.teacher.top import interleave, musicnn_top_weights

        head = training["head"]
        cfg = HeadConfig(**{k: head[k] for k in RECIPE_SETTINGS if k in head})
        mode = f"recipe refitted under {a.folds}-fold cross-validation grouped by artist"
        if a.top:
            cfg.top = {**cfg.top, **top_overrides}
            mode += " with the tops' " + ", ".join(a.top)
            result["top_overrides"] = a.top
        if a.head:
            for key, value in head_overrides.items():
                setattr(cfg, key, value)
            mode += " with the head's " + ", ".join(a.head)
            result["head_overrides"] = a.head
        fold_seed = cfg.seed if a.fold_seed is None else a.fold_seed
        if a.fold_seed is not None:
            mode += f", folds drawn with seed {a.fold_seed}"
            result["fold_seed"] = a.fold_seed
        data = mixed.concat([mixed.from_dataset(train), mixed.from_dataset(valid, "valid"), extra])
        mean, mx = PatchCache(Path(a.cache), cfg.log10_gain).outputs(data.x)
        f = head_features(mean, mx, data.x, cfg)
        with_tops = cfg.top.get("members", 0) > 0
        xt = interleave(mean, mx) if with_tops else None
        start = musicnn_top_weights() if with_tops else None
        if with_tops:
            mode += f", {cfg.top['members']} fine-tuned tops a fold"
        mask, keep = mixed.targets(data, labels, table)
        lin, top = mixed.held_out(f, xt, mask, keep, data.groups, cfg, start, a.folds, fold_seed=fold_seed)
        probs = mixed.calibrate(lin, top, mask, keep, cfg)
        t = cfg.temperature
        rep = mixed.cv_report(probs, data, labels, table, train.labels, 0.8)
        # GTZAN valid: the recipe fitted on GTZAN train + the windows, these temperatures
        n_tr = len(train.x)
        sel = np.r_[np.arange(n_tr), np.arange(n_tr + len(valid.x), len(data))]
        sel = sel[keep[sel]]
        fitted = mixed.fit_all(f[sel], xt[sel] if with_tops else None, mask[sel], cfg, start)
        va = np.arange(n_tr, n_tr + len(valid.x))
        vp = partial.softmax(fitted.logits(f[va], xt[va][:, Bridge.patch_indices(cfg.patches)] if with_tops else None))
        vrep = report_from(vp, valid, labels, among=valid.labels)
        # the real-music tracks as a scan with [model] max_windows hears them
        idx = first_windows(data, [i for i, s in enumerate(data.sources) if s != "gtzan"], windows)
        tp, tracks, allowed, names = mixed.per_track(probs[idx], data, idx, table)
        real_probs_rows = {"curve": scoring.curve(tp, labels, allowed, curve_thresholds), "tracks": len(tracks)}
        result["temperature"] = t
        result["gtzan_cv_accuracy"] = rep["gtzan"]["accuracy_among_its_genres"]
        if a.variants:
            fold = mixed.grouped_folds(data.groups, a.folds, fold_seed)
            gtzan_rows = np.array([s == "gtzan" for s in data.sources])
            result["calibration_variants"] = calibration_variants(lin, top, mask, keep, fold, cfg, data, idx, labels, table, train.labels, gtzan_rows, threshold, a.folds)
    else:
        from tagger.model.infer import Classifier

        mode = "bundle run as it is (it never saw these windows)"
        clf = Classifier(bundle, workers=0)
        idx = first_windows(extra, range(len(extra)), windows)
        tp, tracks, allowed, names = mixed.per_track(clf.predict_windows(extra.x[idx]), extra, idx, table)
        real_probs_rows = {"curve": scoring.curve(tp, labels, allowed, curve_thresholds), "tracks": len(tracks)}
        vrep = report_from(clf.predict_windows(valid.x), valid, labels, among=valid.labels)
        if (training.get("data", {}).get("train") or {}).get("clips", 0) > len(train.ids):
            mode += "; NOTE: it was trained on GTZAN train + valid, so its valid figure is not held out"
    at = scoring.outcomes(tp, labels, allowed, threshold)
    result.update(
        mode=mode,
        real_music={"tracks": len(tracks), "curve": real_probs_rows["curve"], "at_threshold": at, "per_source_genre": scoring.by_group(tp, labels, allowed, names, threshold)},
        gtzan_valid={"accuracy_among_its_genres": vrep.accuracy, "n": vrep.n, "at_threshold": abstentions(vrep, threshold, vocabulary.NONE_LABEL)},
    )
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"model {bundle.name} ({bundle.sha256[:12]}): {mode}")
    print(f"\nreal music, {len(tracks)} tracks (extra-music, at most {windows} window(s) a track), written genre scored against the source's genres")
    print(_table(result["real_music"]["curve"], threshold))
    print(f"\nper source genre at min_confidence {threshold:.2f}")
    print(_groups(result["real_music"]["per_source_genre"]))
    g = result["gtzan_valid"]
    z = g["at_threshold"]
    print(f"\nGTZAN valid ({g['n']} clips): accuracy among its genres {g['accuracy_among_its_genres']:.1%}; at min_confidence {threshold:.2f}: "
          f"{z['written']} written ({z['right']} right, {z['wrong']} wrong, precision {z['precision']:.1%}), {z['nothing']} nothing ({z['none_of_its_genres']} 'none of my genres')")
    if "calibration_variants" in result:
        print(f"\ncalibrations, each fitted on the other folds' held-out logits; real music at min_confidence {threshold:.2f}")
        print(f"{'calibration':<34}{'right':>7}{'wrong':>7}{'precision':>10}  {'right at precision >= 80 %':>27}  {'GTZAN CV':>8}")
        for name, r in result["calibration_variants"].items():
            best = "-" if r["best_right"] is None else f"{r['best_right']:.1%} (>= {r['best_threshold']:.2f})" if r["best_threshold"] else "never"
            print(f"{name:<34}{r['right']:>7.1%}{r['wrong']:>7.1%}{r['precision']:>10.1%}  {best:>27}  {r['gtzan_cv_accuracy']:>8.1%}")
    if "gtzan_cv_accuracy" in result:
        print(f"GTZAN train + valid, cross-validated: accuracy among its genres {result['gtzan_cv_accuracy']:.1%}; temperature {result['temperature']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
