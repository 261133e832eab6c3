"""The window's mel statistics (tagger/teacher/melstats.py) that the linear head reads beside musicnn."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from tagger import features  # noqa: E402
from tagger.teacher import melstats as ms  # noqa: E402


def _reference(x: np.ndarray) -> np.ndarray:
    """The same statistics written independently with numpy's FFT (the layer uses cosine/sine tables and lagged products)."""
    v = x.astype(np.float64) / 255.0
    n = len(v)
    e = v.reshape(n, ms.GROUPS, -1, v.shape[-1]).mean(2)
    d = np.diff(e, axis=-1)
    stats = [e.mean(-1), e.std(-1), np.abs(d).mean(-1), d.std(-1)]
    onsets = []
    for lo, hi in ms.ONSET_BANDS:
        o = np.maximum(np.diff(v[:, lo:hi], axis=-1), 0).sum(1)
        o = (o - o.mean(-1, keepdims=True)) / (o.std(-1, keepdims=True) + 1e-6)
        a = np.fft.irfft(np.abs(np.fft.rfft(o, n=1024, axis=-1)) ** 2, axis=-1)[:, : ms.LAGS + 1]  # linear autocorrelation
        onsets.append(a[:, 1:] / (a[:, :1] + 1e-6))
    spectrum = np.abs(np.fft.rfft(e - e.mean(-1, keepdims=True), axis=-1))
    rate = np.fft.rfftfreq(v.shape[-1], d=features.WINDOW_SECONDS / v.shape[-1])
    edges = np.geomspace(*ms.RATE_RANGE, ms.RATE_BANDS + 1)
    rates = np.stack([spectrum[..., (rate >= a) & (rate < b)].mean(-1) for a, b in zip(edges[:-1], edges[1:], strict=True)], -1)
    return np.concatenate(stats + onsets + [np.log1p(rates).reshape(n, -1)], axis=1)


def test_the_layer_computes_the_documented_statistics():
    x = np.random.default_rng(0).integers(0, 256, (4, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    got = ms.mel_stats(x, batch=3)  # two batches
    assert got.shape == (4, ms.MEL_STATS) == (4, 496)
    np.testing.assert_allclose(got, _reference(x), atol=2e-5)


def test_a_steady_beat_shows_at_its_lag_and_its_rate():
    """Low bands struck every 8 columns (1.6 Hz): the low onsets' autocorrelation peaks at lag 8, the
    low band groups' modulation spectrum in the rate band holding 1.6 Hz; the silent top bands stay flat."""
    x = np.zeros((1, features.N_MELS, features.N_COLUMNS), np.uint8)
    x[0, :32, ::8] = 200
    got = ms.mel_stats(x)[0]
    lags = got[ms.GROUPS * 4 :][: len(ms.ONSET_BANDS) * ms.LAGS].reshape(len(ms.ONSET_BANDS), ms.LAGS)
    low = lags[1]  # bands 0-31
    assert int(np.argmax(low)) + 1 == 8 and low[7] > 0.9 and low[3] < 0.0
    rates = got[-ms.GROUPS * ms.RATE_BANDS :].reshape(ms.GROUPS, ms.RATE_BANDS)
    beat = features.N_COLUMNS / features.WINDOW_SECONDS / 8
    edges = np.geomspace(*ms.RATE_RANGE, ms.RATE_BANDS + 1)
    band = int(np.searchsorted(edges, beat)) - 1
    assert int(np.argmax(rates[0])) == band
    assert np.allclose(rates[8:], 0.0)  # groups above the struck bands never move
    means = got[: ms.GROUPS]
    assert means[:4].min() > 0 and np.allclose(means[4:], 0.0)


def test_band_correlation_is_each_pair_of_groups_pearson_correlation():
    """Against numpy's corrcoef of the 16 groups' mean levels; a silent group correlates 0, groups
    that rise and fall together 1, in opposition -1."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    x[2, :8] = 0  # group 0 silent
    swell = (100 + 80 * np.sin(np.linspace(0, 12, features.N_COLUMNS))).astype(np.uint8)
    x[1, 8:16] = swell  # group 1 follows the swell,
    x[1, 16:24] = 255 - swell  # group 2 the other way
    got = ms.band_correlation(x, batch=2)
    assert got.shape == (3, ms.BAND_PAIRS) == (3, 120)
    e = x.astype(np.float64).reshape(3, ms.GROUPS, -1, features.N_COLUMNS).mean(2)
    i, j = np.triu_indices(ms.GROUPS, 1)
    with np.errstate(invalid="ignore", divide="ignore"):  # the silent group's 0/0, taken as 0
        ref = np.stack([np.nan_to_num(np.corrcoef(w))[i, j] for w in e])
    np.testing.assert_allclose(got, ref, atol=2e-5)
    pair = {(a, b): k for k, (a, b) in enumerate(zip(i, j, strict=True))}
    assert got[1, pair[(1, 2)]] == pytest.approx(-1.0, abs=1e-4)
    assert np.allclose(got[2, [pair[(0, b)] for b in range(1, ms.GROUPS)]], 0.0)
