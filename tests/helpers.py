"""Test audio on demand: conversions of real clips with ffmpeg, and synthetic signals.

Importable from any test module (``from helpers import ...``); ``conftest.py`` wraps
these in fixtures that skip cleanly when ffmpeg or ``../shared`` is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
AUDIO_MINI = SHARED / "data" / "gtzan-audio-mini"
MEL_PNG = SHARED / "data" / "gtzan-mel-png"

#: name → (file suffix, ffmpeg output options). Bitrates are pinned so results do
#: not drift with ffmpeg's defaults.
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "wav": (".wav", ("-c:a", "pcm_s16le")),
    "aiff": (".aiff", ("-c:a", "pcm_s16be")),
    "flac": (".flac", ("-c:a", "flac")),
    "ogg": (".ogg", ("-c:a", "libvorbis", "-q:a", "4")),
    "opus": (".opus", ("-c:a", "libopus", "-b:a", "96k")),
    "mp3": (".mp3", ("-c:a", "libmp3lame", "-b:a", "128k")),
    "m4a": (".m4a", ("-c:a", "aac", "-b:a", "128k")),
    "alac": (".alac.m4a", ("-c:a", "alac")),
    "wma": (".wma", ("-c:a", "wmav2", "-b:a", "128k")),
}
LOSSLESS = frozenset({"wav", "aiff", "flac", "alac"})


def ffmpeg_path() -> str | None:
    return shutil.which("ffmpeg")


def run_ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; a failure shows its stderr."""
    exe = ffmpeg_path()
    if exe is None:
        raise RuntimeError("ffmpeg not installed")
    proc = subprocess.run(
        [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {proc.stderr.strip()}")


def make_audio(
    src: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    name: str | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    """Convert ``src`` to ``fmt`` (a key of ``FORMATS``) in ``out_dir``; return the path.

    ``extra`` goes before the output name (e.g. ``("-metadata", "genre=Rock")`` or
    ``("-ar", "44100", "-ac", "2")``). The file is named ``<stem><suffix>`` (ALAC:
    ``<stem>.alac.m4a``) unless ``name`` is given.
    """
    suffix, opts = FORMATS[fmt]
    src = Path(src)
    out = Path(out_dir) / (name or src.stem + suffix)
    if out.resolve() == src.resolve():  # ffmpeg refuses to overwrite its input
        out = out.with_name(f"{src.stem}-{fmt}{suffix}")
    run_ffmpeg("-i", str(src), "-map", "0:a:0", *opts, *extra, str(out))
    return out


def make_long(out: str | Path, seconds: int = 7200, freq: int = 440) -> Path:
    """A long tone file made in about a second: encode one minute, then loop it by copy.

    The format follows the suffix (``.mp3``, ``.m4a``, ``.ogg``).
    """
    out = Path(out)
    codec = {
        ".mp3": ("-c:a", "libmp3lame", "-b:a", "16k"),
        ".m4a": ("-c:a", "aac", "-b:a", "16k"),
        ".ogg": ("-c:a", "libvorbis", "-q:a", "0"),
    }[out.suffix]
    one = out.with_name(out.stem + ".one" + out.suffix)
    minute = min(60, seconds)
    run_ffmpeg(
        "-f", "lavfi", "-i", f"sine=frequency={freq}:duration={minute}:sample_rate=22050",
        *codec, str(one),
    )  # fmt: skip
    loops = max(0, -(-seconds // minute) - 1)
    run_ffmpeg("-stream_loop", str(loops), "-i", str(one), "-c", "copy", str(out))
    one.unlink()
    return out


def synth_signal(seconds: float, sr: int = 22_050, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Music-like test audio: a walk of harmonic notes, a rising chirp and a little noise.

    Shape ``(n,)`` for mono, ``(n, channels)`` otherwise; the channels differ so a
    downmix is visible. Peak about 0.8, float32.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    out = np.empty((n, channels), dtype=np.float64)
    note_len = 0.25
    for ch in range(channels):
        steps = rng.integers(-5, 6, size=int(np.ceil(seconds / note_len)) + 1)
        midi = np.clip(57 + np.cumsum(steps), 40, 84)
        freq = 440.0 * 2 ** ((midi[(t // note_len).astype(int)] - 69) / 12)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        env = np.exp(-3.0 * (t % note_len))
        y = sum(np.sin(k * phase) / k for k in (1, 2, 3, 5)) * env
        f0, f1 = 100.0 * (ch + 1), 6_000.0
        y += 0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
        y += 0.05 * rng.standard_normal(n)
        out[:, ch] = y
    out *= 0.8 / np.max(np.abs(out))
    out = out.astype(np.float32)
    return out[:, 0] if channels == 1 else out


def write_synth(
    path: str | Path,
    seconds: float,
    sr: int = 22_050,
    channels: int = 1,
    subtype: str | None = None,
    seed: int = 0,
) -> Path:
    """``synth_signal`` written with soundfile (format from the suffix)."""
    import soundfile as sf

    path = Path(path)
    sf.write(path, synth_signal(seconds, sr, channels, seed), sr, subtype=subtype)
    return path
