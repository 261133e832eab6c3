"""Shared by the benchmarks: 4-minute MP3s made from the shared GTZAN clips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDIO_MINI = ROOT.parent / "shared" / "data" / "gtzan-audio-mini"


def clips() -> list[Path]:
    if not AUDIO_MINI.is_dir():
        raise SystemExit(f"needs {AUDIO_MINI} (the shared GTZAN clips)")
    return sorted(AUDIO_MINI.glob("*/*.flac"))


def four_minute_mp3s(out: Path, n: int, bitrate: str = "192k") -> list[Path]:
    """``n`` distinct 4-minute MP3s (8 shared clips each, concatenated), made once.

    ffmpeg makes a few base tracks; the rest are copies with a different ID3 title
    so every file is its own file (different bytes, same audio).
    """
    if shutil.which("ffmpeg") is None:
        raise SystemExit("needs ffmpeg")
    out.mkdir(parents=True, exist_ok=True)
    src = clips()
    bases = []
    for b in range(min(n, 12)):
        target = out / f"base{b:02d}.mp3"
        if not target.exists():
            chosen = [src[(b * 8 + i * 7) % len(src)] for i in range(8)]
            listing = out / f"base{b:02d}.txt"
            listing.write_text("".join(f"file '{p}'\n" for p in chosen))
            subprocess.run(
                ["ffmpeg", "-loglevel", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing),
                 "-ar", "44100", "-ac", "2", "-c:a", "libmp3lame", "-b:a", bitrate, str(target)],
                check=True,
            )
            listing.unlink()
        bases.append(target)
    from mutagen.id3 import ID3, TIT2

    files = []
    lib = out / "library"
    lib.mkdir(exist_ok=True)
    for i in range(n):
        f = lib / f"album{i // 10:03d}" / f"track{i:04d}.mp3"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bases[i % len(bases)], f)
            tags = ID3()
            tags.add(TIT2(encoding=3, text=[f"Track {i}"]))
            tags.save(f)
        files.append(f)
    return files
