"""The model at run time: a bundle's ``model.onnx`` in an ONNX Runtime session.

Scanning, the daemon, ``evaluate`` and ``query`` never import TensorFlow or Keras: they
only need this (ONNX Runtime is a few tens of MB and starts in a fraction of a second;
TensorFlow was 1.3 GB on disk, four seconds to import and a gigabyte resident). Keras
stays the training framework (the ``train`` extra); ``tagger export`` turns its model
into the ONNX file (:mod:`tagger.model.export`).

The ONNX model has one input, ``levels`` (uint8, ``(batch, 128, 387)``) and two outputs,
``genre`` (probabilities, ``(batch, labels)``) and ``embedding`` (the pooled features the
genre head sees, ``(batch, D)``); any batch size.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INPUT = "levels"
OUTPUTS = ("genre", "embedding")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: Windows per ONNX Runtime call on the CPU. The session keeps memory for the largest
#: batch it has run (about 8 MB a window for the shipped DenseNet: 64 windows held
#: 560 MB, 4 windows 75 MB) while windows per second do not grow with it
#: (``benchmarks/model_throughput.py``), so a batch of the classifier runs in slices of
#: this many. On a GPU it runs whole.
CPU_CHUNK = 4


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps it for reuse otherwise).

    Called after a session is dropped, so that an idle daemon's resident memory
    falls back to what it holds, not to what it once needed. A no-op elsewhere.
    """
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class RuntimeLoadError(Exception):
    """``model.onnx`` cannot be loaded or is not the model tagger expects."""


def _gpu_package_hidden(available: list[str]) -> str | None:
    """Why the ``gpu`` extra gives no CUDA, when the CPU package is installed beside it.

    ``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` module;
    whichever pip wrote last wins, and the CPU one has no CUDA provider.
    """
    if CUDA in available:
        return None
    from importlib import metadata

    try:
        metadata.version("onnxruntime-gpu")
        metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None
    return (
        "both onnxruntime and onnxruntime-gpu are installed and the CPU package hides CUDA; "
        "running on the CPU (fix: pip install --force-reinstall --no-deps onnxruntime-gpu)"
    )


class OnnxModel:
    """One inference session; CUDA when ONNX Runtime has it (``gpu`` extra), else the CPU."""

    def __init__(
        self, path: str | Path | bytes, *, providers: list[str] | None = None, chunk: int | None = None, cpu_chunk: int | None = None, arena: bool = True,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        # bytes: the model itself, as a cluster's workers get it (no path to share)
        self.path = Path(path) if not isinstance(path, bytes) else Path("model.onnx")
        source = path if isinstance(path, bytes) else str(self.path)
        available = ort.get_available_providers()
        hidden = _gpu_package_hidden(available)
        if hidden:
            log.warning(hidden)
        if providers is None:
            providers = [CUDA, CPU] if CUDA in available else [CPU]
        if CUDA in providers and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from the nvidia-* wheels the gpu extra brings (no system CUDA needed)
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = arena
        if CUDA not in providers:
            # No pre-planned block for every intermediate tensor at once: tensors come from
            # the arena as they are needed and go back to it, so peak memory follows the
            # live tensors (the daemon's main process after tagging with the musicnn
            # branch: 220 MB instead of 306; benchmarks/daemon_memory.py).
            so.enable_mem_pattern = False
        so.log_severity_level = 3  # errors only: its warnings are about graph details, not ours
        # The decode workers need the cores while the model waits for windows: threads that
        # spin between batches would take CPU from them.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            # A Ray model actor runs as many threads as the CPUs it reserves (ONNX Runtime's
            # default is every core of the machine, which the decode tasks also use).
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(source, sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own types (Fail, InvalidProtobuf, ...)
            if CUDA in providers and providers != [CPU]:
                log.warning("CUDA session failed (%s); running on the CPU", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.session = ort.InferenceSession(source, sess_options=so, providers=[CPU])
            else:
                raise RuntimeLoadError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        on_gpu = self.session.get_providers()[0] == CUDA
        # ``cpu_chunk``: the bundle's own slice for the CPU (a large model holds more per window)
        self.chunk = chunk if chunk else (None if on_gpu else (cpu_chunk or CPU_CHUNK))
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if names != [INPUT] or outputs[: len(OUTPUTS)] != list(OUTPUTS):
            raise RuntimeLoadError(f"inputs {names} and outputs {outputs}; expected [{INPUT!r}] and {list(OUTPUTS)} (re-export it: tagger export)")

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def device(self) -> str:
        """Where it runs, for logs: ``GPU (CUDA)`` or ``CPU``."""
        return "GPU (CUDA)" if self.providers and self.providers[0] == CUDA else "CPU"

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Genre probabilities and embeddings for a batch of uint8 windows (any batch size)."""
        x = np.ascontiguousarray(x, dtype=np.uint8)
        step = self.chunk or max(1, len(x))
        genres, embeddings = [], []
        for i in range(0, max(1, len(x)), step):
            g, e = self.session.run(list(OUTPUTS), {INPUT: x[i : i + step]})
            genres.append(np.asarray(g, dtype=np.float32))
            embeddings.append(np.asarray(e, dtype=np.float32))
        if len(genres) == 1:
            return genres[0], embeddings[0]
        return np.concatenate(genres), np.concatenate(embeddings)
