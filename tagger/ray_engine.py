"""``tagger scan --engine ray``: the scan's own stages, run on a Ray cluster with Ray Data.

The driver (the machine that runs ``tagger scan``) walks the folders, decides what is new
or changed and records every result in the database, in the same transactions as a local
scan (:class:`tagger.library.Library`). Ray Data runs the heavy stages in between, with
its streaming execution (memory stays bounded however many files there are); the stages
that run on the workers are in :mod:`tagger.ray_stages`, which imports little:

- decoding: CPU tasks, each :func:`tagger.model.infer.decode_file` on a few files;
- the model: an actor pool, one ONNX Runtime session per actor (one GPU each where the
  cluster has GPUs), fed the windows of many files per batch. The driver sends the model
  itself through the object store, so only the music has to be on shared storage;
- tag writes: the driver commits each write-ahead record, then a task on the node that
  decoded the file makes the write (:func:`tagger.tags.orders.write_tags`) and the driver
  records its result.

Ray does the retries. A decode task or model actor lost with its node runs again on
another one; a retried write finds the file already written and says so, so every file
is tagged once. A path a node cannot see is a per-file error that names the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import ipaddress
import logging
import math
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .library import FileStat, Library, Outcome, TagJob
from .model.head import HeadBundle, base_of
from .model.infer import Classification
from .ray_stages import ModelActor, Writer, decode_row, write_on_node

log = logging.getLogger(__name__)

#: What ``--engine ray`` needs installed.
EXTRA = "pip install 'tagger[ray]'"
#: Files per Ray Dataset. A Dataset holds its input list in the object store, so a
#: catalogue of millions goes through in slices of this many (each starts its actor
#: pool again: a second or two of model loading per slice).
SLICE = 20_000
#: Files per decode task: small enough to spread a short scan over every CPU and to
#: lose little when a node goes, large enough that scheduling costs little per file.
FILES_PER_TASK = 2
#: Runs of a decode task whose worker process died (a node lost, a decoder's crash) after
#: the first; then its files are run again one a task, and one that fails again is failed.
DECODE_RETRIES = 3
#: The reason recorded for a file whose task failed every run, the last one alone.
TASK_FAILED = "its task on the Ray cluster failed on every run, the last one alone (its worker process died: a crash in the decoder, out of memory; or the task raised an error)"
#: Bytes a decode task reserves (a Ray worker process decoding a track's windows).
DECODE_MEMORY = 400 * 2**20
#: Tag writes in flight at once (each a small Ray task).
WRITES_IN_FLIGHT = 64
#: Retries of a write whose node was lost (its result never came back).
WRITE_RETRIES = 5
#: Writes one node's writer makes at once (they wait on the disk or the share, not the CPU).
WRITER_THREADS = 4
#: ONNX Runtime threads of a model actor on a cluster without GPUs, and the CPUs it reserves
#: (at most; a node always keeps one CPU for decoding). Unset, ONNX Runtime would use every
#: core of the node, which the node's decode tasks need too.
MODEL_THREADS = 2


class RayEngineError(Exception):
    """The cluster cannot be reached or could not run the scan; ``str()`` is one line."""


def available() -> bool:
    """Whether Ray with Ray Data's dependencies is installed: the ``ray`` extra.

    Top-level names only: looking up ``ray.data`` would import Ray, before
    :meth:`RayEngine.connect` has set how it finds its address.
    """
    return all(importlib.util.find_spec(name) is not None for name in ("ray", "pyarrow"))


#: Ray Data's switch that, set to 1, records no usage data for this driver's datasets.
USAGE_ENV = "RAY_DATA_USAGE_DISABLED"
#: Ray's switch that, set to 0, keeps a node's address on loopback (docs/cluster.md).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _recorded_address() -> str | None:
    """Where ``--address auto`` leads: $RAY_ADDRESS, else the cluster ``ray start`` recorded."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        with open(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _reachable(host: str, port: str) -> None:
    """Fail in seconds on an address nothing listens at (Ray itself retries for minutes)."""
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise RayEngineError(f"no Ray cluster at {host}:{port}: {getattr(exc, 'strerror', None) or exc} (start one with `ray start --head`)") from None


class _OneLine(logging.Filter):
    """A log record's exception as one line of its message, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__}: {_one_line(record.exc_info[1])})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- the driver ----------------------------------------------------------------------


class RayEngine:
    """Connects to a cluster and runs :meth:`process` in place of ``Library.process``."""

    def __init__(self, address: str | None = None, *, batch_size: int = 64, max_windows: int = 1, model_actors: int = 0):
        self.address = address or "auto"
        self.batch_size = int(batch_size)
        self.max_windows = int(max_windows)
        self.model_actors = int(model_actors)
        self._connected = False
        self._stdout: contextlib.AbstractContextManager | None = None

    def connect(self) -> None:
        """Join the cluster (started with ``ray start`` or KubeRay); a one-line error if none."""
        if self._connected:
            return
        if self.address.startswith("ray://"):
            raise RayEngineError(f"{self.address}: Ray Client addresses are not supported; run tagger scan on a node of the cluster (docs/cluster.md)")
        target = self.address if self.address != "auto" else _recorded_address()
        if target is not None:
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            if _loopback(host):
                # A cluster on this machine: Ray on Linux would swap 127.0.0.1 for the
                # machine's network address; keep the driver on loopback, as its nodes are.
                os.environ.setdefault(LOOPBACK_ENV, "0")
            if self.address != "auto":
                _reachable(host, port)
        # Nothing leaves the machine (README): Ray Data's usage record of this run stays
        # unwritten. It is written by a detached actor of its own, one more worker process
        # that a fresh cluster starts, importing Ray Data, while the scan begins.
        os.environ.setdefault(USAGE_ENV, "1")
        import ray

        # Ray prints cluster events (a node lost, an actor restarted) on stdout; they are
        # diagnostics, so they go to stderr while connected and stdout stays the summary
        # (or --json) alone.
        self._stdout = contextlib.redirect_stdout(sys.stderr)
        self._stdout.__enter__()
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING, namespace="tagger")
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:  # RayError: e.g. a token the cluster refuses
            self._restore_stdout()
            raise RayEngineError(f"no Ray cluster at {self.address}: {_one_line(exc)} (start one with `ray start --head`)") from None
        self._connected = True
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # tagger's own progress bar counts files
        ctx.print_on_execution_start = False
        # A block whose task failed every retry is dropped rather than ending the scan; the
        # driver sees which files did not come back (process), and says why for each.
        ctx.max_errored_blocks = -1
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        # Ray Data logs each such block's error with its traceback: one line instead (the
        # scan then reports each file it lost in one line of its own).
        executor_log = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
        if not any(isinstance(f, _OneLine) for f in executor_log.filters):
            executor_log.addFilter(_OneLine())
        # Advice to Ray Data's programmers, not to tagger's users: the deprecation of the
        # remote argument max_retries (_retries), and a model pool larger than a dataset
        # of few files (or of none, once every task failed) can keep busy.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")

    def close(self) -> None:
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
        self._restore_stdout()

    def _restore_stdout(self) -> None:
        if self._stdout is not None:
            self._stdout.__exit__(None, None, None)
            self._stdout = None

    def describe(self) -> str:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        return f"{len(nodes)} nodes, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"

    def _dataset(self, paths: Sequence[str], model_ref: Any, cpu_chunk: int | None, per_task: int = FILES_PER_TASK):
        import ray

        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        alive = [n for n in ray.nodes() if n.get("Alive")]
        cpus = int(res.get("CPU", 0))
        threads, reserve, decode_cpus = _shares([float(n.get("Resources", {}).get("CPU", 0)) for n in alive], gpus > 0)
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, math.ceil(len(paths) / per_task)))
        # A decode task reserves the memory it may take, so that a node runs no more of
        # them than it holds; the model actors reserve none, which also keeps Ray Data from
        # fusing decoding into the actors (decoding stays in CPU tasks on every node).
        # A lost task runs again elsewhere, a lost actor starts again
        # elsewhere and its batches run again: Ray Data's defaults.
        ds = ds.map(decode_row, fn_kwargs={"max_windows": self.max_windows}, num_cpus=decode_cpus, memory=DECODE_MEMORY, **_retries(ds.map))
        # At most 16 files a model batch: the model starts while decoding goes on, and the
        # last batch, which the scan waits for alone, stays short (docs/cluster.md).
        files_per_batch = max(1, min(16, self.batch_size // max(1, self.max_windows)))
        # One actor per GPU. On CPUs the model takes most of a scan's CPU time (a window
        # costs several times its decoding), so the pool starts at one actor and grows while
        # the model is what the scan waits for, up to every CPU but one actor's worth (kept
        # for decoding); ``[ray] model_actors`` fixes it.
        if self.model_actors > 0:
            # No more than the cluster can place beside one decode task: more would wait for
            # CPUs (or GPUs) that never come, and the scan with them.
            fits = gpus if gpus else max(1, int((cpus - decode_cpus) // reserve))
            if self.model_actors > fits:
                log.warning("[ray] model_actors = %d: this cluster holds %d beside its decoding; starting %d", self.model_actors, fits, fits)
            pool = ray.data.ActorPoolStrategy(size=min(self.model_actors, fits))
        else:
            pool = ray.data.ActorPoolStrategy(min_size=1, max_size=gpus or max(1, int(cpus // threads) - 1))
        return ds.map_batches(
            ModelActor,
            fn_constructor_kwargs={"model": [model_ref], "cpu_chunk": cpu_chunk, "batch_size": self.batch_size, "threads": None if gpus else threads},
            batch_size=files_per_batch,
            batch_format="numpy",
            compute=pool,
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else reserve,
        )

    def process(self, library: Library, files: list[FileStat]) -> Iterator[Outcome]:
        """Classify and tag ``files`` on the cluster; outcomes as they are recorded (any order)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not files:
            return
        self.connect()
        classifier = library.classifier
        assert classifier is not None
        bundle = classifier.bundle
        base = base_of(bundle)
        head = bundle if isinstance(bundle, HeadBundle) else None
        labels = list(base.labels)
        onnx = (base.path / "model.onnx").read_bytes()
        failures = _cluster_failures()
        try:
            model_ref = ray.put(onnx)
        except failures as exc:
            raise RayEngineError(f"the Ray cluster could not run the scan: {_one_line(exc)}") from None
        cpu_chunk = base.meta.get("runtime", {}).get("cpu_chunk")
        # One writer per other node that decodes, made when its first write comes. A writer lost
        # with its node starts again elsewhere and its writes run again (they are idempotent).
        writer_class = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=WRITE_RETRIES, max_concurrency=WRITER_THREADS)(Writer)
        writers: dict[str, Any] = {}

        def writer(node: str) -> Any:
            if node not in writers:
                writers[node] = writer_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()
            return writers[node]
        by_path = {f.path: f for f in files}
        here = ray.get_runtime_context().get_node_id()
        pending: dict[Any, TagJob] = {}

        def settle(block: bool) -> Iterator[Outcome]:
            if not pending:
                return
            refs = list(pending)
            ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    written = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield library.abandon(job, _one_line(exc))
                else:
                    yield library.finish(job, written)

        def run(todo: list[str], per_task: int, done: set[str]) -> Iterator[Outcome]:
            """Outcomes of ``todo``'s files; the path of each one that came back goes into ``done``."""
            try:
                for row in self._dataset(todo, model_ref, cpu_chunk, per_task).iter_rows():
                    result = _classification(row, labels, head)
                    done.add(result.path)
                    # A file decoded on the driver's own node is written here, as a
                    # local scan writes it; the others on the node that decoded them.
                    out = library.apply(result, by_path[result.path], defer=str(row["node"]) != here)
                    if isinstance(out, TagJob):
                        node = str(row["node"])
                        ref = writer(node).write.remote(dataclasses.replace(out.order, remote=True))
                        pending[ref] = out
                    else:
                        yield out
                    yield from settle(block=len(pending) >= WRITES_IN_FLIGHT)
            except failures as exc:
                # A lost cluster, or Ray Data's own guard: no progress for
                # execution_no_progress_timeout_s (by default 30 minutes).
                raise RayEngineError(f"the Ray cluster could not run the scan: {_one_line(exc)}") from None

        try:
            for start in range(0, len(files), SLICE):
                todo = [f.path for f in files[start : start + SLICE]]
                # A task that failed every retry (its worker process died each time: a
                # decoder's crash, the node out of memory) loses its files from the
                # stream, not the scan; they run again one a task, so that only the
                # file that kills its process again is lost.
                for per_task in (FILES_PER_TASK, 1):
                    done: set[str] = set()
                    yield from run(todo, per_task, done)
                    todo = [p for p in todo if p not in done]
                    if not todo:
                        break
                for path in todo:
                    yield library.apply(Classification(path, error=TASK_FAILED), by_path[path])
            try:
                while pending:
                    yield from settle(block=True)
            except failures as exc:
                raise RayEngineError(f"the Ray cluster could not finish the tag writes: {_one_line(exc)}") from None
        finally:
            # Interrupted or failed: the writes already made are still recorded (a few seconds).
            if pending:
                refs = list(pending)
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        library.finish(job, ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        library.abandon(job, _one_line(exc))
            for handle in writers.values():
                with contextlib.suppress(Exception):
                    ray.kill(handle)


def _retries(method: Any) -> dict[str, int]:
    """``max_retries`` for a decode task whose process dies: DECODE_RETRIES, not Ray Data's forever.

    Forever, a file that crashes its decoder each time would stall the scan. Ray Data
    2.5x takes it among the ``**ray_remote_args`` it calls deprecated (it names no
    parameter for it yet), so the warning is kept off the user's screen; a Ray Data that
    takes neither is left to its default.
    """
    params = inspect.signature(method).parameters
    if "max_retries" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"max_retries": DECODE_RETRIES}
    return {}


def _cluster_failures() -> tuple[type[BaseException], ...]:
    """What Ray and Ray Data raise when the cluster cannot go on: Ray's errors, and Ray Data's
    own, which are not Ray's (a stalled execution, an internal failure)."""
    import ray
    from ray.data.exceptions import ExecutionTimeoutError, SystemException

    return (ray.exceptions.RayError, ExecutionTimeoutError, SystemException)


def _shares(node_cpus: Sequence[float], gpus: bool) -> tuple[int, float, float]:
    """(ONNX Runtime threads of a model actor, the CPUs it reserves, the CPUs a decode task reserves).

    A CPU model actor runs MODEL_THREADS threads and reserves as many CPUs, or fewer: on the
    smallest node with CPUs it always leaves room for a decode task beside it. An actor that
    left none would starve decoding on a one-node cluster, or on the node left when the
    others are lost, and the scan would wait. So on a node of one CPU the two take half
    each. Nodes without CPUs (a head started with ``--num-cpus 0``) run neither.
    """
    with_cpus = [c for c in node_cpus if c > 0] or [1.0]
    smallest = min(with_cpus)
    if gpus:  # the model actors take a GPU each and no CPU
        return 1, 0.0, min(1.0, smallest)
    threads = max(1, min(MODEL_THREADS, int(max(with_cpus))))
    reserve = min(float(threads), smallest - 1) if smallest >= 1.5 else smallest / 2
    return threads, reserve, min(1.0, smallest - reserve)


def _classification(row: dict[str, Any], labels: list[str], head: HeadBundle | None) -> Classification:
    """A row from the model stage as the :class:`Classification` a local scan would have."""
    path = str(row["path"])
    error = str(row["error"] or "")
    if error:
        return Classification(path, error=error, retry=bool(row.get("unseen")))
    probs = np.asarray(row["probs"], dtype=np.float32)
    emb = np.asarray(row["embedding"], dtype=np.float32)
    n = int(row["n"])
    duration = float(row["duration"]) or None
    codec = str(row["codec"]) or None
    if head is not None:
        p = head.probabilities(emb[None, :])[0]
        return Classification(path, {g: float(v) for g, v in zip(head.labels, p, strict=True)}, n, duration, codec, embedding=emb)
    return Classification(path, {g: float(v) for g, v in zip(labels, probs, strict=True)}, n, duration, codec, embedding=emb)


__all__ = ["EXTRA", "RayEngine", "RayEngineError", "available", "decode_row", "write_on_node"]
