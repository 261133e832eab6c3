"""Batched inference over many files.

Decoding is the slow, parallel part and the model wants full batches, so worker
processes decode files into windows while the main process packs windows from
any number of files into fixed-size batches. Queues are bounded (a few files in
flight per worker), so memory stays flat however many files are classified.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import features
from .bundle import Bundle, load_bundle

DEFAULT_BATCH = 64
DEFAULT_MAX_WINDOWS = 2


@dataclass
class Decoded:
    """What a decode worker sends back: windows, or the one-line reason it could not."""

    path: str
    windows: np.ndarray | None
    duration: float | None = None
    codec: str | None = None
    error: str | None = None


@dataclass
class Classification:
    """Per-track result: every genre's probability (mean over windows), or an error.

    ``embedding`` is the model's pooled features before its genre layer, averaged over
    the track's windows (float32; None when the model has no such output): what
    ``tagger learn`` and ``tagger similar`` work on.
    """

    path: str
    probabilities: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    duration: float | None = None
    codec: str | None = None
    error: str | None = None
    embedding: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])


def decode_file(path: str, max_windows: int) -> Decoded:
    """Worker entry point; never raises for a bad file."""
    from .. import audio

    try:
        info, x = audio.load_track(path, max_windows)
        return Decoded(path, x, info.duration, info.codec)
    except audio.AudioError as exc:
        return Decoded(path, None, error=str(exc))
    except (OSError, ValueError, MemoryError) as exc:
        return Decoded(path, None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _worker_init(mel_basis: np.ndarray | None = None) -> None:
    # One thread per worker: the pool already has a worker per core, and OpenBLAS
    # (numpy is loaded before this runs, so the environment is too late for it)
    # would otherwise start a thread per core in every worker for the mel product;
    # those threads spin against each other and halved end-to-end throughput.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if mel_basis is not None:  # the parent's filter bank: no librosa import here
        features.set_mel_basis(mel_basis)
    # Ctrl-C is the parent's to handle: it shuts the pool down; a worker that died
    # of it would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Classifier:
    """Holds a loaded bundle and a decode pool; reused by ``scan`` and the daemon."""

    def __init__(
        self,
        bundle: Bundle | str | Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH,
        max_windows: int = DEFAULT_MAX_WINDOWS,
        workers: int | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.batch_size = int(batch_size)
        self.max_windows = int(max_windows)
        self.workers = workers if workers is not None else max(1, os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None
        self._dual = None  # the model with a second output, its embedding (built on first use)

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            # forkserver: never fork a process that has a TensorFlow runtime in it.
            ctx = mp.get_context("forkserver")
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_worker_init, initargs=(features.mel_basis(),)
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        """Window probabilities, always called with full ``batch_size`` batches (padded)."""
        return self.predict_with_embeddings(x)[0]

    def predict_with_embeddings(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Window probabilities and window embeddings (None if the model has none)."""
        if self._dual is None:
            self._dual = _with_embedding(self.bundle.model) or False
        model = self._dual or self.bundle.model
        out, emb = [], []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            y = model.predict_on_batch(chunk)
            if self._dual:
                out.append(np.asarray(y[0])[:n])
                emb.append(np.asarray(y[1], dtype=np.float32)[:n])
            else:
                out.append(np.asarray(y)[:n])
        probs = np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)
        if not self._dual:
            return probs, None
        return probs, np.concatenate(emb) if emb else None

    def decoded(self, paths: Iterable[str | Path]) -> Iterator[Decoded]:
        """Decode in worker processes, at most a few files ahead of the consumer."""
        it = iter(paths)
        first = next(it, None)
        if first is None:  # nothing to do: start no workers (a no-change re-scan)
            return
        it = itertools.chain([first], it)
        pool = self._executor()
        if pool is None:
            for p in it:
                yield decode_file(str(p), self.max_windows)
            return
        # Files in flight: four model batches' worth. While the consumer loads the
        # model (seconds, at start), runs it, or records results, the workers keep
        # decoding instead of idling. A window is 50 kB, so this stays near 13 MB
        # (batch 64) however many files there are.
        ahead = max(2 * self.workers, 4, 4 * -(-self.batch_size // max(1, self.max_windows)))
        pending: deque[Future] = deque()
        for p in it:
            pending.append(pool.submit(decode_file, str(p), self.max_windows))
            if len(pending) >= ahead:
                break
        while pending:
            fut = pending.popleft()
            yield fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(decode_file, str(nxt), self.max_windows))

    def classify(self, paths: Iterable[str | Path]) -> Iterator[Classification]:
        """Results in input order; windows of many files share each full model batch."""
        files: deque[Decoded] = deque()  # decoded, waiting for their windows' probabilities
        todo = np.zeros((0, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)  # not yet predicted
        done = np.zeros((0, len(self.labels)), dtype=np.float32)  # predicted, not yet handed out
        done_emb: np.ndarray | None = None  # their embeddings, row for row

        def ready(final: bool) -> Iterator[Classification]:
            nonlocal todo, done, done_emb
            while len(todo) >= self.batch_size or (final and len(todo)):
                n = min(self.batch_size, len(todo))
                p, e = self.predict_with_embeddings(todo[:n])
                done = np.concatenate([done, p])
                if e is not None:
                    done_emb = e if done_emb is None else np.concatenate([done_emb, e])
                todo = todo[n:]
            while files:
                d = files[0]
                if d.error is not None or d.windows is None:
                    files.popleft()
                    yield Classification(d.path, error=d.error or "no windows")
                    continue
                n = len(d.windows)
                if n > len(done):
                    return
                files.popleft()
                p = done[:n].mean(axis=0)
                done = done[n:]
                emb = None
                if done_emb is not None:
                    emb = done_emb[:n].mean(axis=0, dtype=np.float32)
                    done_emb = done_emb[n:]
                probs = {g: float(v) for g, v in zip(self.labels, p, strict=True)}
                yield Classification(d.path, probs, n, d.duration, d.codec, embedding=emb)

        for d in self.decoded(paths):
            files.append(d)
            if d.windows is not None and d.error is None:
                todo = np.concatenate([todo, d.windows])
                d.windows = d.windows[:, :0, :0]  # keep the count, free the pixels
            yield from ready(final=False)
        yield from ready(final=True)


def _with_embedding(model):
    """The model with a second output: the input of its ``genre`` layer(s), the embedding.

    A single DenseNet has one ``genre`` Dense layer; an ensemble (``densenet.ensemble``)
    averages members that each have one, and its embedding is the members' features
    side by side. None when the model has no ``genre`` layer.
    """
    import keras

    def genre_layer(m):
        try:
            return m.get_layer("genre")
        except ValueError:
            return None

    if genre_layer(model) is not None:
        return keras.Model(model.inputs, [model.outputs[0], genre_layer(model).input])
    members = [layer for layer in model.layers if isinstance(layer, keras.Model) and genre_layer(layer) is not None]
    if not members or not isinstance(model.layers[-1], keras.layers.Average):
        return None
    inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
    probs, feats = [], []
    for m in members:
        p, f = keras.Model(m.inputs, [m.outputs[0], genre_layer(m).input])(inputs)
        probs.append(p)
        feats.append(f)
    return keras.Model(inputs, [keras.layers.Average()(probs), keras.layers.Concatenate()(feats)])


def classify(
    paths: Iterable[str | Path],
    *,
    bundle: Bundle | str | Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    workers: int | None = None,
) -> list[Classification]:
    """Per-track probabilities for every genre, for a list of files."""
    with Classifier(bundle, batch_size=batch_size, max_windows=max_windows, workers=workers) as c:
        return list(c.classify(paths))


__all__ = ["Classification", "Classifier", "Decoded", "classify", "features"]
