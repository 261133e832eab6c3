"""The distilled route: a DenseNet student that learns to hear like musicnn.

The student sees only our representation; at scan time it is a plain DenseNet
(no teacher, DenseNet speed). Training has two stages.

1. Distillation, on labelled and unlabelled windows alike (e.g.
   ``../shared/data/extra-music``): for every crop the student reproduces what the
   teacher heard in the 3-second patches that crop covers —

   - the teacher's 50 tag probabilities, pooled (mean) over those patches — soft
     binary cross-entropy;
   - the teacher's 200-unit penultimate layer, pooled the same way and
     standardised — mean squared error.

   Crops start and end on patch boundaries so each crop's target is exactly the
   pooling of cached per-patch outputs (``PatchCache``). A genre loss can sit
   beside them (``genre_weight``), but trained jointly from the start the genre
   loss climbed and the student learnt little of the teacher (docs/model.md).
2. Fine-tuning: the DenseNet recipe of ``tagger.model.train`` on the labelled
   windows, starting from the distilled weights.

Training-side only (Keras/TensorFlow and the teacher's checkpoint); the bundle it
writes is an ordinary DenseNet bundle.
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
from ..model.train import spec_masks
from . import bridge as br

N_TAGS = 50
N_PENULTIMATE = 200


@dataclass
class DistillConfig:
    """Everything that decides a distillation run; saved in the bundle."""

    #: stage 1, distillation: passes over the unlabelled windows
    epochs: int = 30
    batch_size: int = 32
    #: crop width in teacher patches (4 patches ≈ 12 s ≈ 155 columns, like the DenseNet's 160-column crop)
    crop_patches: int = 4
    #: lower than the DenseNet's 2e-3: with a third of each batch labelled, 2e-3 made the
    #: genre loss climb at its peak, with or without the teacher's losses (short checks)
    learning_rate: float = 5e-4
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.3
    time_masks: int = 2
    time_mask_width: int = 24
    freq_masks: int = 2
    freq_mask_width: int = 16
    ema_momentum: float = 0.99
    #: labelled windows in every batch (the rest unlabelled), so the genre loss always
    #: averages over as many windows, whatever the mix of the data
    labelled_per_batch: int = 12
    #: genre loss during stage 1 (0: the teacher alone shapes the student; the labels
    #: come in stage 2)
    genre_weight: float = 0.0
    #: stage 2: the DenseNet recipe (``tagger.model.train``) on the labelled windows,
    #: from the distilled weights, 0 to skip; its learning rate is below the recipe's
    #: 2e-3 so it refines what the teacher taught rather than starting over
    finetune_epochs: int = 60
    finetune_learning_rate: float = 1e-3
    tag_weight: float = 10.0
    penultimate_weight: float = 1.0
    seed: int = 1234
    log10_gain: float = br.DEFAULT_LOG10_GAIN
    arch: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def patch_starts() -> np.ndarray:
    """Column where each of the window's ten teacher patches starts, plus the end (11 values)."""
    t = br.column_times()
    bounds = np.arange(br.PATCHES_PER_WINDOW + 1) * br.PATCH_FRAMES * br.TEACHER_HOP / br.TEACHER_SAMPLE_RATE
    cols = np.searchsorted(t, bounds - 1e-9)
    return np.minimum(cols, features.N_COLUMNS)


def crop_targets(per_patch: np.ndarray, first: np.ndarray, n_patches: int) -> np.ndarray:
    """Mean of ``per_patch[i, first[i] : first[i] + n_patches]`` for every window ``i``: a crop's target."""
    idx = first[:, None] + np.arange(n_patches)[None, :]
    return np.take_along_axis(per_patch, idx[:, :, None], axis=1).astype(np.float32).mean(axis=1)


def distill_batch(
    x: np.ndarray,
    y: np.ndarray,
    tags: np.ndarray,
    pen: np.ndarray,
    n_classes: int,
    cfg: DistillConfig,
    rng: np.random.Generator,
    bounds: np.ndarray,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Patch-aligned crops + masks + mixup; targets ``[genre, tags, penultimate]``.

    ``y`` is -1 for an unlabelled window: its genre target is all zeros, so it adds
    nothing to the cross-entropy; mixup pairs labelled with labelled windows and
    unlabelled with unlabelled ones. The genre targets are rescaled so the genre loss
    is the mean over the labelled part of the batch, whatever that part's size.
    """
    n = len(x)
    first = rng.integers(0, br.PATCHES_PER_WINDOW - cfg.crop_patches + 1, size=n)
    width = int(np.max(bounds[cfg.crop_patches:] - bounds[: -cfg.crop_patches]))
    starts = np.minimum(bounds[first], features.N_COLUMNS - width)
    out = np.stack([x[i, :, s : s + width] for i, s in enumerate(starts)]).astype(np.float32)
    spec_masks(out, cfg, rng)
    genre = np.zeros((n, n_classes), np.float32)
    lab = y >= 0
    genre[lab] = cfg.label_smoothing / n_classes
    genre[np.flatnonzero(lab), y[lab]] += 1.0 - cfg.label_smoothing
    t_tags = crop_targets(tags, first, cfg.crop_patches)
    t_pen = crop_targets(pen, first, cfg.crop_patches)
    if cfg.mixup_alpha > 0:
        lam = rng.beta(cfg.mixup_alpha, cfg.mixup_alpha, size=n).astype(np.float32)
        lam = np.maximum(lam, 1 - lam)
        # Partners of the same kind: a labelled window mixed into an unlabelled one would
        # ask for the genre of the quieter half of a mixture, which no model can know.
        perm = np.arange(n)
        for group in (np.flatnonzero(lab), np.flatnonzero(~lab)):
            perm[group] = group[rng.permutation(len(group))]

        def mix(a: np.ndarray) -> np.ndarray:
            w = lam.reshape(-1, *([1] * (a.ndim - 1)))
            return w * a + (1 - w) * a[perm]

        out, genre, t_tags, t_pen = mix(out), mix(genre), mix(t_tags), mix(t_pen)
    mass = float(genre.sum())
    if mass > 0:
        genre *= n / mass
    return np.rint(out).astype(np.uint8), [genre, t_tags, t_pen]


class BatchPlan:
    """Which windows make each batch: ``labelled`` labelled ones (cycling through them)
    and the rest unlabelled; an epoch is one pass over the unlabelled windows (over the
    labelled ones when there are none). Indices: labelled first, then unlabelled."""

    def __init__(self, n_labelled: int, n_unlabelled: int, batch_size: int, labelled: int):
        self.n_lab, self.n_unl = n_labelled, n_unlabelled
        self.lab = min(labelled, batch_size) if n_unlabelled else batch_size
        self.unl = batch_size - self.lab
        self.steps = max(1, math.ceil((n_unlabelled / self.unl) if n_unlabelled and self.unl else n_labelled / batch_size))
        self._lab_order: list[int] = []

    def _labelled(self, rng: np.random.Generator, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k and self.n_lab:
            if not self._lab_order:
                self._lab_order = list(rng.permutation(self.n_lab))
            out.append(int(self._lab_order.pop()))
        return out

    def epoch(self, rng: np.random.Generator):
        unl = rng.permutation(self.n_unl) + self.n_lab if self.n_unl else np.zeros(0, np.int64)
        for s in range(self.steps):
            part = unl[s * self.unl : (s + 1) * self.unl] if self.n_unl else np.zeros(0, np.int64)
            idx = np.sort(np.concatenate([np.array(self._labelled(rng, self.lab), np.int64), part.astype(np.int64)]))
            if len(idx) >= 2:
                yield idx


def build_student(n_classes: int, cfg: DistillConfig, band_mean, band_std):
    """The DenseNet with two extra heads on its pooled features: tags (sigmoid) and penultimate (linear)."""
    import keras
    from keras import layers

    from ..model.densenet import DenseNetConfig, build_densenet

    base = build_densenet(n_classes, DenseNetConfig.from_dict(cfg.arch) if cfg.arch else None, band_mean=band_mean, band_std=band_std)
    feat = base.get_layer("dropout").output
    tags = layers.Dense(N_TAGS, activation="sigmoid", name="teacher_tags", dtype="float32")(feat)
    pen = layers.Dense(N_PENULTIMATE, name="teacher_penultimate", dtype="float32")(feat)
    return base, keras.Model(base.input, [base.output, tags, pen], name="student")


def _predict_all(model, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    parts = [model(x[i : i + batch], training=False) for i in range(0, len(x), batch)]
    return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]


def tag_agreement(student_tags: np.ndarray, teacher_tags: np.ndarray) -> float:
    """Mean over the 50 tags of the correlation, across windows, between student and teacher.

    Across windows, not across tags: matching the teacher's average tag profile
    (rock high, polka low) scores nothing; telling windows apart as it does scores.
    """
    a = student_tags - student_tags.mean(axis=0, keepdims=True)
    b = teacher_tags - teacher_tags.mean(axis=0, keepdims=True)
    return float(np.mean((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-9)))


def run_distillation(
    train: Dataset,
    valid: Dataset | None,
    extra: np.ndarray,
    cfg: DistillConfig,
    out_dir: Path,
    *,
    name: str,
    data_summary: dict,
    cache_dir: Path | None,
    progress: Callable[[str], None] | None = None,
):
    """Teacher targets (cached), student training (checkpointed per epoch), evaluation, bundle.

    ``extra``: unlabelled windows ``(M, 128, 387)`` uint8 that teach through the
    teacher only. Valid is watched every 5 epochs and never selects anything: the
    last epoch's averaged weights are kept.
    """
    from .. import quiet

    quiet.load_backend()
    import keras

    from ..model.evaluate import plot_confusion, plot_curves, report_from
    from ..model.export import save_bundle
    from ..model.train import (
        EMA,
        TrainConfig,
        _bn_state,
        _load_checkpoint,
        _lr_at,
        _predict,
        _restore_bn,
        _save_checkpoint,
        band_stats,
        clip_accuracy,
        recalibrate_bn,
        train_member,
    )
    from .branch import PatchCache

    say = progress or (lambda s: None)
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = np.concatenate([train.x, extra]) if len(extra) else train.x
    y = np.concatenate([train.y, np.full(len(extra), -1, np.int64)]) if len(extra) else train.y.astype(np.int64)
    cache = PatchCache(cache_dir, cfg.log10_gain)
    say(f"teacher targets of {len(x)} windows ({len(train.x)} labelled, {len(extra)} unlabelled; cached in {cache_dir})")
    tags, pen = cache.outputs(x, names=("tags", "penultimate"), progress=lambda i, n: say(f"  {i}/{n}") if i % 128 == 0 or i == n else None)
    pen32 = pen.astype(np.float32).reshape(-1, N_PENULTIMATE)
    # A floor on each unit's scale: a nearly dead unit would otherwise turn its rare
    # activations into targets of 80 standard deviations and swamp the loss.
    pen_mean, pen_std = pen32.mean(0), np.maximum(pen32.std(0), 0.25 * float(np.median(pen32.std(0))) + 1e-6)
    pen_z = ((pen.astype(np.float32) - pen_mean) / pen_std).astype(np.float16)
    teacher_seconds = time.time() - t_start

    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_classes = len(train.labels)
    mean, std = band_stats(x)
    base, student = build_student(n_classes, cfg, mean, std)
    batches = BatchPlan(len(train.x), len(x) - len(train.x), cfg.batch_size, cfg.labelled_per_batch)
    steps = batches.steps
    total = steps * cfg.epochs
    optimizer = keras.optimizers.Adam(learning_rate=cfg.learning_rate)
    student.compile(
        optimizer=optimizer,
        loss=[keras.losses.CategoricalCrossentropy(), keras.losses.BinaryCrossentropy(), keras.losses.MeanSquaredError()],
        loss_weights=[cfg.genre_weight, cfg.tag_weight, cfg.penultimate_weight],
    )
    ema = EMA(student, cfg.ema_momentum)
    bounds = patch_starts()
    bn_cfg = TrainConfig(crop=int(bounds[cfg.crop_patches]))
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"student{cfg.seed}.ckpt.npz"
    history: list[dict] = []
    start_epoch = 0
    if ckpt.exists():
        start_epoch, history, _ = _load_checkpoint(ckpt, student, ema)
    valid_tags = None
    if valid is not None:
        (valid_tags,) = cache.outputs(valid.x, names=("tags",))
        valid_tags = valid_tags.astype(np.float32).mean(axis=1)

    def evaluate(row: dict) -> None:
        ema.swap()
        saved = _bn_state(student)
        recalibrate_bn(student, x, bn_cfg, rng, batches=8)
        probs, stags, _ = _predict_all(student, valid.x)
        row["val_accuracy"] = clip_accuracy(probs, valid)
        row["val_tag_agreement"] = tag_agreement(stags, valid_tags)
        _restore_bn(student, saved)
        ema.swap()

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        losses = []
        for idx in batches.epoch(rng):  # every batch has two windows or more
            optimizer.learning_rate = _lr_at(epoch * steps + len(losses), total, cfg.warmup_epochs * steps, cfg.learning_rate)
            xb, targets = distill_batch(x[idx], y[idx], tags[idx], pen_z[idx], n_classes, cfg, rng, bounds)
            r = student.train_on_batch(xb, targets, return_dict=True)
            losses.append([float(r[k]) for k in ("loss", "genre_loss", "teacher_tags_loss", "teacher_penultimate_loss")])
            ema.update()
        mean_loss = np.mean(np.array(losses), axis=0)
        row = {"epoch": epoch + 1, "epochs": cfg.epochs, "lr": float(optimizer.learning_rate.numpy())}
        row.update({k: float(v) for k, v in zip(("loss", "genre_loss", "tag_loss", "penultimate_loss"), mean_loss, strict=True)})
        if valid is not None and ((epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs):
            evaluate(row)
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        val = f"  valid {row['val_accuracy']:.1%}  tag agreement {row['val_tag_agreement']:.3f}" if "val_accuracy" in row else ""
        say(
            f"student epoch {row['epoch']:>3}/{cfg.epochs}  loss {row['loss']:.3f} (genre {row['genre_loss']:.3f}, tags {row['tag_loss']:.4f}, "
            f"penultimate {row['penultimate_loss']:.3f})  lr {row['lr']:.2e}{val}  {row['seconds']:.1f}s"
        )
        _save_checkpoint(ckpt, epoch + 1, student, ema, history, (-1.0, None, None))
    ema.swap()
    recalibrate_bn(student, x, bn_cfg, rng)
    metrics: dict = {}
    if valid is not None:
        _, stags, _ = _predict_all(student, valid.x)
        metrics["valid_tag_agreement"] = tag_agreement(stags, valid_tags)
    model, histories = base, [history]
    if cfg.finetune_epochs > 0:
        # Stage 2: the DenseNet recipe on the labelled windows, from the student's weights.
        say(f"fine-tuning the student on {len(train.x)} labelled windows")
        tcfg = TrainConfig(epochs=cfg.finetune_epochs, learning_rate=cfg.finetune_learning_rate, select="last", seed=cfg.seed, arch=cfg.arch)

        def fine(row: dict) -> None:
            val = f"  valid {row['val_accuracy']:.1%}" if "val_accuracy" in row else ""
            say(f"fine-tune epoch {row['epoch']:>3}/{row['epochs']}  loss {row['loss']:.3f}  lr {row['lr']:.2e}{val}  {row['seconds']:.1f}s")

        model, ft_history = train_member(train, valid, tcfg, cfg.seed, checkpoint_dir=ckpt_dir, progress=fine, init=base)
        histories.append(ft_history)
    if valid is not None:
        probs = _predict(model, valid.x)
        report = report_from(probs, valid, train.labels)
        metrics["valid"] = report.to_json()
        plot_confusion(report, out_dir / "confusion.png", title=f"valid accuracy {report.accuracy:.1%} (n={report.n})")
    plot_curves(histories, out_dir / "curves.png")
    training = {
        "data": {**data_summary, "unlabelled_windows": int(len(extra))},
        "route": "DenseNet distilled from musicnn (tags + penultimate)" + (", then fine-tuned on the genres" if cfg.finetune_epochs > 0 else " with genre labels"),
        "config": cfg.to_dict(),
        "teacher": {"model": "MSD_musicnn (musicnn 0.1.0, ISC licence)", "seconds": round(teacher_seconds, 1)},
        "epochs_run": [len(h) for h in histories],
        "seconds": round(sum(r["seconds"] for h in histories for r in h), 1),
        "parameters": int(model.count_params()),
        "backend": keras.backend.backend(),
    }
    (out_dir / "history.json").write_text(json.dumps(histories))
    # The bundle is the DenseNet alone: the teacher heads only served training.
    bundle = save_bundle(out_dir, model, train.labels, name=name, training=training, metrics=metrics)
    return bundle, metrics


def load_extra(paths: list[Path]) -> np.ndarray:
    """Unlabelled windows from ``.npz`` files holding ``levels`` ``(N, 128, 387)`` uint8 (``extra-music/windows.npz``)."""
    parts = []
    for p in paths:
        with np.load(p) as z:
            if "levels" not in z.files:
                raise ValueError(f"{p}: no 'levels' array (expected windows.npz with levels (N, {features.N_MELS}, {features.N_COLUMNS}) uint8)")
            a = z["levels"]
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[1:] != (features.N_MELS, features.N_COLUMNS):
            raise ValueError(f"{p}: levels are {a.dtype} {a.shape}, expected uint8 (N, {features.N_MELS}, {features.N_COLUMNS})")
        parts.append(a)
    return np.concatenate(parts) if parts else np.zeros((0, features.N_MELS, features.N_COLUMNS), np.uint8)
