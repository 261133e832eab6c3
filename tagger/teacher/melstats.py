"""Whole-window statistics of the mel levels, read by the linear head beside musicnn's features.

musicnn hears a window as six 3-second patches through the bridge, and its features
are pooled over them. What that pooling does not keep is measured directly on the
window's 128 × 387 levels (the representation of :mod:`tagger.features`):

- the spectral envelope: each of 16 groups of 8 mel bands, its mean level and how far
  it moves (standard deviation), and the mean and spread of its change from one column
  to the next (64 values);
- onset periodicity: the autocorrelation, at lags of 1 to 60 columns (78 ms to 4.7 s),
  of the onset strength (the summed rise of the levels from one column to the next) of
  all bands, of the low bands (0–31: bass, kick drum), the high bands (96–127: hi-hat,
  cymbals) and the middle ones: tempo and where the accents fall (240 values);
- a modulation spectrum ("fluctuation pattern"): how each band group's level
  fluctuates over the 30 seconds, in 12 rate bands spaced evenly on a log scale from
  0.2 Hz to the columns' Nyquist rate (6.45 Hz): phrase, bar and beat rates (192 values,
  ``log1p`` of the mean magnitude of the band's discrete Fourier coefficients).

Beside them, :class:`BandCorrelation`: how the 16 band groups' levels move together over the
window (the correlation of each pair of groups' level series, 120 values): whether bass and
treble rise and fall together, which instruments share a phrase (2026-12-07).

Measured under the benchmark's artist-grouped folds before each was kept (docs/genres.md).
A Keras layer written with ``keras.ops`` only (the Fourier transform is a product with
fixed cosine and sine tables), so one piece of code computes the features that the head
is fitted on and sits in the exported graph that ONNX Runtime runs at scan time.
Training side only, like the rest of :mod:`tagger.teacher`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from .. import features

#: Band groups (of ``N_MELS // GROUPS`` mel bands each).
GROUPS = 16
#: Rate bands of the modulation spectrum, and their range in Hz.
RATE_BANDS = 12
RATE_RANGE = (0.2, 0.5 * features.N_COLUMNS / features.WINDOW_SECONDS)
#: Mel band ranges whose onset strength is autocorrelated, and the largest lag (columns).
ONSET_BANDS = ((0, 128), (0, 32), (96, 128), (32, 96))
LAGS = 60
#: Values per window: 4 statistics and ``RATE_BANDS`` rates for each band group, ``LAGS`` lags for each onset range.
MEL_STATS = GROUPS * (4 + RATE_BANDS) + len(ONSET_BANDS) * LAGS
#: Values per window of :class:`BandCorrelation`: one per pair of band groups.
BAND_PAIRS = GROUPS * (GROUPS - 1) // 2


def dft_tables(frames: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine tables ``(frames, n // 2 + 1)`` of a real DFT of length ``n`` (``frames`` values, zero-padded)."""
    angle = 2.0 * np.pi * np.outer(np.arange(frames), np.arange(n // 2 + 1)) / n
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def modulation_tables(columns: int = features.N_COLUMNS, seconds: float = features.WINDOW_SECONDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine and sine tables ``(columns, K)`` of the real DFT, and ``(K, RATE_BANDS)`` rate-band means.

    Coefficient ``k`` is the rate ``k / seconds`` Hz (the columns span the window); a
    rate band averages the coefficients in ``[lo, hi)``.
    """
    k = np.arange(columns // 2 + 1)
    rate = k / seconds
    edges = np.geomspace(*RATE_RANGE, RATE_BANDS + 1)
    pool = np.zeros((len(k), RATE_BANDS))
    for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        sel = (rate >= lo) & (rate < hi)
        pool[sel, j] = 1.0 / sel.sum()
    return (*dft_tables(columns, columns), pool.astype(np.float32))


def periodicity_tables(frames: int = features.N_COLUMNS - 1, lags: int = LAGS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The onsets' autocorrelation as products with fixed tables: cosine and sine tables
    ``(frames, K)`` of a real DFT of length ``n >= frames + lags`` (zero padding, so lags up to
    ``lags`` do not wrap around), and ``(K, lags)``, which takes the power spectrum back to
    the autocorrelation at lags 1..``lags``."""
    n = 1 << int(np.ceil(np.log2(frames + lags)))
    k = np.arange(n // 2 + 1)
    weight = np.full(len(k), 2.0)
    weight[0] = weight[-1] = 1.0  # the zero and Nyquist bins appear once in the full spectrum
    back = weight[:, None] * np.cos(2.0 * np.pi * np.outer(k, np.arange(1, lags + 1)) / n) / n
    return (*dft_tables(frames, n), back.astype(np.float32))


def onset_bands(bands: int = features.N_MELS) -> np.ndarray:
    """``(bands, len(ONSET_BANDS))``: which mel bands each onset strength sums."""
    out = np.zeros((bands, len(ONSET_BANDS)), np.float32)
    for j, (lo, hi) in enumerate(ONSET_BANDS):
        out[lo:hi, j] = 1.0
    return out


def _band_levels(levels):
    """``levels`` uint8 → the levels scaled to [0, 1] ``(N, B, C)`` and each band group's mean ``(N, GROUPS, C)``."""
    v = ops.cast(levels, "float32") / 255.0
    bands, columns = v.shape[1], v.shape[2]
    return v, ops.mean(ops.reshape(v, (-1, GROUPS, bands // GROUPS, columns)), axis=2)


def _as_numpy(layer: layers.Layer, levels: np.ndarray, width: int, batch: int) -> np.ndarray:
    """``layer`` over windows ``(N, 128, 387)`` in batches of ``batch``, as a float32 array ``(N, width)``."""
    out = [ops.convert_to_numpy(layer(levels[i : i + batch])) for i in range(0, len(levels), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)


@keras.saving.register_keras_serializable(package="tagger")
class MelStats(layers.Layer):
    """``levels`` ``(N, 128, 387)`` uint8 → ``(N, MEL_STATS)`` window statistics (see the module).

    Every sum over bands, columns or frequencies is a product with a fixed table, so the
    exported graph stays a few dozen nodes (ONNX Runtime starts a session of many small
    nodes slowly)."""

    def build(self, input_shape):
        # numpy here, tensors in call(): in a traced graph they become constants of the graph
        # (tensors made here would be captured as extra inputs of the exported ONNX model)
        self._tables = (*modulation_tables(int(input_shape[-1])), *periodicity_tables(int(input_shape[-1]) - 1), onset_bands(int(input_shape[-2])))
        self.built = True

    def call(self, levels):
        cos, sin, pool, ac_cos, ac_sin, ac_back, select = (ops.convert_to_tensor(a) for a in self._tables)
        v, e = _band_levels(levels)
        m = ops.mean(e, axis=-1, keepdims=True)
        ec = e - m
        d = e[:, :, 1:] - e[:, :, :-1]
        dm = ops.mean(d, axis=-1, keepdims=True)
        stats = [
            m[..., 0],
            ops.sqrt(ops.mean(ops.square(ec), axis=-1)),
            ops.mean(ops.abs(d), axis=-1),
            ops.sqrt(ops.mean(ops.square(d - dm), axis=-1)),
        ]
        re, im = ops.matmul(ec, cos), ops.matmul(ec, sin)
        rates = ops.log(ops.matmul(ops.sqrt(ops.square(re) + ops.square(im)), pool) + 1.0)  # log1p (no such ONNX op); (N, G, RATE_BANDS)
        # onset strength: the summed rise of the levels, per band range (N, R, C - 1), standardised
        rise = ops.relu(v[:, :, 1:] - v[:, :, :-1])
        o = ops.transpose(ops.matmul(ops.transpose(rise, (0, 2, 1)), select), (0, 2, 1))
        o = o - ops.mean(o, axis=-1, keepdims=True)
        o = o / (ops.sqrt(ops.mean(ops.square(o), axis=-1, keepdims=True)) + 1e-6)
        power = ops.square(ops.matmul(o, ac_cos)) + ops.square(ops.matmul(o, ac_sin))
        lagged = ops.matmul(power, ac_back) / (ops.sum(ops.square(o), axis=-1, keepdims=True) + 1e-6)  # (N, R, LAGS)
        return ops.concatenate(stats + [ops.reshape(lagged, (-1, len(ONSET_BANDS) * LAGS)), ops.reshape(rates, (-1, GROUPS * RATE_BANDS))], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], MEL_STATS)


def mel_stats(levels: np.ndarray, batch: int = 256) -> np.ndarray:
    """:class:`MelStats` of windows ``(N, 128, 387)`` as a numpy array ``(N, MEL_STATS)`` (float32)."""
    return _as_numpy(MelStats(), levels, MEL_STATS, batch)


def pair_table(groups: int = GROUPS) -> np.ndarray:
    """``(groups², groups·(groups − 1)/2)``: picks the upper triangle of a flattened correlation matrix."""
    i, j = np.triu_indices(groups, 1)
    out = np.zeros((groups * groups, len(i)), np.float32)
    out[i * groups + j, np.arange(len(i))] = 1.0
    return out


@keras.saving.register_keras_serializable(package="tagger")
class BandCorrelation(layers.Layer):
    """``levels`` ``(N, 128, 387)`` uint8 → ``(N, BAND_PAIRS)``: the correlation over the window's
    columns of each pair of band groups' mean levels (a silent group correlates 0 with all)."""

    def build(self, input_shape):
        self._pairs = pair_table()  # numpy: a constant of the traced graph (see MelStats.build)
        self.built = True

    def call(self, levels):
        _, e = _band_levels(levels)
        ec = e - ops.mean(e, axis=-1, keepdims=True)
        ec = ec / (ops.sqrt(ops.mean(ops.square(ec), axis=-1, keepdims=True)) + 1e-6)
        corr = ops.matmul(ec, ops.transpose(ec, (0, 2, 1))) / float(e.shape[-1])  # (N, G, G)
        return ops.matmul(ops.reshape(corr, (-1, GROUPS * GROUPS)), ops.convert_to_tensor(self._pairs))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], BAND_PAIRS)


def band_correlation(levels: np.ndarray, batch: int = 256) -> np.ndarray:
    """:class:`BandCorrelation` of windows ``(N, 128, 387)`` as a numpy array ``(N, BAND_PAIRS)`` (float32)."""
    return _as_numpy(BandCorrelation(), levels, BAND_PAIRS, batch)
