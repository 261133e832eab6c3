"""Fit the bridge's gain on clips that exist both as audio and as a window image.

Min–max scaling threw away each window's absolute level, so the bridge needs one
global gain ``g`` in ``log10(10000·g·x + 1)``. For every clip present in both
folders this computes musicnn's own input from the audio (as its extractor does)
and the bridged input from the image, and picks the ``log10 g`` that minimises
their squared difference over all clips; the correlation says how close the
bridge gets at that gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import features
from . import bridge as br


@dataclass
class Calibration:
    log10_gain: float
    correlation: float
    rmse: float
    clips: int

    def to_json(self) -> dict:
        return {"log10_gain": self.log10_gain, "correlation": self.correlation, "rmse": self.rmse, "clips": self.clips}


def paired_clips(audio_root: str | Path, png_root: str | Path) -> list[tuple[Path, Path]]:
    """(audio, image) pairs with the same clip id (``genre/genre.000NN``)."""
    audio_root, png_root = Path(audio_root), Path(png_root)
    pairs = []
    for audio in sorted(audio_root.rglob("*")):
        if not audio.is_file() or audio.suffix.lower() not in {".flac", ".wav", ".mp3", ".ogg", ".au"}:
            continue
        png = png_root / audio.parent.name / (audio.stem + ".png")
        if png.is_file():
            pairs.append((audio, png))
    return pairs


def calibrate(audio_root: str | Path, png_root: str | Path, *, limit: int | None = None) -> Calibration:
    """The least-squares ``log10 g`` over every pair, with its correlation and RMSE."""
    import librosa
    from scipy.optimize import minimize_scalar

    pairs = paired_clips(audio_root, png_root)[:limit]
    if not pairs:
        raise ValueError(f"no clip exists both under {audio_root} and {png_root}")
    linear, target = [], []
    for audio, png in pairs:
        y, sr = librosa.load(audio, sr=br.TEACHER_SAMPLE_RATE)
        t = br.teacher_input_from_audio(y, sr)
        n = min(len(t), br.BRIDGE_FRAMES)
        linear.append(br.bridge_linear(features.decode_png(png)[None])[0, :n])
        target.append(t[:n])
    lin = np.concatenate(linear).ravel().astype(np.float64)
    tgt = np.concatenate(target).ravel().astype(np.float64)

    def loss(lg: float) -> float:
        return float(np.mean((np.log10(10000.0 * 10.0**lg * lin + 1.0) - tgt) ** 2))

    best = minimize_scalar(loss, bounds=(-4.0, 8.0), method="bounded")
    pred = np.log10(10000.0 * 10.0**best.x * lin + 1.0)
    return Calibration(float(best.x), float(np.corrcoef(pred, tgt)[0, 1]), float(np.sqrt(best.fun)), len(pairs))
