"""Test audio on demand: conversions of real clips with ffmpeg, and synthetic signals.

Importable from any test module (``from helpers import ...``); ``conftest.py`` wraps
these in fixtures that skip cleanly when ffmpeg or ``../shared`` is missing.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import sqlite3
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from mutagen.aiff import AIFF
from mutagen.asf import ASF, ASFByteArrayAttribute
from mutagen.flac import FLAC, Picture
from mutagen.id3 import APIC, TALB, TCON, TIT2, TPE1, TSOP, TXXX, PictureType
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4, MP4Cover
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

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


def run_ffmpeg(*args: str | Path) -> bytes:
    """Run ffmpeg quietly and return its stdout; a failure shows its stderr."""
    exe = ffmpeg_path()
    if exe is None:
        raise RuntimeError("ffmpeg not installed")
    argv = [str(a) for a in args]
    proc = subprocess.run([exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *argv], capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(argv)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def audio_hash(path: Path) -> str:
    """sha256 of the decoded first audio stream (cover art is a video stream to ffmpeg)."""
    pcm = run_ffmpeg("-i", path, "-map", "0:a:0", "-f", "s16le", "-")
    assert len(pcm) > 100_000
    return hashlib.sha256(pcm).hexdigest()


# --- tagged files, as a person's tagger leaves them -------------------------------------


def _png() -> bytes:
    """A valid 1x1 PNG, built rather than pasted."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PNG = _png()
ID3_CLASSES: dict[str, Any] = {".mp3": MP3, ".aiff": AIFF, ".wav": WAVE}
ID3_MARKER, MP4_MARKER, ASF_MARKER = "TXXX:TAGGER_GENRE", "----:org.tagger:TAGGER_GENRE", "TAGGER/Genre"


def cover_picture() -> Picture:
    pic = Picture()
    pic.type, pic.mime, pic.data = PictureType.COVER_FRONT, "image/png", PNG
    pic.width, pic.height, pic.depth = 1, 1, 24
    return pic


def add_art(path: Path, family: str, tags: dict[str, str], *, hand_genre: str | None = None, extras: bool = False) -> None:
    """Cover art, added with mutagen the way a tagger would (ffmpeg wrote the other tags).

    A WAV gets its whole ID3v2.3 chunk here (title, artist and album from ``tags``, and
    ``hand_genre``), since ffmpeg writes RIFF INFO only. ``extras`` adds a few more tags
    that must survive tagging too: a MusicBrainz id, a sort artist, a comment, a composer.
    """
    if family == "id3":
        f = ID3_CLASSES[path.suffix](path, translate=False)
        if f.tags is None:
            f.add_tags()
            f.tags.add(TIT2(encoding=1, text=[tags["title"]]))
            f.tags.add(TPE1(encoding=1, text=[tags["artist"]]))
            f.tags.add(TALB(encoding=1, text=[tags["album"]]))
            if hand_genre:
                f.tags.add(TCON(encoding=1, text=[hand_genre]))
            f.tags.version = (2, 3, 0)
        f.tags.add(APIC(encoding=0, mime="image/png", type=PictureType.COVER_FRONT, desc="", data=PNG))
        if extras:
            f.tags.add(TXXX(encoding=1, desc="MusicBrainz Album Id", text=["0000-1111"]))
            # Off-spec in v2.3 but written by common taggers; must survive.
            f.tags.add(TSOP(encoding=1, text=["Artist, Test"]))
        f.save(v2_version=f.tags.version[1], v23_sep=None)
        return
    if family == "flac":
        f = FLAC(path)
        f.add_picture(cover_picture())
    elif family == "ogg":
        f = OggOpus(path) if path.suffix == ".opus" else OggVorbis(path)
        f["METADATA_BLOCK_PICTURE"] = [base64.b64encode(cover_picture().write()).decode("ascii")]
    elif family == "mp4":
        f = MP4(path)
        f.tags["covr"] = [MP4Cover(PNG, imageformat=MP4Cover.FORMAT_PNG)]
        if extras:
            f.tags["----:com.apple.iTunes:MusicBrainz Album Id"] = [b"0000-1111"]
    else:
        f = ASF(path)
        mime = "image/png".encode("utf-16-le") + b"\0\0"
        f.tags["WM/Picture"] = [ASFByteArrayAttribute(struct.pack("<bi", 3, len(PNG)) + mime + b"\0\0" + PNG)]
        if extras:
            f.tags["WM/Composer"] = ["Test Composer"]
    if extras and family in ("flac", "ogg"):
        f["COMMENT"] = ["hand comment"]
    f.save()


def read_tags(path: Path, family: str) -> dict[str, Any]:
    """What mutagen itself sees: genre values, our marker (raw), everything else (pictures
    included, keys as stored), picture count and ID3 version, so a test can compare a file
    before and after tagging."""
    if family == "id3":
        tags = ID3_CLASSES[path.suffix](path, translate=False).tags
        return {
            "genres": list(tags["TCON"].text) if "TCON" in tags else [],
            "marker": tags[ID3_MARKER].text[0] if ID3_MARKER in tags else None,
            "others": sorted((k, repr(v)) for k, v in tags.items() if k not in {"TCON", ID3_MARKER}),
            "pictures": len(tags.getall("APIC")),
            "version": tags.version,
        }
    if family in ("flac", "ogg"):
        f = FLAC(path) if family == "flac" else OggOpus(path) if path.suffix == ".opus" else OggVorbis(path)
        pairs = list(f.tags or [])
        pics = [(p.type, p.mime, p.data) for p in f.pictures] if family == "flac" else []
        pics += [("mbp", v) for k, v in pairs if k.lower() == "metadata_block_picture"]
        markers = [v for k, v in pairs if k.lower() == "tagger_genre"]
        return {
            "genres": [v for k, v in pairs if k.lower() == "genre"],
            "marker": markers[0] if markers else None,
            "others": sorted((k, v) for k, v in pairs if k.lower() not in {"genre", "tagger_genre"}) + pics,
            "pictures": len(pics),
            "version": None,
        }
    if family == "mp4":
        tags = MP4(path).tags
        return {
            "genres": list(tags.get("©gen", [])),
            "marker": bytes(tags[MP4_MARKER][0]).decode() if MP4_MARKER in tags else None,
            "others": sorted((k, repr(v)) for k, v in tags.items() if k not in {"©gen", "gnre", MP4_MARKER}),
            "pictures": len(tags.get("covr", [])),
            "version": None,
        }
    tags = ASF(path).tags
    return {
        "genres": [str(v) for k, v in tags if k == "WM/Genre"],
        "marker": next((str(v) for k, v in tags if k == ASF_MARKER), None),
        "others": sorted((k, type(v).__name__, repr(v.value)) for k, v in tags if k not in {"WM/Genre", ASF_MARKER}),
        "pictures": sum(1 for k, _ in tags if k == "WM/Picture"),
        "version": None,
    }


def exact_tags(path: Path) -> dict[str, Any]:
    """Every tag frame or field of ``path`` as stored, for "identical to before" checks.

    ID3: every frame's repr (encoding and raw text: ``(17)`` is not ``Rock``), whether an
    ID3v2 tag exists, its version, the ID3v1 block byte for byte. Vorbis comments: the
    ordered (key, value) list, the vendor string, FLAC's metadata block types. MP4: every
    atom's repr and whether a metadata atom exists. ASF: the ordered attributes with
    type, language and stream. The format comes from the content, as in tagger.
    """
    import mutagen

    f = mutagen.File(path)
    assert f is not None, path
    data = path.read_bytes()
    if isinstance(f, (MP3, AIFF, WAVE)):
        tags = type(f)(path, translate=False).tags
        return {
            "id3v2": None if tags is None or tags.version < (2, 2, 0) else tags.version,
            "frames": sorted(repr(v) for v in tags.values()) if tags is not None else [],
            "id3v1": data[-128:] if isinstance(f, MP3) and data[-128:-125] == b"TAG" else None,
        }
    if isinstance(f, (FLAC, OggOpus, OggVorbis)):
        blocks = [b.code for b in f.metadata_blocks if b.code != 1] if isinstance(f, FLAC) else None  # 1: padding
        return {
            "comments": list(f.tags) if f.tags is not None else None,
            "vendor": f.tags.vendor if f.tags is not None else None,
            "blocks": blocks,
            "pictures": [(p.type, p.mime, p.data) for p in f.pictures] if isinstance(f, FLAC) else None,
        }
    if isinstance(f, MP4):
        return {"atoms": sorted((k, repr(v)) for k, v in f.tags.items()) if f.tags is not None else None}
    assert isinstance(f, ASF), path
    return {"attributes": [(k, type(v).__name__, repr(v.value), v.language, v.stream) for k, v in f.tags]}


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


# --- a library tagged by its owner, for tagger learn --------------------------------------

#: How the owner of :func:`owner_library` spells each GTZAN genre they tagged: the label
#: ``tagger learn`` should arrive at, and the values written into the files (in turn).
#: ``(17)``/``(13)`` are ID3v1 genre numbers (Rock, Pop), ``Rap; Hip Hop`` holds two genres.
OWNER_LABELS = {
    "disco": ("Disco", ["Disco"]),
    "hiphop": ("Rap", ["Rap; Hip Hop", "rap", "Rap; Hip Hop"]),
    "jazz": ("Jazz & Swing", ["Jazz & Swing", "jazz and swing", "Jazz & Swing", "Jazz-and-Swing"]),
    "metal": ("Heavy", ["Heavy"]),
    "pop": ("Pop", ["(13)", "Pop", "13"]),
    "reggae": ("Roots Reggae", ["Roots Reggae", "reggae"]),  # reggae: an alias in the config
    "rock": ("Rock", ["(17)", "rock", "ROCK", "Rock"]),
}
OWNER_ALIASES = {"reggae": "Roots Reggae"}


def split_ids(name: str) -> set[str]:
    """``<genre>/<id>`` lines of a shared split file (``train.txt``, ``valid.txt``)."""
    return set((MEL_PNG / "splits" / name).read_text().split())


def owner_library(out: Path) -> list[dict[str, Any]]:
    """The shared clips as an owner's library: training-split clips carry the owner's genre
    tags (:data:`OWNER_LABELS`), validation-split clips carry none. Clips in neither split
    (GTZAN's faulty ones) are left out.

    Two clips of a genre make an album (``<Genre> Artist/Album N``); every other album has
    an album tag, the rest are grouped by folder. Formats alternate between FLAC (Vorbis
    comments, genre values as typed) and MP3 (ID3v2.3 whose TCON holds the value as typed,
    so ``(17)`` stays a number in the file). One record per file: path, genre (GTZAN's),
    split, the values written and the label expected.
    """
    from mutagen.id3 import ID3

    train, valid = split_ids("train.txt"), split_ids("valid.txt")
    records = []
    for genre_dir in sorted(AUDIO_MINI.iterdir()):
        genre = genre_dir.name
        clips = [c for c in sorted(genre_dir.glob("*.flac")) if f"{genre}/{c.stem}" in train | valid]
        for i, clip in enumerate(clips):
            split = "train" if f"{genre}/{clip.stem}" in train else "valid"
            album = out / f"{genre.title()} Artist" / f"Album {i // 2}"
            album.mkdir(parents=True, exist_ok=True)
            mp3 = i % 2 == 1
            meta = ["-map_metadata", "-1", "-metadata", f"title={clip.stem}", "-metadata", f"artist={genre.title()} Artist"]
            if (i // 2) % 3 != 2:  # every third album only has its folder
                meta += ["-metadata", f"album={genre.title()} Album {i // 2}"]
            if mp3:
                path = album / f"{clip.stem}.mp3"
                run_ffmpeg("-i", clip, *meta, "-c:a", "libmp3lame", "-b:a", "128k", "-id3v2_version", "3", path)
            else:
                path = album / f"{clip.stem}.flac"
                run_ffmpeg("-i", clip, *meta, "-c:a", "flac", path)
            values: list[str] = []
            label = None
            if split == "train" and genre in OWNER_LABELS:
                label, spellings = OWNER_LABELS[genre]
                n = sum(1 for r in records if r["genre"] == genre and r["split"] == "train")
                values = [spellings[n % len(spellings)]]
                if mp3:
                    tags = ID3(path)
                    tags.add(TCON(encoding=1, text=values))
                    tags.save(path, v2_version=3)
                else:
                    f = FLAC(path)
                    f["GENRE"] = values
                    f.save()
            records.append({"path": path, "genre": genre, "split": split, "values": values, "label": label})
    return records


def rows(db: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of a read-only query on a real database file, as dicts."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()
