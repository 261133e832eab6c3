"""A softmax head learnt from label *sets*, and its temperature (training side).

Real-music labels are coarse: AllMusic's ``Pop/Rock`` says "pop, rock or metal",
``Electronic; Pop/Rock`` says any of four. Forcing one of them would teach the head
a coin toss, so each window carries the set of labels its source allows
(:func:`tagger.vocabulary.allowed`) and the head maximises the probability of the
set, ``log Σ_{k∈S} p_k`` (partial-label learning; with one label per window this is
ordinary multinomial logistic regression).

The temperature makes the probabilities mean what they say: fitted on held-out
(cross-validated) logits so that ``min_confidence`` is a precision knob, then folded
into the head's weights, so the runtime sees plain logits.

numpy and scipy only (L-BFGS with exact gradients).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp


def _set_nll(z: np.ndarray, mask: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted mean of ``−log Σ_{k∈S} softmax(z)_k`` and its gradient in ``z``."""
    lse_all = logsumexp(z, axis=1)
    zm = np.where(mask, z, -np.inf)
    lse_set = logsumexp(zm, axis=1)
    loss = float(np.sum(w * (lse_all - lse_set)))
    p = np.exp(z - lse_all[:, None])
    q = np.where(mask, np.exp(zm - lse_set[:, None]), 0.0)
    return loss, w[:, None] * (p - q)


def fit_softmax(
    x: np.ndarray,
    mask: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    l2: float = 1.0,
    max_iter: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``(K, D)`` and intercepts ``(K,)`` maximising the labelled sets' probability.

    ``mask`` is ``(N, K)`` boolean: the labels each row allows (at least one). ``weights``
    (``N``) are normalised to sum to 1; ``l2`` penalises ``½·l2·‖W‖²`` against that mean loss
    (so, like scikit-learn's ``1/C``, but per sample). Labels no row allows get
    coefficients 0 and intercept −30: never chosen.
    """
    x = np.asarray(x, np.float64)
    mask = np.asarray(mask, bool)
    n, d = x.shape
    k = mask.shape[1]
    if not mask.any(axis=1).all():
        raise ValueError("every row must allow at least one label")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    present = mask.any(axis=0)
    kp = int(present.sum())
    m = mask[:, present]

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        wb = theta.reshape(kp, d + 1)
        z = x @ wb[:, :d].T + wb[:, d]
        loss, g = _set_nll(z, m, w)
        grad = np.concatenate([g.T @ x, g.sum(axis=0)[:, None]], axis=1)
        loss += 0.5 * l2 * float(np.sum(wb[:, :d] ** 2))
        grad[:, :d] += l2 * wb[:, :d]
        return loss, grad.ravel()

    res = minimize(f, np.zeros(kp * (d + 1)), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    wb = res.x.reshape(kp, d + 1)
    coef = np.zeros((k, d))
    intercept = np.full(k, -30.0)
    coef[present] = wb[:, :d]
    intercept[present] = wb[:, d] - wb[:, d].mean()
    return coef, intercept


def set_nll(logits: np.ndarray, mask: np.ndarray, temperature: float = 1.0) -> float:
    """Mean ``−log P(label ∈ S)`` of ``logits / temperature``."""
    z = np.asarray(logits, np.float64) / temperature
    return _set_nll(z, np.asarray(mask, bool), np.full(len(z), 1.0 / len(z)))[0]


def fit_temperature(logits: np.ndarray, mask: np.ndarray) -> float:
    """The temperature ``T`` minimising the held-out set likelihood of ``logits / T``."""
    res = minimize_scalar(lambda t: set_nll(logits, mask, float(np.exp(t))), bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(res.x))


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return np.exp(z - logsumexp(z, axis=-1, keepdims=True))
