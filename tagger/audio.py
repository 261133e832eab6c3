"""Any audio file → mono float32 at ``features.SAMPLE_RATE``, or one clear error.

Two decoders cover the formats a music library holds:

- libsndfile (through ``soundfile``) for WAV, AIFF, FLAC, Ogg Vorbis and Opus: it
  seeks sample-accurately and decodes exactly what ``librosa.load`` decodes, so the
  GTZAN clips behind the training images are reproduced bit for bit;
- PyAV (FFmpeg) for everything else: MP3, M4A (AAC, ALAC), WMA, … MP3 goes here
  too although libsndfile reads it: libsndfile trusts a VBR file's first frame for
  its length (and silently stops there when there is no Xing header) and prints
  mpg123 warnings to stderr.

Only the stretch asked for is decoded (seek first), so three 30-second windows of a
two-hour file cost about as much as one 30-second clip. Resampling is ``soxr`` 'HQ',
as in ``librosa.load``. Every failure — missing, empty, truncated, non-audio,
undecodable — is an :class:`AudioError` whose ``str()`` is one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagger import features

if TYPE_CHECKING:
    import soundfile

#: Extensions libsndfile is tried on first; anything else goes straight to PyAV.
_SOUNDFILE_SUFFIXES = frozenset(
    {
        ".wav",
        ".wave",
        ".aif",
        ".aiff",
        ".aifc",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".caf",
        ".w64",
        ".rf64",
        ".au",
        ".snd",
    }
)
#: Frames per libsndfile read: a corrupt block loses at most this much.
_SF_BLOCK = 1 << 15
#: Extra input kept on both sides of a stretch that is resampled, so the
#: resampler's edges fall outside it (soxr 'HQ' needs a few ms).
_RESAMPLE_MARGIN = 0.05
#: Decoders need some packets before the target to warm up (MP3 bit reservoir,
#: AAC overlap, Opus pre-roll); PyAV seeks this far before the offset.
_PREROLL = 0.5
#: Offsets below this are reached by decoding from the start rather than seeking.
_SEEK_MIN = 2.0


class AudioError(Exception):
    """The one error callers catch: the file cannot give audio. ``str()`` is one line."""

    def __init__(self, reason: object) -> None:
        super().__init__(" ".join(str(reason).split()) or "cannot decode")


@dataclass(frozen=True)
class AudioInfo:
    """What the header says, enough to plan windows without decoding."""

    duration: float
    sample_rate: int
    channels: int
    codec: str
    container: str


# --- public API ----------------------------------------------------------------


def probe(path: str | Path) -> AudioInfo:
    """Header-only facts about ``path`` (decodes only when the header has no length)."""
    p = _check_file(path)
    sf_file = _open_soundfile(p)
    if sf_file is not None:
        with sf_file:
            info = AudioInfo(
                duration=sf_file.frames / sf_file.samplerate,
                sample_rate=int(sf_file.samplerate),
                channels=int(sf_file.channels),
                codec=_sf_codec(sf_file.format, sf_file.subtype),
                container=sf_file.format.lower(),
            )
    else:
        info = _av_probe(p)
    if not (info.duration > 0 and math.isfinite(info.duration)):
        raise AudioError("no audio (zero duration)")
    return info


def load(path: str | Path, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
    """Mono float32 samples at ``features.SAMPLE_RATE`` from ``offset`` for ``duration`` s.

    ``duration=None`` reads to the end. Only the requested stretch is decoded. A
    truncated file gives what decodes; nothing at all decoding is an ``AudioError``.
    """
    if not (offset >= 0 and math.isfinite(offset)):
        raise ValueError(f"offset must be a finite number >= 0, got {offset!r}")
    if duration is not None and not (duration > 0 and math.isfinite(duration)):
        raise ValueError(f"duration must be a finite number > 0 or None, got {duration!r}")
    p = _check_file(path)
    sf_file = _open_soundfile(p)
    if sf_file is not None:
        with sf_file:
            x, rate, t_first = _sf_read(sf_file, offset, duration)
    else:
        x, rate, t_first = _av_read(p, offset, duration)
    y = _to_target(x, rate, t_first, offset, duration)
    if y.size == 0:
        where = f" at {offset:.1f} s" if offset > 0 else ""
        raise AudioError(f"cannot decode: no audio data{where}")
    return y


def load_windows(path: str | Path, max_windows: int) -> np.ndarray:
    """The track as ``features.plan_windows`` covers it: ``(n, N_MELS, N_COLUMNS)`` uint8.

    A track up to ``WHOLE_TRACK_SECONDS`` is loaded whole (as the GTZAN clips were);
    longer ones decode only their windows. Windows that are silent or hold no data
    (a truncated tail) are left out; the track fails only when none is left.
    """
    info = probe(path)
    try:
        plan = features.plan_windows(info.duration, max_windows)
    except ValueError as exc:
        raise AudioError(str(exc)) from None
    whole = info.duration <= features.WHOLE_TRACK_SECONDS
    mats: list[np.ndarray] = []
    last: Exception | None = None
    for start in plan.starts:
        try:
            if whole:
                y = load(path)
                # The header may promise more than a truncated file holds.
                features.plan_windows(y.size / features.SAMPLE_RATE, 1)
            else:
                y = load(path, start, plan.length)
            mats.append(features.window_matrix(y))
        except (AudioError, ValueError) as exc:  # SilentAudioError is a ValueError
            last = exc
    if not mats:
        raise AudioError(str(last)) from None
    return np.stack(mats)


# --- shared helpers ------------------------------------------------------------


def _check_file(path: str | Path) -> Path:
    """Fail early, with a plain reason, on what no decoder should be handed."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise AudioError(f"cannot read: {exc.strerror or exc}") from None
    if not p.is_file():
        raise AudioError("cannot read: not a regular file")
    if st.st_size == 0:
        raise AudioError("empty file")
    return p


def _to_target(
    x: np.ndarray, rate: int, t_first: float, offset: float, duration: float | None
) -> np.ndarray:
    """Resample native-rate mono ``x`` (starting at ``t_first`` s) and cut out the stretch."""
    if x.size and rate != features.SAMPLE_RATE:
        import soxr

        x = soxr.resample(x, rate, features.SAMPLE_RATE, quality="HQ")
    start = max(0, round((offset - t_first) * features.SAMPLE_RATE))
    stop = None if duration is None else start + round(duration * features.SAMPLE_RATE)
    return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def _span(offset: float, duration: float | None, rate: int) -> tuple[int, float]:
    """Native samples to decode: the stretch plus, when resampling, a margin.

    Returns the first sample index and the end time (s). The first index is put on
    the grid shared by both rates, so the resampled stretch lines up sample for
    sample with the same stretch of a resampled full decode.
    """
    margin = 0.0 if rate == features.SAMPLE_RATE else _RESAMPLE_MARGIN
    first = math.floor(max(0.0, offset - margin) * rate)
    first -= first % (rate // math.gcd(rate, features.SAMPLE_RATE))
    hi = math.inf if duration is None else offset + duration + margin
    return first, hi


def _reason(exc: BaseException) -> str:
    """A decoder's complaint without the path or errno decorations it carries."""
    text = getattr(exc, "error_string", None) or getattr(exc, "strerror", None) or str(exc)
    text = str(text).strip().rstrip(".")
    return text[:1].lower() + text[1:] if text else type(exc).__name__


# --- libsndfile ----------------------------------------------------------------


def _open_soundfile(p: Path) -> soundfile.SoundFile | None:
    """An open ``SoundFile`` when libsndfile should decode ``p``, else ``None`` (use PyAV)."""
    if p.suffix.lower() not in _SOUNDFILE_SUFFIXES:
        return None
    import soundfile as sf

    try:
        f = sf.SoundFile(str(p))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError):
        return None
    if f.format == "MP3" or f.frames <= 0 or f.samplerate <= 0:
        f.close()
        return None
    return f


def _sf_codec(fmt: str, subtype: str) -> str:
    if fmt == "FLAC":
        return "flac"
    if subtype.startswith("PCM_") or subtype in ("FLOAT", "DOUBLE"):
        return "pcm_" + subtype.removeprefix("PCM_").lower()
    return {"MPEG_LAYER_III": "mp3"}.get(subtype, subtype.lower())


def _sf_read(
    f: soundfile.SoundFile, offset: float, duration: float | None
) -> tuple[np.ndarray, int, float]:
    """Seek and read only the frames needed; keep what decodes before an error."""
    import soundfile as sf

    rate = int(f.samplerate)
    first, hi = _span(offset, duration, rate)
    remaining = f.frames - first if math.isinf(hi) else round(hi * rate) - first
    blocks: list[np.ndarray] = []
    try:
        if first >= f.frames:
            remaining = 0
        elif first > 0:
            f.seek(first)
        while remaining > 0:
            block = f.read(min(_SF_BLOCK, remaining), dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                break
            blocks.append(block.mean(axis=1) if block.shape[1] > 1 else block[:, 0])
            remaining -= block.shape[0]
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        if not blocks:
            raise AudioError(f"cannot decode: {_reason(exc)}") from None
    x = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return x, rate, first / rate


# --- PyAV ----------------------------------------------------------------------


def _av_open(p: Path) -> tuple[Any, Any]:
    """An open container and its first audio stream, or ``AudioError``."""
    import av

    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise AudioError(f"cannot decode: {_reason(exc)}") from None
    if not container.streams.audio:
        container.close()
        raise AudioError("cannot decode: no audio stream")
    return container, container.streams.audio[0]


def _av_probe(p: Path) -> AudioInfo:
    import av

    container, stream = _av_open(p)
    with container:
        ctx = stream.codec_context
        duration = 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        rate = int(ctx.sample_rate or 0)
        channels = int(ctx.channels or 0)
        codec = ctx.codec.name.removesuffix("float").removesuffix("_fixed")  # mp3float → mp3
        name = container.format.name.split(",")[0]
        fmt = "mp4" if name == "mov" else name
    if duration <= 0:  # the header does not say: count what decodes
        x, native, _ = _av_read(p, 0.0, None)
        duration = x.size / native if native else 0.0
        rate = rate or native
    return AudioInfo(duration, rate, channels, codec, fmt)


def _frame_mono(frame: Any) -> np.ndarray:
    """One decoded frame → mono float32 (mean of channels, like ``librosa.to_mono``)."""
    a = frame.to_ndarray()
    n_ch = max(1, frame.layout.nb_channels)
    if not frame.format.is_planar:
        a = a.reshape(-1, n_ch).T
    if a.dtype.kind == "i":
        a = a.astype(np.float32) / float(2 ** (8 * a.dtype.itemsize - 1))
    elif a.dtype.kind == "u":
        a = (a.astype(np.float32) - 128.0) / 128.0
    a = a.astype(np.float32, copy=False)
    return a.mean(axis=0, dtype=np.float32) if a.shape[0] > 1 else a[0]


def _av_read(
    p: Path, offset: float, duration: float | None, seek: bool = True
) -> tuple[np.ndarray, int, float]:
    """Decode ``[offset, offset + duration)`` (plus margins) with PyAV.

    Times are measured from the first decoded sample of the file, so a stretch read
    after a seek lines up with the same stretch of a full decode.
    """
    import av

    container, stream = _av_open(p)
    with container:
        frames = container.decode(stream)
        try:
            head = next(frames, None)
        except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
            raise AudioError(f"cannot decode: {_reason(exc)}") from None
        if head is None or not head.sample_rate:
            raise AudioError("cannot decode: no audio data")
        rate = int(head.sample_rate)
        origin = head.time
        first, hi = _span(offset, duration, rate)
        hi = min(hi, _mp4_end(container, stream, origin))
        lo = first / rate
        if not seek or origin is None or lo - _PREROLL < _SEEK_MIN:
            return _av_collect(frames, head, 0, first, hi, rate)
        for back in (_PREROLL, 5.0, 30.0):
            if lo - back <= 0:
                break
            seeked = _av_seek(container, stream, origin + lo - back)
            if seeked is None:
                break
            frames, head = seeked
            if head is None:  # past the end of what decodes
                return np.zeros(0, np.float32), rate, lo
            if head.time is not None and head.time - origin <= lo:
                pos = _position(head, origin, stream.time_base, rate)
                return _av_collect(frames, head, pos, first, hi, rate)
    # Seeking failed or kept landing late: decode from the start instead.
    return _av_read(p, offset, duration, seek=False)


def _mp4_end(container: Any, stream: Any, origin: float | None) -> float:
    """Where an MP4/M4A track ends (s from the first sample), else ``inf``.

    Its header length comes from the edit list and is exact; FFmpeg still hands
    out the AAC encoder's padding after it (up to a frame), which would lengthen a
    whole-track window and shift every column the representation samples.
    """
    if not container.format.name.startswith("mov") or not stream.duration or origin is None:
        return math.inf
    tb = stream.time_base
    return float((stream.duration + (stream.start_time or 0)) * tb) - origin


def _position(frame: Any, origin: float, time_base: Any, rate: int) -> int:
    """Sample index of ``frame`` counted from the file's first decoded sample.

    Containers with coarse timestamps (ASF/WMA: milliseconds) are snapped to whole
    frames when that is within the rounding, so a seek lands on the exact sample.
    """
    pos = (frame.time - origin) * rate
    n = frame.samples
    if time_base is not None and float(time_base) * rate > 1 and n > 0:
        snapped = round(pos / n) * n
        if abs(snapped - pos) <= float(time_base) * rate + 1:  # both times rounded
            return snapped
    return round(pos)


def _av_seek(container: Any, stream: Any, seconds: float) -> tuple[Any, Any] | None:
    """Seek to a keyframe at/before ``seconds``; the new frame iterator and its first frame."""
    import av

    try:
        container.seek(int(seconds / stream.time_base), stream=stream, backward=True)
        frames = container.decode(stream)
        return frames, next(frames, None)
    except (av.FFmpegError, OSError, ValueError, EOFError):
        return None


def _av_collect(
    frames: Any, head: Any, pos: int, first: int, hi: float, rate: int
) -> tuple[np.ndarray, int, float]:
    """Gather samples ``first`` … ``hi`` s; ``head`` is the frame at sample ``pos``.

    Positions are counted in samples from ``head`` rather than read from each
    frame's timestamp (which can be rounded). A decoding error ends the stretch early.
    """
    import av

    chunks: list[np.ndarray] = []
    stop = math.inf if math.isinf(hi) else math.ceil(hi * rate)
    got = 0
    frame = head
    while frame is not None and pos < stop:
        n = frame.samples
        if n > 0 and frame.sample_rate == rate and pos + n > first:
            mono = _frame_mono(frame)
            chunks.append(mono[max(0, first - pos) :])
            got += chunks[-1].size
        pos += n
        try:
            frame = next(frames, None)
        except (av.FFmpegError, OSError, ValueError, EOFError):
            break  # truncated or corrupt from here on: keep what decoded
    x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    start = max(first, pos - got)  # a gap before the stretch leaves it later
    if not math.isinf(stop):
        x = x[: max(0, int(stop - start))]
    return x, rate, start / rate
