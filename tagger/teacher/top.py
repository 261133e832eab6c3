"""musicnn's top, fine-tuned on label sets: the genre head beside the linear one.

musicnn's own top (batch norm of the pooled frame features, a dense layer of 200,
batch norm; ``pool_bn`` → ``penultimate`` → ``penultimate_bn``) is copied from the
checkpoint, a new dense layer over our labels goes on it, and the whole top is
fine-tuned per 3-second patch on the teacher's cached per-patch pools (so training
needs no pass through the front-end): AdamW at a low learning rate, dropout, and a
random choice of ``patches`` of each window's ten patches in every batch (the patch
counterpart of SpecAugment's crops). A window's logits are the mean over its patches;
several members (seeds) are averaged. On the artist-grouped folds this raised the
precision of written genres on real music and the GTZAN accuracy over the linear head
alone (docs/genres.md). Training side only (Keras); the shipped model carries the
tops as plain layers, exported to ONNX.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import bridge as br

#: musicnn's layers the top is copied from, in order.
TOP_LAYERS = ("pool_bn", "penultimate", "penultimate_bn")
#: Features of one patch as musicnn's top reads them: max and mean over time, interleaved.
PATCH_IN = 2 * 753
BN_EPSILON = 1e-3


@dataclass
class TopConfig:
    """How the tops are fine-tuned (saved in the bundle with the head's settings)."""

    members: int = 5
    epochs: int = 30
    learning_rate: float = 3e-4
    weight_decay: float = 1e-2
    dropout: float = 0.5
    batch_size: int = 32
    #: Mixup of the pooled patch features (Beta(α, α), the larger share kept by each window's
    #: own label set); 0 (the default) leaves it off: on the artist-grouped folds it did not
    #: raise real-music precision or GTZAN accuracy (docs/genres.md).
    mixup_alpha: float = 0.0
    #: Member m is seeded ``seed * 1000 + first_seed + m`` (``seed``: the head's): another
    #: ``first_seed`` gives another ensemble of the same recipe, e.g. to measure seed spread.
    first_seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def interleave(mean_pool: np.ndarray, max_pool: np.ndarray) -> np.ndarray:
    """``(N, P, 753)`` pools → ``(N, P, 1506)`` ``[max_0, mean_0, max_1, …]``, musicnn's order."""
    return np.stack([max_pool.astype(np.float32), mean_pool.astype(np.float32)], axis=-1).reshape(
        *max_pool.shape[:2], PATCH_IN
    )


@dataclass
class Top:
    """One fine-tuned top as arrays: three Keras-ordered weight lists and the new dense layer."""

    pool_bn: list[np.ndarray]  # gamma, beta, moving mean, moving variance
    dense: list[np.ndarray]  # kernel (1506, 200), bias
    dense_bn: list[np.ndarray]
    head: list[np.ndarray]  # kernel (200, K), bias

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, P, 1506)`` → ``(N, K)``: the mean over patches, as the exported graph computes it."""
        z = _bn(x, self.pool_bn)
        z = np.maximum(z @ self.dense[0] + self.dense[1], 0.0)
        z = _bn(z, self.dense_bn)
        return (z @ self.head[0] + self.head[1]).mean(axis=1)

    def scaled(self, factor: float) -> Top:
        """The same top with its logits multiplied by ``factor`` (temperature and pooling weight folded in)."""
        return Top(
            self.pool_bn, self.dense, self.dense_bn, [self.head[0] * factor, self.head[1] * factor]
        )


def _bn(x: np.ndarray, w: list[np.ndarray]) -> np.ndarray:
    gamma, beta, mean, var = w
    return (x - mean) / np.sqrt(var + BN_EPSILON) * gamma + beta


def musicnn_top_weights(musicnn=None) -> dict[str, list[np.ndarray]]:
    """The checkpoint's weights of :data:`TOP_LAYERS` (from ``musicnn`` when it is loaded already)."""
    if musicnn is None:
        from .checkpoint import load_musicnn

        musicnn = load_musicnn()
    return {n: [np.asarray(w) for w in musicnn.get_layer(n).get_weights()] for n in TOP_LAYERS}


def _set_loss(mask, z):
    from keras import ops

    lse_all = ops.logsumexp(z, axis=1)
    lse_set = ops.logsumexp(ops.where(mask > 0, z, -1e9), axis=1)
    return ops.mean(lse_all - lse_set)


def _mixed_set_loss(y, z):
    """Mixup's label-set loss: ``y`` is ``[mask_a, mask_b, λ]``, the loss ``λ·L(a) + (1-λ)·L(b)``."""
    from keras import ops

    k = (ops.shape(y)[1] - 1) // 2
    lam = y[:, 2 * k]
    lse_all = ops.logsumexp(z, axis=1)
    la = lse_all - ops.logsumexp(ops.where(y[:, :k] > 0, z, -1e9), axis=1)
    lb = lse_all - ops.logsumexp(ops.where(y[:, k : 2 * k] > 0, z, -1e9), axis=1)
    return ops.mean(lam * la + (1 - lam) * lb)


def fit_tops(
    x: np.ndarray,
    mask: np.ndarray,
    cfg: TopConfig,
    patches: int,
    *,
    start: dict[str, list[np.ndarray]],
    seed: int = 0,
    say: Callable[[str], None] = lambda s: None,
) -> list[Top]:
    """``cfg.members`` tops fine-tuned on windows ``x`` ``(N, 10, 1506)`` and their label sets ``mask``."""
    import keras
    from keras import layers, ops

    k = mask.shape[1]
    present = mask.any(axis=0)
    tops = []
    for member in range(cfg.members):
        t0 = time.time()
        keras.utils.set_random_seed(seed * 1000 + cfg.first_seed + member)
        rng = np.random.default_rng(seed * 1000 + cfg.first_seed + member)
        inp = keras.Input((patches, PATCH_IN))
        bn0 = layers.BatchNormalization(epsilon=BN_EPSILON)
        d1 = layers.Dense(200, activation="relu")
        bn1 = layers.BatchNormalization(epsilon=BN_EPSILON)
        head = layers.Dense(k)
        z = head(layers.Dropout(cfg.dropout)(bn1(d1(bn0(inp)))))
        model = keras.Model(inp, ops.mean(z, axis=1))
        bn0.set_weights(start["pool_bn"])
        d1.set_weights(start["penultimate"])
        bn1.set_weights(start["penultimate_bn"])
        model.compile(
            optimizer=keras.optimizers.AdamW(cfg.learning_rate, weight_decay=cfg.weight_decay),
            loss=_mixed_set_loss if cfg.mixup_alpha > 0 else _set_loss,
        )
        bs = min(cfg.batch_size, len(x))
        steps = max(1, len(x) // bs)
        model.fit(
            _batches(x, mask, bs, steps, patches, rng, cfg.mixup_alpha),
            steps_per_epoch=steps,
            epochs=cfg.epochs,
            verbose=0,
            shuffle=False,
        )
        hk, hb = (np.asarray(w) for w in head.get_weights())
        hb = np.where(present, hb, -30.0)  # a label no window allows is never chosen
        hk = np.where(present[None, :], hk, 0.0)
        tops.append(
            Top(
                *[[np.asarray(w) for w in layer.get_weights()] for layer in (bn0, d1, bn1)],
                [hk, hb],
            )
        )
        say(f"    top {member + 1}/{cfg.members}: {time.time() - t0:.0f} s")
    return tops


def _batches(
    x: np.ndarray, mask: np.ndarray, bs: int, steps: int, patches: int, rng: np.random.Generator, mixup_alpha: float = 0.0
):
    """Endless shuffled batches, each hearing ``patches`` random patches of its windows.

    With ``mixup_alpha`` each window is mixed with another of its batch (λ ≥ 0.5 its own
    share) and the targets are ``[own mask, other's mask, λ]`` for :func:`_mixed_set_loss`.
    """
    while True:
        order = rng.permutation(len(x))
        for s in range(steps):
            b = np.sort(order[s * bs : (s + 1) * bs])
            p = np.sort(rng.choice(br.PATCHES_PER_WINDOW, patches, replace=False))
            xb, mb = x[b][:, p].astype(np.float32), mask[b].astype(np.float32)
            if mixup_alpha <= 0:
                yield xb, mb
                continue
            other = rng.permutation(len(b))
            lam = rng.beta(mixup_alpha, mixup_alpha, len(b)).astype(np.float32)
            lam = np.maximum(lam, 1 - lam)
            mixed = lam[:, None, None] * xb + (1 - lam[:, None, None]) * xb[other]
            yield mixed, np.concatenate([mb, mb[other], lam[:, None]], axis=1)


def tops_logits(tops: list[Top], x: np.ndarray) -> np.ndarray:
    """The members' mean logits."""
    return np.mean([t.logits(x) for t in tops], axis=0)
