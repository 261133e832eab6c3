"""The one representation shared by training and inference.

Every constant that decides what the model sees lives here. The training images
(``shared/data/gtzan-mel-png``) were drawn from exactly this matrix, so decoding
those PNGs and computing it from audio must agree; ``tests/test_features.py``
checks that on real clips.

A *window* is one 30-second stretch of audio turned into a ``(N_MELS, N_COLUMNS)``
``uint8`` matrix: the clip's own min–max scaled dB mel spectrogram, quantised to
256 levels, sampled at 387 columns. Low frequencies are row 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Bump whenever anything below changes what a window looks like; bundles made
#: with another version are refused at load time.
REPRESENTATION_VERSION = 1

SAMPLE_RATE = 22_050
N_FFT = 2_048
HOP_LENGTH = 512
N_MELS = 128
TOP_DB = 80.0
WINDOW_SECONDS = 30.0
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)
#: Columns of the training images; each shows one STFT frame of the window.
N_COLUMNS = 387
#: Rows of the training images (each mel band spans about three of them).
IMAGE_ROWS = 385
LEVELS = 255
#: A track up to this long is one window, whole (GTZAN clips are 29.9–30.7 s).
WHOLE_TRACK_SECONDS = 31.0
#: Shorter tracks are refused: a genre from a jingle is a guess.
MIN_SECONDS = 5.0


class SilentAudioError(ValueError):
    """The window holds no signal, so min–max scaling is undefined."""


def representation_params() -> dict[str, float | int]:
    """Everything a model bundle records so a mismatch can be refused."""
    return {
        "version": REPRESENTATION_VERSION,
        "sample_rate": SAMPLE_RATE,
        "n_fft": N_FFT,
        "hop_length": HOP_LENGTH,
        "n_mels": N_MELS,
        "top_db": TOP_DB,
        "window_seconds": WINDOW_SECONDS,
        "n_columns": N_COLUMNS,
        "levels": LEVELS,
    }


def column_frames(n_frames: int) -> np.ndarray:
    """STFT frame shown by each image column (measured on all 387 columns)."""
    c = np.arange(N_COLUMNS, dtype=np.float64)
    return np.floor((c + 0.5) * n_frames / (N_COLUMNS + 0.5)).astype(np.int64)


def band_rows() -> list[np.ndarray]:
    """Image rows (counted from the bottom) that show each mel band."""
    r = np.arange(IMAGE_ROWS, dtype=np.float64)
    band_of_row = np.floor((r + 0.5) * N_MELS / IMAGE_ROWS).astype(np.int64)
    return [np.flatnonzero(band_of_row == b) for b in range(N_MELS)]


_MEL_BASIS: np.ndarray | None = None
#: Each mel band's non-zero FFT bins ``(first, end)``: a triangle spans 4-53 of 1,025.
_MEL_SPANS: tuple[tuple[int, int], ...] = ()


def mel_basis() -> np.ndarray:
    """librosa's mel filter bank (Slaney scale and norm, fmax = sr/2), loaded once.

    ``mel_basis.npz`` beside this module holds ``librosa.filters.mel`` for these
    constants (``tests/test_features.py`` holds it to librosa's): importing librosa
    to make it took 1.5 s and 70 MB of numba in every process that scans.
    ``set_mel_basis`` lets a pool hand workers the parent's copy. Made (again, if a
    constant changes) by ``np.savez_compressed("tagger/mel_basis.npz", mel_basis=
    librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32))``.
    """
    global _MEL_BASIS
    if _MEL_BASIS is None:
        from importlib import resources

        with resources.files("tagger").joinpath("mel_basis.npz").open("rb") as f, np.load(f) as z:
            set_mel_basis(z["mel_basis"])
    assert _MEL_BASIS is not None
    return _MEL_BASIS


def set_mel_basis(basis: np.ndarray) -> None:
    """Install a filter bank made by ``mel_basis`` in another process."""
    global _MEL_BASIS, _MEL_SPANS
    basis = np.asarray(basis, dtype=np.float32)
    if basis.shape != (N_MELS, N_FFT // 2 + 1):
        raise ValueError(f"mel basis of shape {basis.shape}, expected {(N_MELS, N_FFT // 2 + 1)}")
    spans = []
    for row in basis:
        nz = np.flatnonzero(row)
        spans.append((int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0))
    _MEL_BASIS, _MEL_SPANS = basis, tuple(spans)


#: Periodic Hann window, as ``librosa.filters.get_window("hann", N_FFT)`` gives it.
_WINDOW = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
_WINDOW_64 = _WINDOW.astype(np.float64)


#: STFT frames transformed at a time (a block stays in cache).
_BLOCK = 64

#: scipy's ``rfft`` once :func:`use_scipy_fft` has loaded it, else ``None`` (numpy's).
_SCIPY_RFFT = None


def use_scipy_fft() -> None:
    """Let :func:`mel_db` transform with scipy.fft in this process.

    Both transforms give librosa's spectrogram (``tests/test_features.py`` holds each to
    it; they differ by about 1e-7 of the power). scipy's runs float32 frames side by side
    in SIMD lanes and is the faster per window; numpy's float32 path is five times slower,
    so numpy's is used in float64, which costs a few ms more a window. But importing
    scipy.fft takes 0.17-0.25 s (scipy.special, numpy.testing), a sixth of a one-file
    scan: decode workers, which make many windows, call this once at start; a process
    that makes a few windows never does.
    """
    global _SCIPY_RFFT
    from scipy import fft

    _SCIPY_RFFT = fft.rfft


def mel_db(y: np.ndarray) -> np.ndarray:
    """``power_to_db(melspectrogram(y), ref=max, top_db=80)`` as librosa computes it.

    The STFT is librosa's (centred frames, zero padding, periodic Hann), spelt out
    with numpy (and scipy.fft where :func:`use_scipy_fft` asked for it) so decode
    workers need not import librosa. Each mel band sums only its triangle's bins
    (2,018 of the filter bank's 131,200 weights are not 0): a third of the dense
    product's time on one thread. ``tests/test_features.py`` holds the result to
    librosa's own.
    """
    y = np.asarray(y, dtype=np.float32)
    half = N_FFT // 2
    padded = np.pad(y, half, mode="constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    n = len(frames)
    power = np.empty((n, N_FFT // 2 + 1), dtype=np.float32)
    # scipy's transform takes the float32 frames; numpy's the float64 ones (its float32 path is slow)
    rfft, window = (_SCIPY_RFFT, _WINDOW) if _SCIPY_RFFT is not None else (np.fft.rfft, _WINDOW_64)
    for i in range(0, n, _BLOCK):  # blocks that stay in cache
        spec = rfft(frames[i : i + _BLOCK] * window, axis=1)
        np.multiply(spec.real, spec.real, out=power[i : i + _BLOCK], casting="same_kind")
        power[i : i + _BLOCK] += spec.imag * spec.imag
    basis = mel_basis()
    mel = np.empty((N_MELS, n), dtype=np.float32)
    for m, (lo, hi) in enumerate(_MEL_SPANS):  # an empty span (none at these constants) sums to 0
        np.dot(power[:, lo:hi], basis[m, lo:hi], out=mel[m])
    amin = 1e-10
    db = 10.0 * np.log10(np.maximum(amin, mel))
    db -= 10.0 * np.log10(max(amin, float(mel.max())))
    return np.maximum(db, db.max() - TOP_DB)


def window_matrix(y: np.ndarray) -> np.ndarray:
    """One window of mono 22,050 Hz audio → ``(N_MELS, N_COLUMNS)`` uint8 levels.

    Audio shorter than a window is looped up to 30 s so the time scale matches
    training (stretching it would not).
    """
    y = np.asarray(y, dtype=np.float32)
    if y.size == 0:
        raise SilentAudioError("no samples")
    if y.size < WINDOW_SAMPLES:
        y = np.resize(y, WINDOW_SAMPLES)
    if not np.any(np.abs(y) > 1e-6):
        raise SilentAudioError("silent audio (no signal above -120 dBFS)")
    d = mel_db(y)
    lo = float(d.min())
    if lo >= -1e-6:
        raise SilentAudioError("silent audio (flat spectrum)")
    d = d[:, column_frames(d.shape[1])]
    levels = np.rint(LEVELS * (d - lo) / (0.0 - lo))
    return np.clip(levels, 0, LEVELS).astype(np.uint8)


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one track start, and how long each is (seconds)."""

    starts: tuple[float, ...]
    length: float


def plan_windows(duration: float, max_windows: int) -> WindowPlan:
    """How a whole track is covered, the same way for every caller.

    - up to ``WHOLE_TRACK_SECONDS``: one window, the whole track (as in GTZAN);
    - longer: ``min(max_windows, ceil(duration / 30))`` 30-second windows centred
      on equal slices of the track, so intros and outros weigh no more than the
      body and a long file needs only those stretches decoded.
    """
    if not math.isfinite(duration) or duration < MIN_SECONDS:
        raise ValueError(f"too short to classify: {duration:.1f} s (minimum {MIN_SECONDS:.0f} s)")
    if duration <= WHOLE_TRACK_SECONDS:
        return WindowPlan((0.0,), duration)
    n = max(1, min(int(max_windows), math.ceil(duration / WINDOW_SECONDS)))
    last = duration - WINDOW_SECONDS
    starts = []
    for i in range(n):
        centre = (i + 0.5) * duration / n
        starts.append(round(min(max(centre - WINDOW_SECONDS / 2, 0.0), last), 3))
    return WindowPlan(tuple(starts), WINDOW_SECONDS)


# --- the training images -------------------------------------------------------

_MAGMA_LOOKUP: dict[int, int] | None = None


def _magma_lookup() -> dict[int, int]:
    global _MAGMA_LOOKUP
    if _MAGMA_LOOKUP is None:
        from matplotlib import colormaps

        rgb = np.rint(colormaps["magma"](np.arange(256))[:, :3] * 255).astype(np.int64)
        keys = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
        _MAGMA_LOOKUP = {int(k): i for i, k in enumerate(keys)}
    return _MAGMA_LOOKUP


def decode_png(path: str | Path) -> np.ndarray:
    """A training PNG → the same ``(N_MELS, N_COLUMNS)`` uint8 matrix as ``window_matrix``."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    if rgb.shape[:2] != (IMAGE_ROWS, N_COLUMNS):
        raise ValueError(f"{path}: expected {N_COLUMNS}x{IMAGE_ROWS} image, got {rgb.shape[1]}x{rgb.shape[0]}")
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lookup = _magma_lookup()
    uniq, inverse = np.unique(keys, return_inverse=True)
    try:
        idx = np.array([lookup[int(k)] for k in uniq], dtype=np.int64)[inverse].reshape(keys.shape)
    except KeyError as exc:
        raise ValueError(f"{path}: pixel colour {exc.args[0]:06x} is not in the magma table") from None
    idx = idx[::-1]  # row 0 = lowest frequency
    out = np.empty((N_MELS, N_COLUMNS), dtype=np.uint8)
    for band, rows in enumerate(band_rows()):
        out[band] = np.rint(np.median(idx[rows], axis=0)).astype(np.uint8)
    return out
