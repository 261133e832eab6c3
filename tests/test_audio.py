"""Decoding: every format, seeking, long files and every kind of bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import helpers
import numpy as np
import pytest
import soundfile as sf
import soxr

from tagger import features
from tagger.audio import AudioError, load, load_windows, probe

SR = features.SAMPLE_RATE
ALL_FORMATS = list(helpers.FORMATS)
#: (codec, container) that ``probe`` reports for each test format.
EXPECTED_INFO = {
    "wav": ("pcm_16", "wav"),
    "aiff": ("pcm_16", "aiff"),
    "flac": ("flac", "flac"),
    "ogg": ("vorbis", "ogg"),
    "opus": ("opus", "ogg"),
    "mp3": ("mp3", "mp3"),
    "m4a": ("aac", "mp4"),
    "alac": ("alac", "mp4"),
    "wma": ("wmav2", "asf"),
}
#: Mean |level difference| (of 255) allowed between a lossy copy's window and the
#: lossless original's. WMA is loose: FFmpeg's wmav2 encoder/decoder pair drops the
#: first 1,024 samples, and a 46 ms shift moves every sampled column.
LOSSY_MAE = {"ogg": 6.0, "opus": 3.0, "mp3": 3.0, "m4a": 3.0, "wma": 25.0}


def one_line(exc: pytest.ExceptionInfo[AudioError], path: Path | None = None) -> str:
    """The error's message, checked to be a single line without the path in it."""
    msg = str(exc.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    if path is not None:
        assert str(path) not in msg and path.name not in msg
    return msg


def best_correlation(y: np.ndarray, ref: np.ndarray, max_lag: int = 2048) -> tuple[float, int]:
    """Peak normalised cross-correlation of ``y`` against ``ref`` within ``±max_lag``."""
    n = min(y.size, ref.size)
    a = y[:n] - y[:n].mean()
    b = ref[:n] - ref[:n].mean()
    xc = np.fft.irfft(np.fft.rfft(a, 2 * n) * np.conj(np.fft.rfft(b, 2 * n)))
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    vals = xc[lags]
    i = int(np.argmax(vals))
    return float(vals[i] / (np.linalg.norm(a) * np.linalg.norm(b))), int(lags[i])


def native_mono(path: Path) -> np.ndarray:
    """What ``load`` should give for a file soundfile reads: mean of channels, soxr 'HQ'."""
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    y = x.mean(axis=1)
    return y if rate == SR else soxr.resample(y, rate, SR, quality="HQ")


@pytest.fixture(scope="module")
def synth_stereo(synth_audio) -> Path:
    """12 s of 44.1 kHz stereo: every format is made from it (no ../shared needed)."""
    return synth_audio(12.0, 44_100, 2)


# --- the module itself ----------------------------------------------------------


def test_import_is_cheap():
    code = (
        "import sys, tagger.audio; "
        "print(sorted(m for m in ('av', 'soundfile', 'soxr', 'librosa') if m in sys.modules))"
    )
    root = str(helpers.ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_audio_error_is_always_one_line():
    assert str(AudioError("cannot decode:\n  bad\tdata ")) == "cannot decode: bad data"
    assert str(AudioError("")) == "cannot decode"


def test_bad_arguments_are_programming_errors(synth_audio):
    path = synth_audio()
    with pytest.raises(ValueError):
        load(path, offset=-1.0)
    with pytest.raises(ValueError):
        load(path, duration=0.0)


# --- decoding, from synthetic audio ----------------------------------------------


def test_native_rate_mono_is_read_exactly(synth_audio):
    path = synth_audio(8.0, SR, 1)
    y = load(path)
    expected, _ = sf.read(path, dtype="float32")
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, expected)
    info = probe(path)
    assert (info.sample_rate, info.channels, info.codec, info.container) == (SR, 1, "pcm_16", "wav")
    assert info.duration == pytest.approx(8.0)


def test_resamples_and_downmixes_like_librosa(synth_stereo):
    info = probe(synth_stereo)
    assert (info.sample_rate, info.channels) == (44_100, 2)
    y = load(synth_stereo)
    expected = native_mono(synth_stereo)
    assert y.dtype == np.float32 and y.shape == expected.shape == (12 * SR,)
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_decodes(fmt, synth_stereo, make_audio):
    path = make_audio(synth_stereo, fmt)
    info = probe(path)
    assert (info.codec, info.container) == EXPECTED_INFO[fmt]
    assert info.channels == 2
    assert info.duration == pytest.approx(12.0, abs=0.1)
    y = load(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert y.size / SR == pytest.approx(12.0, abs=0.1)
    corr, lag = best_correlation(y, native_mono(synth_stereo))
    if fmt in helpers.LOSSLESS:
        assert lag == 0 and corr > 0.9999
    else:
        assert corr > 0.95, f"{fmt}: correlation {corr:.3f} at lag {lag}"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_offset_and_duration_cut_the_same_stretch_as_a_full_decode(fmt, synth_stereo, make_audio):
    """Seeking (PyAV or libsndfile) lands on the same samples a full decode has there.

    Lossless formats match exactly. Lossy decoders may carry state past a seek (AAC's
    noise substitution draws from a running random generator), so for them the
    stretch must line up at lag 0 and correlate, not match bit for bit.
    """
    path = make_audio(synth_stereo, fmt)
    full = load(path)

    def same(y: np.ndarray, ref: np.ndarray) -> None:
        assert y.size == ref.size
        if fmt in helpers.LOSSLESS:
            np.testing.assert_allclose(y, ref, atol=1e-5)
        else:
            corr, lag = best_correlation(y, ref, max_lag=64)
            assert lag == 0 and corr > 0.99, f"{fmt}: correlation {corr:.4f} at lag {lag}"

    for offset, duration in [(0.4, 1.5), (3.3, 2.0), (7.25, 4.0)]:
        y = load(path, offset, duration)
        start = round(offset * SR)
        assert y.size == round(duration * SR)
        same(y, full[start : start + y.size])
    same(load(path, 10.5, 5.0), full[round(10.5 * SR) :])  # runs past the end
    with pytest.raises(AudioError) as exc:
        load(path, 60.0, 1.0)
    assert "no audio" in one_line(exc, path)


def test_format_is_sniffed_not_taken_from_the_name(synth_stereo, make_audio, tmp_path):
    flac_as_mp3 = tmp_path / "really-flac.mp3"
    flac_as_mp3.write_bytes(make_audio(synth_stereo, "flac").read_bytes())
    assert probe(flac_as_mp3).codec == "flac"
    np.testing.assert_allclose(load(flac_as_mp3), native_mono(synth_stereo), atol=1e-4)
    mp3_as_wav = tmp_path / "really-mp3.wav"
    mp3_as_wav.write_bytes(make_audio(synth_stereo, "mp3").read_bytes())
    assert probe(mp3_as_wav).codec == "mp3"
    assert load(mp3_as_wav).size == load(make_audio(synth_stereo, "mp3")).size


# --- real clips (../shared) -------------------------------------------------------


@pytest.fixture(scope="module")
def gtzan_window(gtzan_clip) -> np.ndarray:
    x, _ = sf.read(gtzan_clip, dtype="float32")
    return features.window_matrix(x).astype(np.int16)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_real_clip_keeps_its_representation(fmt, gtzan_clip, gtzan_window, make_audio):
    path = make_audio(gtzan_clip, fmt)
    windows = load_windows(path, 3)
    assert windows.shape == (1, features.N_MELS, features.N_COLUMNS)
    assert windows.dtype == np.uint8
    diff = np.abs(windows[0].astype(np.int16) - gtzan_window)
    if fmt in helpers.LOSSLESS:
        assert diff.max() == 0
    else:
        assert diff.mean() <= LOSSY_MAE[fmt], f"{fmt}: mean level difference {diff.mean():.2f}"


# --- bad input --------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioError) as exc:
        load(tmp_path / "nope.mp3")
    assert one_line(exc).startswith("cannot read")
    with pytest.raises(AudioError) as exc:
        probe(tmp_path)
    assert one_line(exc).startswith("cannot read")


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3", ".m4a", ".ogg", ".bin"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    for call in (probe, load, lambda p: load_windows(p, 3)):
        with pytest.raises(AudioError) as exc:
            call(path)
        assert one_line(exc, path) == "empty file"


@pytest.mark.parametrize("suffix", [".mp3", ".flac", ".wav", ".ogg", ".m4a", ".wma", ".opus"])
def test_non_audio_is_refused(tmp_path, suffix):
    text = tmp_path / f"notes{suffix}"
    text.write_text("These are not the droids you are looking for.\n" * 20)
    noise = tmp_path / f"noise{suffix}"
    noise.write_bytes(np.random.default_rng(1).bytes(20_000))
    for path in (text, noise):
        for call in (probe, load):
            with pytest.raises(AudioError) as exc:
                call(path)
            assert one_line(exc, path).startswith("cannot decode")


def test_image_named_mp3_has_no_audio(tmp_path):
    from PIL import Image

    path = tmp_path / "cover.mp3"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, format="PNG")
    with pytest.raises(AudioError) as exc:
        load(path)
    assert one_line(exc, path).startswith("cannot decode")


def test_mp3_cut_to_300_bytes(synth_stereo, make_audio, tmp_path):
    data = make_audio(synth_stereo, "mp3").read_bytes()
    path = tmp_path / "cut.mp3"
    path.write_bytes(data[:300])
    for call in (probe, load, lambda p: load_windows(p, 3)):
        with pytest.raises(AudioError) as exc:
            call(path)
        one_line(exc, path)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_truncated_half_decodes_what_is_there_or_refuses(fmt, synth_stereo, make_audio, tmp_path):
    """Never a crash: either the first part decodes, or one AudioError."""
    src = make_audio(synth_stereo, fmt)
    full = load(src)
    data = src.read_bytes()
    path = tmp_path / src.name
    path.write_bytes(data[: len(data) // 2])
    try:
        y = load(path)
    except AudioError as exc:
        assert str(exc) and "\n" not in str(exc)
        # Only MP4 keeps its index at the end; the others must give something.
        assert fmt in ("m4a", "alac"), f"{fmt}: {exc}"
        return
    assert y.dtype == np.float32 and 0.2 * full.size < y.size < 0.8 * full.size
    n = y.size - SR // 2  # the very end may be a partial frame
    atol = 1e-5 if fmt in helpers.LOSSLESS else 0.05
    np.testing.assert_allclose(y[:n], full[:n], atol=atol)


@pytest.mark.parametrize("fmt", ["mp3", "flac", "ogg", "m4a", "alac", "wma"])
def test_corrupt_middle_does_not_crash(fmt, synth_stereo, make_audio, tmp_path):
    """4 KB of garbage mid-file: decode around it (or stop there), never crash.

    Where the container has timestamps (MP4, ASF) the audio after the damage stays
    in its place; MP3 has none, so what follows moves up by the frames lost.
    """
    src = make_audio(synth_stereo, fmt)
    full = load(src)
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4000] = np.random.default_rng(2).bytes(4000)
    path = tmp_path / f"corrupt{helpers.FORMATS[fmt][0]}"
    path.write_bytes(bytes(data))
    try:
        y = load(path)
    except AudioError as exc:
        assert "\n" not in str(exc)
        return
    assert y.dtype == np.float32 and 3 * SR < y.size <= full.size
    if fmt in ("m4a", "alac", "wma"):
        assert y.size == full.size
        corr, lag = best_correlation(y[-SR:], full[-SR:], max_lag=64)
        assert lag == 0 and corr > 0.99


# --- load_windows -------------------------------------------------------------------


def test_silence_is_refused(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(10 * SR, np.float32), SR)
    with pytest.raises(AudioError) as exc:
        load_windows(path, 3)
    assert one_line(exc, path).startswith("silent audio")


def test_one_second_is_too_short(tmp_path):
    path = helpers.write_synth(tmp_path / "blip.flac", 1.0)
    with pytest.raises(AudioError) as exc:
        load_windows(path, 3)
    assert one_line(exc, path) == "too short to classify: 1.0 s (minimum 5 s)"


def test_header_promising_more_than_is_there(synth_audio, tmp_path):
    """A FLAC cut short keeps its header's length; the decoded length decides."""
    data = synth_audio(8.0, SR, 1, ".flac").read_bytes()
    path = tmp_path / "cut.flac"
    path.write_bytes(data[: len(data) // 4])
    assert probe(path).duration == pytest.approx(8.0)
    with pytest.raises(AudioError) as exc:
        load_windows(path, 3)
    assert one_line(exc, path).startswith("too short to classify")


def test_whole_track_is_one_window_of_the_whole_track(synth_audio):
    path = synth_audio(20.0, 44_100, 2, ".flac")
    windows = load_windows(path, 3)
    assert windows.shape == (1, features.N_MELS, features.N_COLUMNS)
    np.testing.assert_array_equal(windows[0], features.window_matrix(load(path)))


def test_longer_track_gets_planned_windows(synth_audio):
    path = synth_audio(70.0, SR, 1, ".ogg")
    plan = features.plan_windows(probe(path).duration, 3)
    windows = load_windows(path, 3)
    assert windows.shape == (len(plan.starts), features.N_MELS, features.N_COLUMNS) == (3, 128, 387)
    middle = features.window_matrix(load(path, plan.starts[1], plan.length))
    np.testing.assert_array_equal(windows[1], middle)


@pytest.mark.parametrize("suffix", [".mp3", ".m4a", ".ogg"])
def test_two_hour_file_decodes_only_its_windows(suffix, ffmpeg, tmp_path):
    """Three windows of a 2-hour file: seek, never hold the hour in memory."""
    path = helpers.make_long(tmp_path / f"long{suffix}", seconds=7200)
    info = probe(path)
    assert info.duration == pytest.approx(7200, abs=5)
    features.window_matrix(np.ones(10, np.float32))  # warm librosa outside the measurement
    tracemalloc.start()
    try:
        windows = load_windows(path, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert windows.shape == (3, features.N_MELS, features.N_COLUMNS)
    # A full decode would be 7200 s * 22050 * 4 bytes = 635 MB; one window is 2.6 MB.
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    # A steady tone: every window shows the same picture.
    assert np.abs(windows.astype(np.int16) - windows[0]).mean() < 2
    tone = load(path, 3600.0, 1.0)
    assert tone.size == SR
    assert np.argmax(np.abs(np.fft.rfft(tone))) == 440  # 1 Hz bins over 1 s


def test_errors_are_the_only_exception_type(tmp_path):
    """Callers catch AudioError and nothing else — whatever the input."""
    cases = {
        "dir.flac": None,
        "bytes.aiff": b"FORM\x00\x00\x00\x04AIFF",
        "riff.wav": b"RIFF\x24\x00\x00\x00WAVEfmt ",
        "id3.mp3": b"ID3\x03\x00\x00\x00\x00\x00\x10" + b"\x00" * 40,
        "ftyp.m4a": b"\x00\x00\x00\x18ftypM4A \x00\x00\x00\x00M4A mp42",
        "oggs.ogg": b"OggS\x00\x02" + b"\x00" * 60,
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        for call in (probe, load, lambda p: load_windows(p, 3)):
            with pytest.raises(AudioError) as exc:
                call(path)
            one_line(exc, path)
