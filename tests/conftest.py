"""Shared fixtures: ``../shared`` data, ffmpeg conversions, synthetic audio.

Anything that needs ``../shared`` or ffmpeg skips with a reason when it is absent,
so the suite passes on a fresh clone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# `tagger` from this checkout without `pip install -e .`; `helpers` whatever the
# import mode (and if tests/ ever becomes a package).
for _p in (str(ROOT), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import helpers  # noqa: E402

SHARED = helpers.SHARED


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    """``../shared/data/gtzan-audio-mini`` (real 30-second GTZAN clips, FLAC)."""
    if not helpers.AUDIO_MINI.is_dir():
        pytest.skip("../shared not present")
    return helpers.AUDIO_MINI


@pytest.fixture(scope="session")
def shared_png() -> Path:
    """``../shared/data/gtzan-mel-png`` (the training images)."""
    if not helpers.MEL_PNG.is_dir():
        pytest.skip("../shared not present")
    return helpers.MEL_PNG


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    path = helpers.ffmpeg_path()
    if path is None:
        pytest.skip("ffmpeg not installed")
    return path


@pytest.fixture(scope="session")
def make_audio(ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_audio(src, fmt, out_dir=None, **kw)`` → converted file (see ``helpers.make_audio``).

    Without ``out_dir`` the result is cached for the session, so tests that want the
    same conversion share one ffmpeg run; treat those files as read-only.
    """
    cache: dict[tuple[str, str], Path] = {}
    base = tmp_path_factory.mktemp("converted")

    def convert(src: str | Path, fmt: str, out_dir: str | Path | None = None, **kw) -> Path:
        if out_dir is not None or kw:
            return helpers.make_audio(src, fmt, out_dir or base, **kw)
        key = (str(src), fmt)
        if key not in cache:
            d = base / f"{len(cache)}"
            d.mkdir()
            cache[key] = helpers.make_audio(src, fmt, d)
        return cache[key]

    return convert


@pytest.fixture(scope="session")
def synth_audio(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synth_audio(seconds=8, sr=22050, channels=1, suffix=".wav")`` → cached file path."""
    cache: dict[tuple[float, int, int, str], Path] = {}
    base = tmp_path_factory.mktemp("synth")

    def make(
        seconds: float = 8.0, sr: int = 22_050, channels: int = 1, suffix: str = ".wav"
    ) -> Path:
        key = (seconds, sr, channels, suffix)
        if key not in cache:
            name = f"synth-{seconds:g}s-{sr}hz-{channels}ch{suffix}"
            cache[key] = helpers.write_synth(base / name, seconds, sr, channels)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gtzan_clip(shared_audio: Path) -> Path:
    """One real clip with a full spectrum (rock), for format round trips."""
    return shared_audio / "rock" / "rock.00001.flac"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle of a tiny DenseNet trained for one epoch on synthetic windows.

    Seconds to train; its genres are noise, but everything around it (saving,
    loading, batching, tagging, recording) is the real thing. Low/high bands carry
    the label so the model is not entirely blind.
    """
    import numpy as np

    from tagger import features
    from tagger.dataset import Dataset
    from tagger.model.train import TrainConfig, run_training

    rng = np.random.default_rng(0)
    labels = ["blues", "classical", "jazz", "rock"]
    n = 32
    y = np.arange(n) % len(labels)
    x = rng.integers(0, 80, size=(n, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    for i, label in enumerate(y):
        lo = label * 32
        x[i, lo : lo + 32] += 150
    ds = Dataset(x, y, np.arange(n), [f"{labels[k]}/{i}" for i, k in enumerate(y)], labels)
    cfg = TrainConfig(
        epochs=1,
        batch_size=16,
        crop=64,
        members=1,
        warmup_epochs=0,
        arch={"blocks": [1, 1], "growth": 4, "stem_filters": 8, "bottleneck": 2},
    )
    out = tmp_path_factory.mktemp("tiny-bundle")
    run_training(ds, ds, cfg, out, name="tiny-test", data_summary={"synthetic": True})
    return out
