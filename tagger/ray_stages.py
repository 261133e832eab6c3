"""The stages of ``tagger scan --engine ray`` that run on the cluster's workers.

Kept apart from :mod:`tagger.ray_engine` (the driver) so that a Ray worker imports only what
its stage needs: a decode task numpy, the audio decoder and the mel filter bank; the model
actor ONNX Runtime; a tag writer :mod:`tagger.tags.orders` (on its first write). Ray finds these functions and classes by module
name, so every worker process that runs one imports this module; importing the driver's
(the database layer, SQLAlchemy, the tag policies) cost each of them about 0.35 s of CPU,
taken from the decoding on a small cluster (docs/cluster.md, Speed).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

import numpy as np

from . import features
from .model.infer import decode_file

if TYPE_CHECKING:
    from .tags.orders import WriteOrder, Written

#: The one-line reason for a path a node does not have.
NOT_SEEN = "no such file on node {node} (every node must see the library at the same path)"


def _node_name() -> str:
    return socket.gethostname()


_threads_limited = False


def decode_row(row: dict[str, Any], max_windows: int) -> dict[str, Any]:
    """Decode one file on whichever node Ray chose; never raises for a bad file.

    The windows travel as bytes (``n`` windows of ``N_MELS`` x ``N_COLUMNS`` uint8).
    """
    global _threads_limited
    if not _threads_limited:  # one thread per decode task, as the local decode workers
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        features.use_scipy_fft()  # a decode task's worker makes many windows
        _threads_limited = True
    import ray

    path = str(row["path"])
    node = ray.get_runtime_context().get_node_id()
    out: dict[str, Any] = {"path": path, "node": node, "windows": b"", "n": 0, "duration": 0.0, "codec": "", "error": "", "unseen": False}
    if not os.path.lexists(path):
        out.update(error=NOT_SEEN.format(node=_node_name()), unseen=True)
        return out
    d = decode_file(path, max_windows)
    if d.error is not None or d.windows is None:
        out["error"] = d.error or "no windows"
        return out
    out.update(windows=np.ascontiguousarray(d.windows, dtype=np.uint8).tobytes(), n=len(d.windows), duration=float(d.duration or 0.0), codec=d.codec or "")
    return out


class ModelActor:
    """One ONNX Runtime session; turns batches of decoded files into per-file results.

    Each file's probabilities and embedding are the mean over its windows, as
    :meth:`tagger.model.infer.Classifier.classify` computes them.
    """

    def __init__(self, model: list[Any], cpu_chunk: int | None, batch_size: int, threads: int | None = None):
        import ray

        from .model.runtime import OnnxModel

        content = model[0]
        if isinstance(content, ray.ObjectRef):
            content = ray.get(content)
        self.model = OnnxModel(content, cpu_chunk=cpu_chunk, threads=threads)
        self.batch_size = max(1, int(batch_size))
        shape = self.model.session.get_outputs()[1].shape
        self.dim = shape[-1] if isinstance(shape[-1], int) else self.model.run(np.zeros((1, features.N_MELS, features.N_COLUMNS), np.uint8))[1].shape[-1]
        self.n_labels = self.model.session.get_outputs()[0].shape[-1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = np.asarray(batch["n"], dtype=np.int64)
        ok = np.flatnonzero(n > 0)
        probs = np.zeros((len(n), self.n_labels), np.float32)
        embs = np.zeros((len(n), self.dim), np.float32)
        if len(ok):
            shape = (features.N_MELS, features.N_COLUMNS)
            x = np.concatenate([np.frombuffer(batch["windows"][i], np.uint8).reshape(int(n[i]), *shape) for i in ok])
            ps, es = [], []
            for s in range(0, len(x), self.batch_size):
                p, e = self.model.run(x[s : s + self.batch_size])
                ps.append(p)
                es.append(e)
            p_all, e_all = np.concatenate(ps), np.concatenate(es)
            at = 0
            for i in ok:
                k = int(n[i])
                probs[i] = p_all[at : at + k].mean(axis=0)
                embs[i] = e_all[at : at + k].mean(axis=0, dtype=np.float32)
                at += k
        return {
            "path": batch["path"],
            "node": batch["node"],
            "n": n,
            "duration": batch["duration"],
            "codec": batch["codec"],
            "error": batch["error"],
            "unseen": batch["unseen"],
            "probs": probs,
            "embedding": embs,
        }


def write_on_node(order: WriteOrder) -> Written:
    """:func:`tagger.tags.orders.write_tags` on this node, naming the node when it lacks the file."""
    from .tags.orders import Written, write_tags  # the tag handlers only, no database layer

    if not os.path.lexists(order.path):
        return Written(error=NOT_SEEN.format(node=_node_name()))
    return write_tags(order)


class Writer:
    """Makes the tag writes of one node: a long-lived process (a task per write would start
    a Ray worker, and import tagger, for every few files), a few writes at a time."""

    def write(self, order: WriteOrder) -> Written:
        return write_on_node(order)


__all__ = ["NOT_SEEN", "ModelActor", "Writer", "decode_row", "write_on_node"]
