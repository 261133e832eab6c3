"""``tagger export``: a bundle's Keras model as ``model.onnx``, checked against it.

The run-time side of tagger reads only ``model.onnx`` (:mod:`tagger.model.runtime`), so
this is the one place where the Keras model and the ONNX model meet. Needs the ``train``
extra (Keras, TensorFlow, tf2onnx through Keras 3's ``model.export(format="onnx")``).

The exported model has the input ``levels`` (uint8, ``(batch, 128, 387)``: dynamic batch,
windows of 387 columns) and the outputs ``genre`` and ``embedding``. A model that already
has the two outputs (in that order) is exported as it is. An older, single-output model
gets its embedding from the input of its final ``genre`` Dense layer (the pooled features
the head sees); for an ensemble of such members, the members' features concatenated.

:func:`save_bundle` (training's way to write a bundle) lives here too, so that the bundle
reader (:mod:`tagger.model.bundle`, the run-time side) imports nothing of the writing side.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import features
from .bundle import (
    META_FILE,
    MODEL_FILE,
    ONNX_FILE,
    Bundle,
    BundleError,
    file_sha256,
    load_bundle,
    read_meta,
)
from .runtime import INPUT, OUTPUTS, OnnxModel

#: Largest difference allowed between the ONNX and the Keras probabilities.
TOLERANCE = 1e-4


class ExportError(BundleError):
    """The model cannot be exported, or the export does not compute what Keras computes."""


def _keras():
    """Keras, or a clear error naming the extra that installs it."""
    from .. import quiet

    try:
        quiet.load_backend()
        import keras
    except ImportError as exc:
        raise ExportError("exporting needs Keras and TensorFlow: pip install 'tagger[train]' (from a checkout: pip install '.[train]')") from exc
    return keras


def inference_model(model):
    """The model with two outputs, ``genre`` then ``embedding`` (see the module's docstring)."""
    keras = _keras()
    if len(model.outputs) == 2:
        return model
    if len(model.outputs) != 1:
        raise ExportError(f"model has {len(model.outputs)} outputs; expected genre (and embedding)")
    names = {layer.name for layer in model.layers}
    if "genre" in names:  # one DenseNet
        head = model.get_layer("genre")
        return keras.Model(model.inputs, [model.outputs[0], head.input], name=f"{model.name}_export")
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not members or any("genre" not in {x.name for x in m.layers} for m in members):
        raise ExportError("model has no 'genre' layer (nor ensemble members with one) to take the embedding from")
    combine = model.layers[-1]  # the ensemble's last layer: the average of its members' probabilities
    if isinstance(combine, keras.Model):
        raise ExportError("cannot tell how the ensemble combines its members")
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype, name=INPUT)
    genres, embeddings = [], []
    for m in members:
        both = keras.Model(m.inputs, [m.outputs[0], m.get_layer("genre").input], name=f"{m.name}_export")
        g, e = both(inputs)
        genres.append(g)
        embeddings.append(e)
    genre = combine(genres)
    embedding = keras.layers.Concatenate(name="embedding")(embeddings) if len(embeddings) > 1 else embeddings[0]
    return keras.Model(inputs, [genre, embedding], name=f"{model.name}_export")


def check_windows(n_random: int = 12) -> np.ndarray:
    """Windows for the export's own check: uniform noise and band/time patterns (seeded)."""
    rng = np.random.default_rng(2018)
    shape = (features.N_MELS, features.N_COLUMNS)
    out = [rng.integers(0, features.LEVELS + 1, size=shape, dtype=np.uint8) for _ in range(n_random)]
    bands = np.linspace(0, 1, features.N_MELS)[:, None]
    cols = np.linspace(0, 1, features.N_COLUMNS)[None, :]
    for k in range(1, 5):
        smooth = 0.5 + 0.5 * np.sin(2 * np.pi * k * bands) * np.cos(np.pi * k * cols)
        out.append(np.rint(smooth * features.LEVELS).astype(np.uint8))
    out.append(np.zeros(shape, dtype=np.uint8))
    out.append(np.full(shape, features.LEVELS, dtype=np.uint8))
    return np.stack(out)


def compare(onnx_path: str | Path, model, windows: np.ndarray) -> dict[str, float]:
    """Largest differences between the ONNX file and the Keras model on ``windows``."""
    two = inference_model(model)
    ref_genre, ref_emb = (np.asarray(a) for a in two.predict_on_batch(windows))
    outputs = model.predict_on_batch(windows)
    original = np.asarray(outputs[0] if len(model.outputs) == 2 else outputs)
    genre, emb = OnnxModel(onnx_path, providers=["CPUExecutionProvider"]).run(windows)
    if genre.shape != original.shape or emb.shape != ref_emb.shape:
        raise ExportError(f"ONNX outputs of shapes {genre.shape} and {emb.shape}; Keras gives {original.shape} and {ref_emb.shape}")
    return {
        "windows": len(windows),
        "max_abs_diff_genre": float(np.abs(genre - original).max()),
        "max_abs_diff_genre_heads": float(np.abs(ref_genre - original).max()),  # the two-output model itself
        "max_abs_diff_embedding": float(np.abs(emb - ref_emb).max()),
        "embedding_scale": float(np.abs(ref_emb).max()),
    }


def _accept(diffs: dict[str, float]) -> None:
    if diffs["max_abs_diff_genre"] > TOLERANCE or diffs["max_abs_diff_genre_heads"] > TOLERANCE:
        raise ExportError(f"ONNX probabilities differ from Keras by {diffs['max_abs_diff_genre']:.2e} (allowed {TOLERANCE:g})")
    if diffs["max_abs_diff_embedding"] > TOLERANCE * max(1.0, diffs["embedding_scale"]):
        raise ExportError(f"ONNX embedding differs from Keras by {diffs['max_abs_diff_embedding']:.2e}")


def _rename_outputs(graph, new_names: tuple[str, ...]) -> None:
    """tf2onnx names outputs after TensorFlow tensors (``Identity:0``): give them ours."""
    for out, new in zip(graph.output, new_names, strict=True):
        old = out.name
        if old == new:
            continue
        for node in graph.node:
            node.output[:] = [new if x == old else x for x in node.output]
            node.input[:] = [new if x == old else x for x in node.input]
        for vi in graph.value_info:
            if vi.name == old:
                vi.name = new
        out.name = new


def _pool_before_affine(graph) -> int:
    """Pool musicnn's conv outputs first and run the rest of each front-end branch on the pooled tensor.

    A branch is ``Conv -> Relu -> x*a + b (batch norm, per channel) -> max over frequency``.
    Per channel, ``a*relu(z) + b`` rises with ``z`` where ``a >= 0`` and falls where ``a < 0``,
    so its maximum is ``a*relu(max z) + b`` or ``a*relu(min z) + b``; and ``min z`` is
    ``-max(-z)``, where ``-z`` is the same conv with its weights and bias negated. So the conv
    gets the signs ``s`` of ``a`` folded in, is pooled at once, and ``a*relu(s*max) + b`` runs
    on a tensor 30 to 96 times smaller (the width pooled). Negation and monotonic functions
    round exactly, so the outputs are the same to the bit (tests/test_onnx.py); the model ran
    9.0 windows/s against 7.1 (docs/model.md). Only chains whose intermediate tensors nothing else reads, with
    constant weights, a ``(1, C, 1, 1)`` scale and shift, and axes as an attribute (opset
    < 18) are rewritten. Returns how many.
    """
    from onnx import helper, numpy_helper

    consts = {i.name: i for i in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    for o in graph.output:
        readers[o.name] = readers.get(o.name, 0) + 1

    def source(node, op: str):
        found = made_by.get(node.input[0]) if node is not None else None
        return found if found is not None and found.op_type == op and readers.get(found.output[0]) == 1 else None

    added, replaced = [], set()
    for pool in list(graph.node):
        if pool.op_type != "ReduceMax" or len(pool.input) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
        axes, keep = attrs.get("axes"), int(attrs.get("keepdims", 1))
        add = source(pool, "Add")
        mul = source(add, "Mul")
        relu = source(mul, "Relu")
        conv = source(relu, "Conv")
        if not axes or len(axes) != 1 or axes[0] < 2 or conv is None or len(conv.input) != 3:
            continue
        if not all(name in consts for name in (mul.input[1], add.input[1], conv.input[1], conv.input[2])):
            continue
        a, b = numpy_helper.to_array(consts[mul.input[1]]), numpy_helper.to_array(consts[add.input[1]])
        w, bias = numpy_helper.to_array(consts[conv.input[1]]), numpy_helper.to_array(consts[conv.input[2]])
        channels = w.shape[0]
        if a.shape != (1, channels, 1, 1) or b.shape != (1, channels, 1, 1):
            continue
        sign = np.where(a.reshape(channels) < 0, -1, 1).astype(w.dtype)
        shape = (1, channels, 1, 1) if keep else (1, channels, 1)
        tag = pool.output[0].replace(":", "_") + "_pooled"
        graph.initializer.extend([
            numpy_helper.from_array(w * sign.reshape(-1, *[1] * (w.ndim - 1)), f"{tag}_w"),
            numpy_helper.from_array(bias * sign, f"{tag}_b"),
            numpy_helper.from_array(sign.reshape(shape), f"{tag}_sign"),
            numpy_helper.from_array(a.reshape(shape), f"{tag}_scale"),
            numpy_helper.from_array(b.reshape(shape), f"{tag}_shift"),
        ])
        folded = helper.make_node("Conv", [conv.input[0], f"{tag}_w", f"{tag}_b"], [f"{tag}_z"], name=conv.name)
        folded.attribute.extend(conv.attribute)
        for n in (pool, add, mul, relu, conv):
            graph.node.remove(n)
        replaced.update((mul.input[1], add.input[1], conv.input[1], conv.input[2]))
        added += [
            folded,
            helper.make_node("ReduceMax", [f"{tag}_z"], [f"{tag}_max"], axes=axes, keepdims=keep),
            helper.make_node("Mul", [f"{tag}_max", f"{tag}_sign"], [f"{tag}_signed"]),
            helper.make_node("Relu", [f"{tag}_signed"], [f"{tag}_relu"]),
            helper.make_node("Mul", [f"{tag}_relu", f"{tag}_scale"], [f"{tag}_scaled"]),
            helper.make_node("Add", [f"{tag}_scaled", f"{tag}_shift"], [pool.output[0]]),
        ]
    if not added:
        return 0
    # the graph's nodes must stay in an order where each input exists before it is read
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    todo, order = [*graph.node, *added], []
    while todo:
        rest = []
        for n in todo:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(todo):
            raise ExportError("the graph has a cycle after pooling its front end first")
        todo = rest
    del graph.node[:]
    graph.node.extend(order)
    read = {name for n in graph.node for name in n.input} | {i.name for i in graph.input}
    for i in [i for i in graph.initializer if i.name in replaced and i.name not in read]:
        graph.initializer.remove(i)  # the weights the folded ones replace
    return len(added) // 6


def export_onnx(model, path: str | Path, *, labels: list[str], keras_sha256: str | None = None, windows: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``path`` (atomically, only once it matches Keras); returns what to record."""
    keras = _keras()
    import onnx

    two = inference_model(model)
    path = Path(path)
    spec = keras.InputSpec(shape=(None, features.N_MELS, features.N_COLUMNS), dtype="uint8", name=INPUT)
    with tempfile.TemporaryDirectory(prefix="tagger-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                two.export(str(raw), format="onnx", input_signature=[spec], verbose=False)
            except ImportError as exc:  # tf2onnx missing
                raise ExportError(f"exporting needs tf2onnx ({exc}): pip install 'tagger[train]'") from exc
        proto = onnx.load(str(raw))
        if len(proto.graph.output) != len(OUTPUTS):
            raise ExportError(f"the converter made {len(proto.graph.output)} outputs, expected {len(OUTPUTS)}")
        _rename_outputs(proto.graph, OUTPUTS)
        _pool_before_affine(proto.graph)
        for value in (*proto.graph.input, *proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
        props = {"labels": json.dumps(list(labels)), "representation_version": str(features.REPRESENTATION_VERSION)}
        if keras_sha256:
            props["keras_sha256"] = keras_sha256
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "tagger export"
        onnx.checker.check_model(proto)
        staged = path.with_name(f".{path.name}.tmp")
        onnx.save(proto, str(staged))
        try:
            diffs = compare(staged, model, check_windows() if windows is None else windows)
            _accept(diffs)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        staged.replace(path)
    import tensorflow as tf
    import tf2onnx

    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "keras_sha256": keras_sha256,
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "input": {"name": INPUT, "dtype": "uint8", "shape": ["batch", features.N_MELS, features.N_COLUMNS]},
        "outputs": {"genre": len(labels), "embedding": int(two.outputs[1].shape[-1])},
        "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tools": {"keras": keras.__version__, "tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__},
        "check": diffs,
    }


def load_keras(path: str | Path):
    """A bundle's ``model.keras``, with the model layer's custom layers registered.

    A bundle of the teacher route holds the teacher's layers too; those register where
    they live, so load it with :func:`tagger.teacher.load_keras` (the model layer never
    imports the teacher).
    """
    keras = _keras()
    from . import densenet  # noqa: F401  (registers the custom layers)

    try:
        return keras.saving.load_model(Path(path) / MODEL_FILE, compile=False)
    except Exception as exc:  # keras raises many types for a bad file
        raise BundleError(f"{path}: cannot load {MODEL_FILE}: {str(exc).splitlines()[0]}") from exc


def export_bundle(path: str | Path, *, model=None, windows: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` next to the bundle's ``model.keras`` and record it in ``bundle.json``."""
    path = Path(path)
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    if not (path / MODEL_FILE).is_file():
        raise ExportError(f"{path}: no {MODEL_FILE} to export")
    meta = read_meta(path)
    if model is None:
        model = load_keras(path)
    info = export_onnx(model, path / ONNX_FILE, labels=[str(x) for x in meta["labels"]], keras_sha256=file_sha256(path / MODEL_FILE), windows=windows)
    meta["onnx"] = info
    staged = path / f".{META_FILE}.tmp"
    staged.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    staged.replace(path / META_FILE)
    return info


def save_bundle(
    out_dir: str | Path,
    model,
    labels: list[str],
    *,
    name: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Bundle:
    """Write ``model.keras``, ``bundle.json`` and the checked export ``model.onnx``.

    Model first, metadata last; the export then adds ``model.onnx`` and its record, and
    a bundle is loadable only once both are there (a crash in between leaves a bundle
    that ``tagger export`` completes).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILE}.tmp.keras"
    model.save(tmp)
    tmp.replace(out / MODEL_FILE)
    meta = {
        "name": name,
        "labels": list(labels),
        "representation": features.representation_params(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training": training,
        "metrics": metrics,
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    export_bundle(out, model=model)
    return load_bundle(out)
