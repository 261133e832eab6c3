"""Training: augmentation, schedule, checkpoints, ensembles.

Small data (a few hundred clips) makes single runs swing from epoch to epoch, so
the recipe leans on things that steady them: random time crops with SpecAugment
masks and mixup, cosine learning-rate decay, an exponential moving average of the
weights (evaluated with re-estimated BatchNorm statistics), and an ensemble of
members trained from different seeds, averaged in one saved model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import features
from ..dataset import Dataset


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved next to the model."""

    epochs: int = 60
    batch_size: int = 32
    crop: int = 160
    learning_rate: float = 2e-3
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.3
    time_masks: int = 2
    time_mask_width: int = 24
    freq_masks: int = 2
    freq_mask_width: int = 16
    ema_momentum: float = 0.99
    patience: int = 20
    #: "best": keep each member's best epoch on valid (optimistic: valid then
    #: overstates accuracy); "last": train the fixed number of epochs and keep the
    #: end, valid only watched — the honest choice for a model whose valid figure
    #: is reported.
    select: str = "best"
    members: int = 1
    seed: int = 1234
    arch: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def band_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-mel-band mean and std of the training windows, in [0, 1] units."""
    xf = x.astype(np.float32) / features.LEVELS
    mean = xf.mean(axis=(0, 2))
    std = xf.std(axis=(0, 2)) + 1e-3
    return mean.tolist(), std.tolist()


def spec_masks(out: np.ndarray, cfg, rng: np.random.Generator) -> None:
    """SpecAugment, in place: ``cfg.time_masks`` time and ``cfg.freq_masks`` band masks per window.

    ``cfg`` is any config with ``time_masks``, ``time_mask_width``, ``freq_masks`` and
    ``freq_mask_width`` (``TrainConfig``, the distillation's ``DistillConfig``).
    """
    n, bands, width = out.shape
    for i in range(n):
        for _ in range(cfg.time_masks):
            w = int(rng.integers(0, cfg.time_mask_width + 1))
            s = int(rng.integers(0, width - w + 1))
            out[i, :, s : s + w] = 0.0
        for _ in range(cfg.freq_masks):
            w = int(rng.integers(0, cfg.freq_mask_width + 1))
            s = int(rng.integers(0, bands - w + 1))
            out[i, s : s + w, :] = 0.0


def augment_batch(
    x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random crops + SpecAugment masks + mixup, on uint8 levels (what the model eats)."""
    n, bands, width = x.shape
    crop = min(cfg.crop, width)
    starts = rng.integers(0, width - crop + 1, size=n)
    out = np.stack([x[i, :, s : s + crop] for i, s in enumerate(starts)]).astype(np.float32)
    spec_masks(out, cfg, rng)
    target = np.full((n, n_classes), cfg.label_smoothing / n_classes, dtype=np.float32)
    target[np.arange(n), y] += 1.0 - cfg.label_smoothing
    if cfg.mixup_alpha > 0:
        lam = rng.beta(cfg.mixup_alpha, cfg.mixup_alpha, size=n).astype(np.float32)
        lam = np.maximum(lam, 1 - lam)
        perm = rng.permutation(n)
        out = lam[:, None, None] * out + (1 - lam[:, None, None]) * out[perm]
        target = lam[:, None] * target + (1 - lam[:, None]) * target[perm]
    return np.rint(out).astype(np.uint8), target


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _predict(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[i : i + batch], training=False)) for i in range(0, len(x), batch)])


def clip_accuracy(probs: np.ndarray, data: Dataset) -> float:
    """Accuracy per clip, with window probabilities averaged over each clip."""
    from .evaluate import clip_probabilities

    truth = np.zeros(data.n_clips, dtype=np.int64)
    truth[data.clip] = data.y
    return float(np.mean(clip_probabilities(probs, data).argmax(1) == truth))


def recalibrate_bn(model, x: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, batches: int = 40) -> None:
    """Re-estimate BatchNorm statistics for the current (averaged) weights.

    Weight averaging moves the weights away from where the running statistics
    were gathered; a few forward passes in training mode over clean crops put
    them back in step.
    """
    import keras

    bns = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.8
    clean = TrainConfig(**{**cfg.to_dict(), "mixup_alpha": 0.0, "time_masks": 0, "freq_masks": 0})
    for _ in range(batches):
        idx = rng.integers(0, len(x), size=min(len(x), 64))
        xb, _ = augment_batch(x[idx], np.zeros(len(idx), dtype=np.int64), 1, clean, rng)
        model(xb, training=True)
    for b, m in zip(bns, saved, strict=True):
        b.momentum = m


class EMA:
    """Exponential moving average of every model variable (weights, not BN stats)."""

    def __init__(self, model, momentum: float):
        self.model = model
        self.momentum = momentum
        self.shadow = [np.array(v.numpy()) for v in model.trainable_variables]
        self.steps = 0

    def update(self) -> None:
        # Warm-up: early on, the average would be mostly the random initialisation.
        self.steps += 1
        m = min(self.momentum, (1 + self.steps) / (10 + self.steps))
        for s, v in zip(self.shadow, self.model.trainable_variables, strict=True):
            s *= m
            s += (1 - m) * np.asarray(v.numpy())

    def swap(self) -> None:
        for s, v in zip(self.shadow, self.model.trainable_variables, strict=True):
            cur = np.array(v.numpy())
            v.assign(s)
            s[...] = cur


Progress = Callable[[dict], None]


def train_member(
    train: Dataset,
    valid: Dataset | None,
    cfg: TrainConfig,
    seed: int,
    *,
    checkpoint_dir: Path | None = None,
    progress: Progress | None = None,
    init=None,
):
    """Train one DenseNet; returns ``(model, history)`` with the best EMA weights.

    ``init``: a DenseNet of the same architecture to start from (e.g. a student
    distilled from the teacher), with its input normalisation, instead of random weights.

    The checkpoint (weights, EMA shadow, optimizer step, history) is written each
    epoch, so a run that is interrupted resumes at the next epoch.
    """
    import keras

    from .densenet import DenseNetConfig, build_densenet

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = len(train.labels)
    if init is not None:
        norm = init.get_layer("levels_norm")
        mean, std = norm.mean_values, norm.std_values
    else:
        mean, std = band_stats(train.x)
    model = build_densenet(n_classes, DenseNetConfig.from_dict(cfg.arch) if cfg.arch else None, band_mean=mean, band_std=std)
    if init is not None:
        model.set_weights(init.get_weights())
    steps = max(1, math.ceil(len(train.x) / cfg.batch_size))
    total = steps * cfg.epochs
    optimizer = keras.optimizers.Adam(learning_rate=cfg.learning_rate)
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy())
    ema = EMA(model, cfg.ema_momentum)
    history: list[dict] = []
    start_epoch = 0
    best = (-1.0, None, None)  # valid accuracy, weights, epoch
    ckpt = checkpoint_dir / f"member{seed}.ckpt.npz" if checkpoint_dir else None
    if ckpt and ckpt.exists():
        start_epoch, history, best = _load_checkpoint(ckpt, model, ema)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        order = rng.permutation(len(train.x))
        losses = []
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            optimizer.learning_rate = _lr_at(epoch * steps + s, total, cfg.warmup_epochs * steps, cfg.learning_rate)
            xb, yb = augment_batch(train.x[idx], train.y[idx], n_classes, cfg, rng)
            losses.append(float(model.train_on_batch(xb, yb)))
            ema.update()
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": float(optimizer.learning_rate.numpy()), "seconds": 0.0}
        # With fixed epochs valid is only watched: every few epochs is enough for the curves.
        watch = cfg.select == "best" or (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs
        if valid is not None and watch:
            ema.swap()
            saved_bn = _bn_state(model)
            recalibrate_bn(model, train.x, cfg, rng, batches=8)
            probs = _predict(model, valid.x)
            acc = clip_accuracy(probs, valid)
            row["val_accuracy"] = acc
            row["val_loss"] = float(-np.mean(np.log(probs[np.arange(len(probs)), valid.y] + 1e-9)))
            if acc > best[0] and cfg.select == "best":
                best = (acc, [np.array(v.numpy()) for v in model.variables], epoch + 1)
            _restore_bn(model, saved_bn)
            ema.swap()
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        if progress:
            progress({**row, "member": seed, "epochs": cfg.epochs, "best": best[0]})
        if ckpt:
            _save_checkpoint(ckpt, epoch + 1, model, ema, history, best)
        if cfg.select == "best" and valid is not None and best[2] is not None and epoch + 1 - best[2] >= cfg.patience:
            break
    if cfg.select == "best" and valid is not None and best[1] is not None:
        for v, w in zip(model.variables, best[1], strict=True):
            v.assign(w)
    else:
        ema.swap()
        recalibrate_bn(model, train.x, cfg, rng)
    return model, history


def _bn_state(model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.non_trainable_variables]


def _restore_bn(model, state: list[np.ndarray]) -> None:
    for v, s in zip(model.non_trainable_variables, state, strict=True):
        v.assign(s)


def _save_checkpoint(path: Path, epoch: int, model, ema: EMA, history: list[dict], best) -> None:
    arrays = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update({f"e{i}": s for i, s in enumerate(ema.shadow)})
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    if best[1] is not None:
        arrays.update({f"b{i}": w for i, w in enumerate(best[1])})
    meta = {"epoch": epoch, "history": history, "best_acc": best[0], "best_epoch": best[2]}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def _load_checkpoint(path: Path, model, ema: EMA):
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        for i, v in enumerate(model.variables):
            v.assign(z[f"v{i}"])
        for i in range(len(ema.shadow)):
            ema.shadow[i] = np.array(z[f"e{i}"])
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        for i, v in enumerate(model.optimizer.variables):
            if f"o{i}" in z:
                v.assign(z[f"o{i}"])
        best_w = [np.array(z[f"b{i}"]) for i in range(len(model.variables))] if "b0" in z else None
    return meta["epoch"], meta["history"], (meta["best_acc"], best_w, meta["best_epoch"])


def run_training(
    train: Dataset,
    valid: Dataset | None,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    name: str,
    data_summary: dict,
    progress: Progress | None = None,
    jobs: int = 1,
):
    """Train ``cfg.members`` DenseNets, average them into one model, save the bundle.

    Checkpoints go to ``out_dir/checkpoints``; rerunning the same command after an
    interruption skips finished members and resumes the one in progress. With
    ``jobs > 1`` members train in parallel processes, one thread each: on a few
    CPU cores that beats one process whose small convolutions cannot use them all.
    """
    from .. import quiet

    quiet.load_backend()
    import keras

    from . import densenet
    from .evaluate import plot_confusion, plot_curves, report_from
    from .export import save_bundle

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    members, histories = [], []
    seeds = [cfg.seed + k for k in range(cfg.members)]
    todo = [s for s in seeds if not (ckpt_dir / f"member{s}.keras").exists() or not (ckpt_dir / f"member{s}.history.json").exists()]
    if jobs > 1 and len(todo) > 1:
        _train_parallel(train, valid, cfg, todo, ckpt_dir, jobs, progress)
    else:
        for seed in todo:
            _train_and_save(train, valid, cfg, seed, ckpt_dir, progress)
    for seed in seeds:
        members.append(keras.saving.load_model(ckpt_dir / f"member{seed}.keras", compile=False))
        histories.append(json.loads((ckpt_dir / f"member{seed}.history.json").read_text()))
    model = densenet.ensemble(members)
    seconds = sum(r["seconds"] for h in histories for r in h)  # epochs of every member, resumed ones too
    metrics: dict = {"members": [max((r.get("val_accuracy", 0.0) for r in h), default=None) for h in histories]}
    if valid is not None:
        probs = _predict(model, valid.x)
        report = report_from(probs, valid, train.labels)
        metrics["valid"] = report.to_json()
        plot_confusion(report, out_dir / "confusion.png", title=f"valid accuracy {report.accuracy:.1%} (n={report.n})")
    plot_curves(histories, out_dir / "curves.png")
    training = {
        "data": data_summary,
        "config": cfg.to_dict(),
        "epochs_run": [len(h) for h in histories],
        "seconds": round(seconds, 1),
        "parameters": int(model.count_params()),
        "backend": keras.backend.backend(),
    }
    bundle = save_bundle(out_dir, model, train.labels, name=name, training=training, metrics=metrics)
    (out_dir / "history.json").write_text(json.dumps(histories))
    return bundle, metrics


def _train_and_save(train, valid, cfg, seed, ckpt_dir: Path, progress) -> None:
    model, history = train_member(train, valid, cfg, seed, checkpoint_dir=ckpt_dir, progress=progress)
    tmp = ckpt_dir / f".member{seed}.tmp.keras"
    model.save(tmp)
    tmp.replace(ckpt_dir / f"member{seed}.keras")
    (ckpt_dir / f"member{seed}.history.json").write_text(json.dumps(history))


def _job_init() -> None:
    import os

    from ..lifeline import die_with_parent

    die_with_parent()  # a killed `tagger train` takes its jobs with it
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from .. import quiet

    quiet.load_backend()


def _job(args) -> int:
    train, valid, cfg, seed, ckpt_dir = args
    _train_and_save(train, valid, cfg, seed, ckpt_dir, lambda row: print(json.dumps(row), flush=True))
    return seed


def _train_parallel(train, valid, cfg, seeds, ckpt_dir: Path, jobs: int, progress) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=ctx, initializer=_job_init) as pool:
        futures = [pool.submit(_job, (train, valid, cfg, s, ckpt_dir)) for s in seeds]
        for fut in as_completed(futures):
            seed = fut.result()
            if progress:
                progress({"member": seed, "finished": True})
