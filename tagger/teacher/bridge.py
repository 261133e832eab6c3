"""The bridge: our representation → the input of the pretrained musicnn tagger.

musicnn (Pons & Serra 2019) was trained on a different spectrogram: 16 kHz audio,
512-point FFT, hop 256, 96 Slaney mel bands, ``log10(10000·x + 1)``, patches of
187 frames (3 s). The training data here exist only as our windows (min–max
scaled dB levels of a 128-band mel spectrogram at 22,050 Hz, 387 columns), so the
teacher's input is computed *from a window*, with no audio:

1. levels → dB (``-80 + 80·level/255``) → power relative to the window's maximum;
   each band's power divided by the area of its mel filter, which turns band
   energy into spectral density;
2. over frequency, linear interpolation from our 128 band centres onto the 257
   bins of a 512-point FFT at 16 kHz (0–8 kHz), then musicnn's own mel filter bank
   (librosa, sr 16,000, n_fft 512, 96 bands) — steps 1–2 are one fixed
   ``(96, 128)`` matrix on power;
3. over time, linear interpolation from the 387 column times onto musicnn's 16-ms
   frames (``BRIDGE_FRAMES`` of them: ten whole 187-frame patches) — a fixed
   ``(387, BRIDGE_FRAMES)`` matrix;
4. ``log10(10000·g·x + 1)`` with one global gain ``g`` standing in for the
   absolute level that min–max scaling threw away, fitted on the shared clips that
   exist both as audio and as image (``tagger teacher calibrate``).

Every constant of the teacher's input lives here; :func:`bridge` is the numpy
reference that :class:`tagger.teacher.musicnn.Bridge` (the Keras layer inside a
model) reproduces.
"""

from __future__ import annotations

import numpy as np

from .. import features

#: musicnn's input (its ``configuration.py``).
TEACHER_SAMPLE_RATE = 16_000
TEACHER_N_FFT = 512
TEACHER_HOP = 256
TEACHER_N_MELS = 96
#: Frames of one input patch: ``librosa.time_to_frames(3 s) + 1``, as musicnn's extractor.
PATCH_FRAMES = 187
#: Whole patches in one 30-second window (1,876 frames; musicnn drops the remainder).
PATCHES_PER_WINDOW = 10
BRIDGE_FRAMES = PATCH_FRAMES * PATCHES_PER_WINDOW
#: dB span of the window's levels (``power_to_db(..., top_db=80)``).
LEVEL_DB_SPAN = features.TOP_DB
#: Fitted by ``tagger teacher calibrate`` on the 88 shared clip pairs (see docs/model.md).
DEFAULT_LOG10_GAIN = 2.17


def band_centres() -> np.ndarray:
    """Centre frequency (Hz) of each of our 128 Slaney mel bands."""
    import librosa

    return librosa.mel_frequencies(n_mels=features.N_MELS + 2, fmin=0.0, fmax=features.SAMPLE_RATE / 2, htk=False)[1:-1]


def teacher_mel_basis() -> np.ndarray:
    """musicnn's mel filter bank: ``(96, 257)``, as librosa builds it for its input."""
    import librosa

    return librosa.filters.mel(sr=TEACHER_SAMPLE_RATE, n_fft=TEACHER_N_FFT, n_mels=TEACHER_N_MELS).astype(np.float64)


def frequency_matrix() -> np.ndarray:
    """``(96, 128)``: our band powers → musicnn's mel band powers (steps 1–2)."""
    ours = features.mel_basis().astype(np.float64)  # (128, 1025)
    area = ours.sum(axis=1)  # a filter's weight over FFT bins at 22,050 Hz / 2,048
    bins = np.linspace(0.0, TEACHER_SAMPLE_RATE / 2, TEACHER_N_FFT // 2 + 1)
    centres = band_centres()
    interp = np.zeros((len(bins), features.N_MELS))
    for j in range(features.N_MELS):  # column j: bins' interpolation weight on band j
        e = np.zeros(features.N_MELS)
        e[j] = 1.0
        interp[:, j] = np.interp(bins, centres, e)
    return (teacher_mel_basis() @ interp) / area[None, :]


def column_times(n_frames: int | None = None) -> np.ndarray:
    """Time (s) of the STFT frame each of our 387 columns shows, for a 30-s window."""
    if n_frames is None:
        n_frames = 1 + features.WINDOW_SAMPLES // features.HOP_LENGTH
    return features.column_frames(n_frames) * features.HOP_LENGTH / features.SAMPLE_RATE


def time_matrix() -> np.ndarray:
    """``(387, BRIDGE_FRAMES)``: linear interpolation of columns onto 16-ms frames (step 3)."""
    src = column_times()
    dst = np.arange(BRIDGE_FRAMES) * TEACHER_HOP / TEACHER_SAMPLE_RATE
    m = np.zeros((features.N_COLUMNS, BRIDGE_FRAMES))
    for c in range(features.N_COLUMNS):
        e = np.zeros(features.N_COLUMNS)
        e[c] = 1.0
        m[c] = np.interp(dst, src, e)
    return m


def levels_to_power(levels: np.ndarray) -> np.ndarray:
    """uint8 levels ``(..., 128, 387)`` → power relative to the window's maximum."""
    db = -LEVEL_DB_SPAN + LEVEL_DB_SPAN * levels.astype(np.float32) / features.LEVELS
    return np.power(10.0, db / 10.0, dtype=np.float32)


def bridge_linear(levels: np.ndarray) -> np.ndarray:
    """Steps 1–3: ``(N, 128, 387)`` levels → ``(N, BRIDGE_FRAMES, 96)`` power, before the log."""
    p = levels_to_power(np.asarray(levels))
    f = frequency_matrix().astype(np.float32)
    t = time_matrix().astype(np.float32)
    x = np.einsum("mb,nbc->nmc", f, p)  # (N, 96, 387)
    return np.einsum("nmc,ct->ntm", x, t)  # (N, frames, 96)


def bridge(levels: np.ndarray, log10_gain: float = DEFAULT_LOG10_GAIN) -> np.ndarray:
    """Our windows ``(N, 128, 387)`` uint8 → musicnn's input ``(N, BRIDGE_FRAMES, 96)``."""
    return np.log10(10000.0 * (10.0**log10_gain) * bridge_linear(levels) + 1.0).astype(np.float32)


def patches(x: np.ndarray) -> np.ndarray:
    """``(N, BRIDGE_FRAMES, 96)`` → ``(N * 10, 187, 96)``, musicnn's non-overlapping patches."""
    n = x.shape[0]
    return x.reshape(n * PATCHES_PER_WINDOW, PATCH_FRAMES, x.shape[-1])


def teacher_input_from_audio(y: np.ndarray, sr: int) -> np.ndarray:
    """musicnn's own input for audio: ``(frames, 96)``, computed as its extractor does.

    The calibration target: ``librosa.load(sr=16000)``, ``melspectrogram`` with
    musicnn's FFT settings, rounded to float16 as musicnn does, ``log10(10000·x + 1)``.
    musicnn multiplies in float16, which overflows to ``inf`` on the loudest bins
    (power above 6.55, about 1 % of them in a GTZAN clip); this keeps the rounding
    but multiplies in float32, giving the finite value the network was meant to see.
    """
    import librosa

    if sr != TEACHER_SAMPLE_RATE:
        y = librosa.resample(np.asarray(y, dtype=np.float32), orig_sr=sr, target_sr=TEACHER_SAMPLE_RATE)
    mel = librosa.feature.melspectrogram(
        y=y, sr=TEACHER_SAMPLE_RATE, hop_length=TEACHER_HOP, n_fft=TEACHER_N_FFT, n_mels=TEACHER_N_MELS
    ).T
    return np.log10(10000 * mel.astype(np.float16).astype(np.float32) + 1)
