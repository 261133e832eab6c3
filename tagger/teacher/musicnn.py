"""musicnn's ``MSD_musicnn`` tagger, re-implemented with Keras 3 layers.

The original (Pons & Serra, *musicnn: pre-trained convolutional neural networks
for music audio tagging*, 2019; ISC licence; the ``musicnn`` package on PyPI)
is TensorFlow-1 graph code. This is the same network, layer for layer, in Keras
layers and ``keras.ops`` so that it trains, exports and runs on any backend; its
weights come from the checkpoint inside an installed ``musicnn`` package
(:mod:`tagger.teacher.checkpoint`), and ``tests/test_teacher.py`` holds its
outputs to musicnn's own on real clips.

Network (input: ``(patches, 187, 96)`` log-mel, see :mod:`tagger.teacher.bridge`):
batch-normalised input; a front-end of two "timbral" convolutions (7 frames ×
38 or 67 bands, 204 filters each) and three "temporal" ones (128, 64, 32 frames
× 1 band, 51 filters each), each max-pooled over frequency; a mid-end of three
1-D convolutions (64 filters, 7 frames) with residual connections; the front-
and mid-end features (753 per frame) pooled over time (max and mean); a dense
layer of 200 and 50 sigmoid tags. Every convolution is ReLU then BatchNorm.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from .. import features
from . import bridge as br

#: The 50 Million Song Dataset tags the network predicts (musicnn's ``MSD_LABELS``).
MSD_LABELS = [
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock",
    "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill", "instrumental",
    "punk", "oldies", "blues", "hard rock", "ambient", "acoustic", "experimental",
    "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening", "sexy",
    "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop",
    "sad", "House", "happy",
]  # fmt: skip

#: Features per frame after the mid-end: 2 × 204 + 3 × 51 front-end, 3 × 64 mid-end.
FRAME_FEATURES = 753
#: Our layer name → the TensorFlow-1 variable scope of the same layer in the checkpoint.
CHECKPOINT_NAMES = {
    "bn_input": "batch_normalization",
    "timbral_74": "conv2d", "timbral_74_bn": "batch_normalization_1",
    "timbral_77": "conv2d_1", "timbral_77_bn": "batch_normalization_2",
    "temporal_128": "conv2d_2", "temporal_128_bn": "batch_normalization_3",
    "temporal_64": "conv2d_3", "temporal_64_bn": "batch_normalization_4",
    "temporal_32": "conv2d_4", "temporal_32_bn": "batch_normalization_5",
    "mid_1": "conv2d_5", "mid_1_bn": "batch_normalization_6",
    "mid_2": "conv2d_6", "mid_2_bn": "batch_normalization_7",
    "mid_3": "conv2d_7", "mid_3_bn": "batch_normalization_8",
    "pool_bn": "batch_normalization_9",
    "penultimate": "dense", "penultimate_bn": "batch_normalization_10",
    "tags": "dense_1",
}  # fmt: skip


@keras.saving.register_keras_serializable(package="tagger")
class ReduceAxis(layers.Layer):
    """Max or mean over one axis (musicnn pools whole axes, whatever their size)."""

    def __init__(self, axis: int, mode: str = "max", **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)
        self.mode = mode

    def call(self, x):
        return ops.max(x, axis=self.axis) if self.mode == "max" else ops.mean(x, axis=self.axis)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        del shape[self.axis]
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "mode": self.mode}


def _bn(name: str):
    # TF-1 ``layers.batch_normalization`` defaults: epsilon 1e-3, momentum 0.99.
    return layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=name)


def build_musicnn(name: str = "musicnn") -> keras.Model:
    """``(patches, 187, 96)`` log-mel → tags, mean_pool, max_pool, penultimate."""
    x_in = keras.Input((br.PATCH_FRAMES, br.TEACHER_N_MELS), name="logmel")
    x = layers.Reshape((br.PATCH_FRAMES, br.TEACHER_N_MELS, 1), name="expand")(x_in)
    x = _bn("bn_input")(x)
    padded = layers.ZeroPadding2D(((3, 3), (0, 0)), name="pad_timbral")(x)
    front = []
    for width, fname in ((int(0.4 * br.TEACHER_N_MELS), "timbral_74"), (int(0.7 * br.TEACHER_N_MELS), "timbral_77")):
        y = layers.Conv2D(204, (7, width), padding="valid", activation="relu", name=fname)(padded)
        y = _bn(f"{fname}_bn")(y)
        front.append(ReduceAxis(2, "max", name=f"{fname}_pool")(y))
    for length in (128, 64, 32):
        fname = f"temporal_{length}"
        y = layers.Conv2D(51, (length, 1), padding="same", activation="relu", name=fname)(x)
        y = _bn(f"{fname}_bn")(y)
        front.append(ReduceAxis(2, "max", name=f"{fname}_pool")(y))
    front_end = layers.Concatenate(axis=-1, name="frontend")(front)  # (187, 561)
    # The mid-end's 2-D convolutions span every feature of a frame: 1-D convolutions over time.
    y = layers.ZeroPadding1D(3, name="mid_1_pad")(front_end)
    y = layers.Conv1D(64, 7, activation="relu", name="mid_1")(y)
    mid1 = _bn("mid_1_bn")(y)
    y = layers.ZeroPadding1D(3, name="mid_2_pad")(mid1)
    y = layers.Conv1D(64, 7, activation="relu", name="mid_2")(y)
    mid2 = layers.Add(name="mid_2_res")([_bn("mid_2_bn")(y), mid1])
    y = layers.ZeroPadding1D(3, name="mid_3_pad")(mid2)
    y = layers.Conv1D(64, 7, activation="relu", name="mid_3")(y)
    mid3 = layers.Add(name="mid_3_res")([_bn("mid_3_bn")(y), mid2])
    frames = layers.Concatenate(axis=-1, name="midend")([front_end, mid1, mid2, mid3])  # (187, 753)
    max_pool = ReduceAxis(1, "max", name="max_pool")(frames)
    mean_pool = ReduceAxis(1, "mean", name="mean_pool")(frames)
    # musicnn flattens a (753, 2) stack of [max, mean]: the two interleave per feature.
    pooled = layers.Concatenate(axis=-1, name="pool_pairs")(
        [layers.Reshape((FRAME_FEATURES, 1), name="max_col")(max_pool), layers.Reshape((FRAME_FEATURES, 1), name="mean_col")(mean_pool)]
    )
    pooled = layers.Flatten(name="pool_flat")(pooled)
    pooled = _bn("pool_bn")(pooled)
    pen = layers.Dense(200, activation="relu", name="penultimate")(pooled)
    pen = _bn("penultimate_bn")(pen)
    tags = layers.Dense(len(MSD_LABELS), activation="sigmoid", name="tags")(pen)
    return keras.Model(x_in, {"tags": tags, "mean_pool": mean_pool, "max_pool": max_pool, "penultimate": pen}, name=name)


def set_checkpoint_weights(model: keras.Model, variables: dict[str, np.ndarray]) -> None:
    """Load musicnn's checkpoint variables (name → array) into :func:`build_musicnn`'s model."""
    for ours, theirs in CHECKPOINT_NAMES.items():
        layer = model.get_layer(ours)
        if isinstance(layer, layers.BatchNormalization):
            values = [variables[f"{theirs}/{k}"] for k in ("gamma", "beta", "moving_mean", "moving_variance")]
        else:
            kernel = variables[f"{theirs}/kernel"]
            if isinstance(layer, layers.Conv1D):  # (7, F, 1, 64) → (7, F, 64)
                kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], kernel.shape[3])
            values = [kernel, variables[f"{theirs}/bias"]]
        expected = [tuple(w.shape) for w in layer.weights]
        if [tuple(v.shape) for v in values] != expected:
            raise ValueError(f"{ours} ({theirs}): checkpoint shapes {[v.shape for v in values]}, layer wants {expected}")
        layer.set_weights([np.asarray(v, dtype=np.float32) for v in values])
    model.trainable = False


@keras.saving.register_keras_serializable(package="tagger")
class Bridge(layers.Layer):
    """Our ``(N, 128, 387)`` uint8 windows → musicnn patches ``(N·P, 187, 96)``.

    The Keras form of :func:`tagger.teacher.bridge.bridge`: two fixed matrices
    (kept as non-trainable weights, so a saved model needs neither librosa nor the
    musicnn package) and the calibrated gain. ``patches`` chooses how many of the
    window's ten 3-second patches the teacher hears (evenly spaced): the knob
    between scan speed and how much of the window it listens to.
    """

    def __init__(self, log10_gain: float = br.DEFAULT_LOG10_GAIN, patches: int = br.PATCHES_PER_WINDOW, **kwargs):
        super().__init__(**kwargs)
        self.log10_gain = float(log10_gain)
        self.patches = int(patches)
        if not 1 <= self.patches <= br.PATCHES_PER_WINDOW:
            raise ValueError(f"patches must be 1..{br.PATCHES_PER_WINDOW}")

    @staticmethod
    def patch_indices(patches: int) -> list[int]:
        """Which of the ten patches are heard: evenly spread over the window."""
        step = br.PATCHES_PER_WINDOW / patches
        return [int(step * (i + 0.5)) for i in range(patches)]

    def build(self, input_shape):
        frames = np.concatenate(
            [np.arange(i * br.PATCH_FRAMES, (i + 1) * br.PATCH_FRAMES) for i in self.patch_indices(self.patches)]
        )
        self.freq = self.add_weight(shape=(features.N_MELS, br.TEACHER_N_MELS), name="freq", trainable=False, initializer="zeros")
        self.time = self.add_weight(shape=(len(frames), features.N_COLUMNS), name="time", trainable=False, initializer="zeros")
        self._frames = frames

    def set_matrices(self) -> None:
        """Compute the fixed matrices (needs librosa); a loaded model has them already."""
        self.freq.assign(br.frequency_matrix().T.astype(np.float32))
        self.time.assign(br.time_matrix()[:, self._frames].T.astype(np.float32))

    def call(self, levels):
        db = ops.cast(levels, "float32") * (br.LEVEL_DB_SPAN / features.LEVELS) - br.LEVEL_DB_SPAN
        power = ops.power(10.0, db / 10.0)  # (N, 128, 387)
        x = ops.matmul(ops.transpose(power, (0, 2, 1)), self.freq)  # (N, 387, 96)
        x = ops.matmul(self.time, x)  # (N, frames, 96)
        x = ops.log10(x * (10000.0 * 10.0**self.log10_gain) + 1.0)
        return ops.reshape(x, (-1, br.PATCH_FRAMES, br.TEACHER_N_MELS))

    def compute_output_shape(self, input_shape):
        return (None, br.PATCH_FRAMES, br.TEACHER_N_MELS)

    def get_config(self):
        return {**super().get_config(), "log10_gain": self.log10_gain, "patches": self.patches}


@keras.saving.register_keras_serializable(package="tagger")
class PatchPool(layers.Layer):
    """``(N·P, D)`` per-patch features → ``(N, 2·D)``: their mean and max over a window's patches (``mode``
    ``"mean"`` or ``"std"``: ``(N, D)``, the mean or the standard deviation alone)."""

    def __init__(self, patches: int, mode: str = "meanmax", **kwargs):
        super().__init__(**kwargs)
        self.patches = int(patches)
        self.mode = mode

    def call(self, x):
        x = ops.reshape(x, (-1, self.patches, x.shape[-1]))
        if self.mode == "mean":
            return ops.mean(x, axis=1)
        if self.mode == "std":  # population standard deviation, as numpy's
            return ops.sqrt(ops.mean(ops.square(x - ops.mean(x, axis=1, keepdims=True)), axis=1))
        return ops.concatenate([ops.mean(x, axis=1), ops.max(x, axis=1)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (None, (2 if self.mode == "meanmax" else 1) * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "patches": self.patches, "mode": self.mode}


def build_window_teacher(
    musicnn: keras.Model, *, patches: int = br.PATCHES_PER_WINDOW, log10_gain: float = br.DEFAULT_LOG10_GAIN
) -> keras.Model:
    """Windows ``(N, 128, 387)`` → the teacher's features per window, pooled over patches.

    Outputs ``features`` ``(N, 4·753)``: mean and max over patches of the per-patch
    ``mean_pool`` and ``max_pool`` (the probe's features), and ``tags`` ``(N, 50)``:
    the mean over patches of the 50 tag probabilities.
    """
    inputs = keras.Input((features.N_MELS, features.N_COLUMNS), dtype="uint8", name="levels")
    b = Bridge(log10_gain, patches, name="bridge")
    x = b(inputs)
    b.set_matrices()
    out = musicnn(x)
    per_patch = layers.Concatenate(axis=-1, name="patch_pools")([out["mean_pool"], out["max_pool"]])
    feats = PatchPool(patches, name="teacher_features")(per_patch)
    tags = PatchPool(patches, "mean", name="teacher_tags")(out["tags"])
    return keras.Model(inputs, {"features": feats, "tags": tags}, name="window_teacher")
