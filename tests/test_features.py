"""The representation: window planning, and audio → matrix agreeing with the training PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tagger import features
from tagger.audio import load_windows

# --- plan_windows -----------------------------------------------------------------


@pytest.mark.parametrize("duration", [29.93, 30.0, 30.65, features.WHOLE_TRACK_SECONDS])
def test_gtzan_length_is_one_whole_window(duration):
    plan = features.plan_windows(duration, 3)
    assert plan.starts == (0.0,)
    assert plan.length == duration


@pytest.mark.parametrize("duration", [0.0, 1.0, 4.99, math.nan, math.inf, -3.0])
def test_too_short_or_unknown_is_refused(duration):
    with pytest.raises(ValueError, match="too short to classify"):
        features.plan_windows(duration, 3)


def test_short_refusal_message():
    with pytest.raises(ValueError) as exc:
        features.plan_windows(1.0, 3)
    assert str(exc.value) == "too short to classify: 1.0 s (minimum 5 s)"


def test_long_track_windows_are_centred_on_equal_slices():
    plan = features.plan_windows(7200.0, 3)
    assert plan.length == features.WINDOW_SECONDS
    assert plan.starts == (1185.0, 3585.0, 5985.0)
    centres = [s + plan.length / 2 for s in plan.starts]
    assert centres == [1200.0, 3600.0, 6000.0]


def test_window_count_follows_length_and_cap():
    assert len(features.plan_windows(45.0, 3).starts) == 2
    assert features.plan_windows(45.0, 3).starts == (0.0, 15.0)  # clamped inside the track
    assert len(features.plan_windows(600.0, 3).starts) == 3
    assert len(features.plan_windows(600.0, 50).starts) == 20
    assert features.plan_windows(600.0, 1).starts == (285.0,)
    for duration in (31.5, 95.3, 3601.0):
        plan = features.plan_windows(duration, 5)
        assert all(0 <= s <= duration - plan.length for s in plan.starts)
        assert list(plan.starts) == sorted(plan.starts)


# --- the representation check (../shared) --------------------------------------------


def test_audio_matches_the_training_images(shared_audio, shared_png):
    """Every clip with both audio and a PNG: ``load_windows`` equals the decoded image.

    This is what makes a model trained on the PNGs valid on audio files.
    """
    pairs = []
    for png in sorted(shared_png.glob("*/*.png")):
        flac = shared_audio / png.parent.name / (png.stem + ".flac")
        if flac.exists():
            pairs.append((flac, png))
    assert len(pairs) == 89
    worst: list[tuple[float, str]] = []
    errors = []
    for flac, png in pairs:
        windows = load_windows(flac, 3)
        assert windows.shape == (1, features.N_MELS, features.N_COLUMNS)
        image = features.decode_png(png)
        mae = float(np.abs(windows[0].astype(np.int16) - image.astype(np.int16)).mean())
        errors.append(mae)
        if mae > 1.0:
            worst.append((mae, png.stem))
    assert not worst, f"clips off by more than 1 level on average: {sorted(worst)[-5:]}"
    assert float(np.mean(errors)) < 0.5


@pytest.mark.parametrize("backend", ["numpy", "scipy"])
def test_mel_db_is_librosas(backend, monkeypatch):
    """``mel_db`` gives librosa's own dB mel spectrogram with either FFT: numpy's (a
    process that makes a few windows) and scipy's (decode workers, ``use_scipy_fft``)."""
    import librosa

    monkeypatch.setattr(features, "_SCIPY_RFFT", None)  # restored after the test
    if backend == "scipy":
        features.use_scipy_fft()
        assert features._SCIPY_RFFT is not None

    rng = np.random.default_rng(3)
    t = np.arange(features.WINDOW_SAMPLES) / features.SAMPLE_RATE
    signals = [
        (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32),
        (0.5 * rng.standard_normal(features.SAMPLE_RATE * 7 + 123)).astype(np.float32),  # odd length
    ]
    for y in signals:
        power = np.abs(librosa.stft(y, n_fft=features.N_FFT, hop_length=features.HOP_LENGTH)) ** 2
        mel = librosa.feature.melspectrogram(S=power, sr=features.SAMPLE_RATE, n_mels=features.N_MELS)
        ref = librosa.power_to_db(mel, ref=np.max, top_db=features.TOP_DB)
        got = features.mel_db(y)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 0.01  # dB; one colour level is 80/255 = 0.31 dB


def test_one_window_needs_no_scipy():
    """A process that makes a window without ``use_scipy_fft`` never imports scipy
    (its import is a sixth of a one-file scan)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from tagger import features as F; "
        "F.window_matrix(np.random.default_rng(0).standard_normal(F.WINDOW_SAMPLES).astype(np.float32)); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'librosa')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_shipped_mel_basis_is_librosas():
    """``mel_basis.npz`` is what librosa makes for this representation (regenerate it if not)."""
    import librosa

    ref = librosa.filters.mel(sr=features.SAMPLE_RATE, n_fft=features.N_FFT, n_mels=features.N_MELS)
    np.testing.assert_allclose(features.mel_basis(), ref, rtol=1e-6, atol=1e-9)


def test_mel_basis_can_be_handed_over():
    basis = features.mel_basis()
    features.set_mel_basis(basis.copy())
    assert np.array_equal(features.mel_basis(), basis)
    with pytest.raises(ValueError):
        features.set_mel_basis(basis[:, :10])
