"""Batched inference over many files.

Decoding is the slow, parallel part and the model wants full batches, so worker
processes decode files into windows while the main process packs windows from
any number of files into fixed-size batches (the model is ``model.onnx`` in ONNX
Runtime: :mod:`tagger.model.runtime`). Queues are bounded (a few files in flight
per worker), so memory stays flat however many files are classified.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import features, lifeline
from .bundle import Bundle, load_bundle

DEFAULT_BATCH = 64
DEFAULT_MAX_WINDOWS = 2


#: A file whose decoding killed its process twice (a crash in a native decoder, out of memory).
DECODER_DIED = "the decoder's process died on this file, twice (a crash in the decoder, or out of memory)"


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

    ``embedding`` is the mean over the track's windows of the model's ``embedding``
    output (float32, the pooled features its genre head sees): what the library
    learns and compares tracks by. ``None`` for a track that failed.
    """

    path: str
    probabilities: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    duration: float | None = None
    codec: str | None = None
    error: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    #: The error is where it was read, not the file's (a cluster node that does not see the
    #: path): the file stays pending, for the next scan to take again.
    retry: bool = False

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
    features.use_scipy_fft()  # a worker makes many windows: worth scipy's import
    # Ctrl-C is the parent's to handle: it shuts the pool down; a worker that died
    # of it would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_forkserver() -> None:
    """End multiprocessing's fork server (it outlives the pool; the next pool starts a new one)."""
    import contextlib
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)  # CPython 3.8+: ends the server and resets it
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


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

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            # forkserver: never fork a process that has a model runtime's threads in it.
            ctx = mp.get_context("forkserver")
            # The fork server and its workers die with this process, even after kill -9.
            ctx.set_forkserver_preload(lifeline.forkserver_preload())
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_worker_init, initargs=(features.mel_basis(),)
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def release(self) -> bool:
        """Stop the decode processes (and their fork server) and drop the model session.

        For a daemon that sits idle: both come back on the next file, which costs it a
        few tenths of a second (``benchmarks/daemon_latency.py --release``). Returns
        whether anything was held.
        """
        held = self._pool is not None
        self.close()
        if held:
            _stop_forkserver()
        return self.bundle.release() or held

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window probabilities and embeddings, in batches of at most ``batch_size``.

        ONNX Runtime takes any batch size, so a last, partial batch runs as it is
        (padding it was only needed to keep TensorFlow from tracing a new graph).
        """
        model = self.bundle.model
        probs, embs = [], []
        for i in range(0, len(x), self.batch_size):
            p, e = model.run(x[i : i + self.batch_size])
            probs.append(p)
            embs.append(e)
        if not probs:
            return np.zeros((0, len(self.labels)), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(probs), np.concatenate(embs)

    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        """Window probabilities (see :meth:`predict`)."""
        return self.predict(x)[0]

    @property
    def started(self) -> bool:
        """Whether the model's session is made (not before the first file, nor after :meth:`release`)."""
        return self.bundle.loaded

    @property
    def device(self) -> str:
        """Where the model runs (``CPU`` or ``GPU (CUDA)``); loads it."""
        return self.bundle.model.device

    def decoded(self, paths: Iterable[str | Path]) -> Iterator[Decoded]:
        """Decode in worker processes, at most a few files ahead of the consumer."""
        it = iter(paths)
        first = next(it, None)
        if first is None:  # nothing to do: start no workers (a no-change re-scan)
            return
        second = next(it, None)
        if second is None and self._pool is None:
            # One file and no pool yet (``tagger scan FILE``): starting a worker process
            # would cost more than the decoding it takes over.
            yield decode_file(str(first), self.max_windows)
            return
        it = itertools.chain([first] if second is None else [first, second], it)
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
        pending: deque[tuple[str, Future]] = deque()

        def fill() -> None:
            while len(pending) < ahead:
                p = next(it, None)
                if p is None:
                    return
                pending.append((str(p), self._submit(str(p))))

        fill()
        while pending:
            path, fut = pending.popleft()
            try:
                decoded = fut.result()
            except BrokenProcessPool:
                # A decode process died (killed, out of memory, a crash in a native decoder)
                # and took the pool with it. Every file in flight is decoded again, alone:
                # the one that kills its process again is the cause, and only it fails.
                lost = [path] + [q for q, _ in pending]
                pending.clear()
                self._drop_pool()
                for q in lost:
                    yield self._decode_alone(q)
            else:
                yield decoded
            fill()

    def _submit(self, path: str) -> Future:
        """``decode_file(path)`` in the pool; a pool already broken gives a future that says so."""
        pool = self._executor()
        assert pool is not None
        try:
            return pool.submit(decode_file, path, self.max_windows)
        except BrokenProcessPool as exc:
            broken: Future = Future()
            broken.set_exception(exc)
            return broken

    def _drop_pool(self) -> None:
        """Forget a broken pool (its processes are gone or going); the next call makes a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _decode_alone(self, path: str) -> Decoded:
        """Decode ``path`` with nothing else in flight; a process that dies on it fails it alone."""
        try:
            return self._submit(path).result()
        except BrokenProcessPool:
            self._drop_pool()
            return Decoded(path, None, error=DECODER_DIED)

    def classify(self, paths: Iterable[str | Path]) -> Iterator[Classification]:
        """Results in input order; windows of many files share each full model batch."""
        files: deque[Decoded] = deque()  # decoded, waiting for their windows' outputs
        todo = np.zeros((0, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)  # not yet predicted
        done: np.ndarray | None = None  # probabilities predicted, not yet handed out
        done_emb: np.ndarray | None = None  # and their embeddings

        def ready(final: bool) -> Iterator[Classification]:
            nonlocal todo, done, done_emb
            while len(todo) >= self.batch_size or (final and len(todo)):
                n = min(self.batch_size, len(todo))
                p, e = self.predict(todo[:n])
                done = p if done is None else np.concatenate([done, p])
                done_emb = e if done_emb is None else np.concatenate([done_emb, e])
                todo = todo[n:]
            while files:
                d = files[0]
                if d.error is not None or d.windows is None:
                    files.popleft()
                    yield Classification(d.path, error=d.error or "no windows")
                    continue
                n = len(d.windows)
                if done is None or done_emb is None or n > len(done):
                    return
                files.popleft()
                p = done[:n].mean(axis=0)
                emb = done_emb[:n].mean(axis=0, dtype=np.float32)
                done, done_emb = done[n:], done_emb[n:]
                probs = {g: float(v) for g, v in zip(self.labels, p, strict=True)}
                yield Classification(d.path, probs, n, d.duration, d.codec, embedding=emb)

        for d in self.decoded(paths):
            files.append(d)
            if d.windows is not None and d.error is None:
                todo = np.concatenate([todo, d.windows])
                d.windows = d.windows[:, :0, :0]  # keep the count, free the pixels
            yield from ready(final=False)
        yield from ready(final=True)


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
