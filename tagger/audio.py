"""Any audio file → mono float32 at ``features.SAMPLE_RATE``, or one clear error.

Two decoders cover the formats a music library holds, chosen by the file's first
bytes rather than its name:

- libsndfile (through ``soundfile``) for WAV, AIFF, FLAC, Ogg Vorbis and Opus: it
  seeks sample-accurately and decodes exactly what ``librosa.load`` decodes, so the
  GTZAN clips behind the training images are reproduced bit for bit;
- PyAV (FFmpeg) for everything else, and for whatever libsndfile refuses: MP3, M4A
  (AAC, ALAC), WMA, … MP3 goes here although libsndfile reads it: libsndfile takes
  a VBR file's length from its first frame (and silently stops there when there is
  no Xing header), and its mpg123 prints warnings to stderr.

Only the stretch asked for is decoded (seek first), so a few 30-second windows of a
two-hour file cost about as much as one 30-second clip. Resampling is ``soxr`` 'HQ',
as in ``librosa.load``. Every failure — missing, empty, truncated, non-audio,
undecodable — is an :class:`AudioError` whose ``str()`` is one line.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagger import features

if TYPE_CHECKING:
    import soundfile

#: File signatures handed to libsndfile (WAV/RF64, AIFF, FLAC, Ogg, CAF, W64, AU);
#: anything else goes straight to PyAV. Sniffing rather than trusting the suffix
#: also keeps libsndfile's MP3 decoder (and its stderr chatter) off junk files.
_SOUNDFILE_MAGIC = (
    b"RIFF",
    b"RIFX",
    b"RF64",
    b"BW64",
    b"FORM",
    b"fLaC",
    b"OggS",
    b"caff",
    b"riff",
    b".snd",
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
#: Consecutive undecodable packets after which the rest of a file is given up.
_MAX_BAD_PACKETS = 32
#: Longest run of lost packets (s) kept as silence; a bigger jump is a bad timestamp.
_MAX_GAP = 10.0


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
    return load_track(path, max_windows)[1]


def load_track(path: str | Path, max_windows: int) -> tuple[AudioInfo, np.ndarray]:
    """``load_windows`` plus the header it planned from, for callers that record both."""
    info = probe(path)
    plan = _plan(info.duration, max_windows)
    whole = info.duration <= features.WHOLE_TRACK_SECONDS
    mats: list[np.ndarray] = []
    last: AudioError | None = None
    for start in plan.starts:
        try:
            if whole:
                y = load(path)
                _plan(y.size / features.SAMPLE_RATE, 1)  # the header may promise more
            else:
                y = load(path, start, plan.length)
            mats.append(features.window_matrix(y))
        except features.SilentAudioError as exc:
            last = AudioError(str(exc))
        except AudioError as exc:
            last = exc
    if not mats:
        raise last or AudioError("cannot decode: no audio data")
    return info, np.stack(mats)


def _plan(duration: float, max_windows: int) -> features.WindowPlan:
    """``features.plan_windows``, its refusal ("too short to classify …") as an AudioError."""
    try:
        return features.plan_windows(duration, max_windows)
    except ValueError as exc:
        raise AudioError(str(exc)) from None


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
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise AudioError(f"cannot read: {exc.strerror or exc}") from None
    if magic not in _SOUNDFILE_MAGIC:
        return None
    import soundfile as sf

    try:
        # Bytes: soundfile encodes a str name as strict UTF-8, which a name that is not
        # UTF-8 (``caf\xe9.flac``) fails; PyAV takes such a str as it is.
        f = sf.SoundFile(os.fsencode(p))
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
        codec = ctx.codec.canonical_name  # "mp3", not the decoder's "mp3float"
        name = container.format.name.split(",")[0]
        fmt = "mp4" if name == "mov" else name
    if duration <= 0:  # the header does not say: count what decodes
        samples, native = _av_count(p)
        if not samples:
            raise AudioError("cannot decode: no audio data")
        duration = samples / native
        rate = rate or native
    return AudioInfo(duration, rate, channels, codec, fmt)


def _av_count(p: Path) -> tuple[int, int]:
    """Samples that decode, and their rate, without keeping them."""
    container, stream = _av_open(p)
    with container:
        samples, rate = 0, 0
        for frame in _frames(container, stream):
            rate = rate or int(frame.sample_rate)
            samples += frame.samples
    return samples, rate


#: Planar sample formats read straight from the frame's buffers.
_PLANAR = {"fltp": np.float32}


def _frame_mono(frame: Any) -> np.ndarray:
    """One decoded frame → mono float32 (mean of channels, like ``librosa.to_mono``)."""
    planar = _PLANAR.get(frame.format.name)
    if planar is not None:  # the common case (MP3, AAC, WMA decode to fltp): no copies per channel
        n = frame.samples
        planes = [np.frombuffer(p, planar, count=n) for p in frame.planes]
        if planar is np.float32:
            if len(planes) == 2:  # stereo: the same float32 result as np.mean, without its overhead
                out = np.add(planes[0], planes[1])
                out *= 0.5
                return out
            return planes[0].copy() if len(planes) == 1 else np.mean(planes, axis=0, dtype=np.float32)
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
    container, stream = _av_open(p)
    with container:
        frames = _frames(container, stream)
        head = next(frames, None)
        if head is None or not head.sample_rate:
            raise AudioError("cannot decode: no audio data")
        rate = int(head.sample_rate)
        clock = _Clock(head.time, stream.time_base, rate)
        first, hi = _span(offset, duration, rate)
        hi = min(hi, _mp4_end(container, stream, head.time))
        lo = first / rate
        if not seek or head.time is None or lo - _PREROLL < _SEEK_MIN:
            return _av_collect(frames, head, 0, first, hi, clock)
        for back in (_PREROLL, 5.0, 30.0):
            if lo - back <= 0:
                break
            seeked = _av_seek(container, stream, head.time + lo - back)
            if seeked is None:
                break
            frames, landed = seeked
            if landed is None:  # past the end of what decodes
                return np.zeros(0, np.float32), rate, lo
            at = clock.position(landed)
            if at is not None and at <= first:
                return _av_collect(frames, landed, at, first, hi, clock)
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


class _Clock:
    """Turns frame timestamps into sample indices from the file's first decoded sample."""

    __slots__ = ("origin", "rate", "slack", "tick")

    def __init__(self, origin: float | None, time_base: Any, rate: int) -> None:
        self.origin = origin
        self.rate = rate
        # Worked out once: these run for every decoded frame (about 40 per second of MP3).
        self.tick = float(time_base) * rate if time_base else 0.0
        #: How far (samples) a timestamp may lead the sample count before it is a gap.
        self.slack = math.ceil(self.tick) + 2

    def position(self, frame: Any) -> int | None:
        """Sample index where ``frame`` starts, or ``None`` without timestamps.

        Containers with coarse timestamps (ASF/WMA: milliseconds) are snapped to
        whole frames when that is within the rounding, so a seek lands on the exact
        sample.
        """
        t = frame.time
        if self.origin is None or t is None:
            return None
        pos = (t - self.origin) * self.rate
        tick = self.tick
        if tick > 1:
            n = frame.samples
            if n > 0:
                snapped = round(pos / n) * n
                if abs(snapped - pos) <= tick + 1:  # both times were rounded
                    return snapped
        return round(pos)


def _frames(container: Any, stream: Any) -> Iterator[Any]:
    """Decoded frames of ``stream``.

    A corrupt packet (a damaged stretch of an MP3, say) is skipped, as FFmpeg's own
    tools do; many in a row, or the demuxer failing (a truncated file), end the
    stream quietly with what decoded so far.
    """
    import av

    errors = (av.FFmpegError, OSError, ValueError, EOFError)
    packets = container.demux(stream)
    bad = 0
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except errors:
            return
        try:
            decoded = packet.decode()
        except errors:
            bad += 1
            if bad > _MAX_BAD_PACKETS:
                return
            continue
        bad = 0
        yield from decoded


def _av_seek(container: Any, stream: Any, seconds: float) -> tuple[Any, Any] | None:
    """Seek to a keyframe at/before ``seconds``; the new frame iterator and its first frame."""
    import av

    try:
        container.seek(int(seconds / stream.time_base), stream=stream, backward=True)
    except (av.FFmpegError, OSError, ValueError, EOFError):
        return None
    frames = _frames(container, stream)
    return frames, next(frames, None)


def _av_collect(
    frames: Iterator[Any], head: Any, pos: int, first: int, hi: float, clock: _Clock
) -> tuple[np.ndarray, int, float]:
    """Gather samples ``first`` … ``hi`` s; ``head`` is the frame at sample ``pos``.

    Positions are counted in samples from ``head`` rather than read from each
    frame's timestamp (which can be rounded), except where the timestamp jumps ahead
    (frames lost to corruption): the audio goes back in its place and the gap stays
    silent, so what follows still lines up with the file's timeline.
    """
    rate = clock.rate
    chunks: list[np.ndarray] = []
    stop = math.inf if math.isinf(hi) else math.ceil(hi * rate)
    got = 0
    slack, max_gap = clock.slack, _MAX_GAP * rate
    for frame in itertools.chain([head], frames):
        if pos >= stop:
            break
        at = clock.position(frame)
        if at is not None and pos + slack < at <= pos + max_gap:
            gap = at - max(pos, first)
            if gap > 0:
                chunks.append(np.zeros(gap, np.float32))
                got += gap
            pos = at
        n = frame.samples
        if n > 0 and frame.sample_rate == rate and pos + n > first:
            chunks.append(_frame_mono(frame)[max(0, first - pos) :])
            got += chunks[-1].size
        pos += n
    x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    start = max(first, pos - got)
    if not math.isinf(stop):
        x = x[: max(0, int(stop - start))]
    return x, rate, start / rate
