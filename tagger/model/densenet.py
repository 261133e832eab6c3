"""A small DenseNet over one window of the representation.

Written with Keras layers and ``keras.ops`` only, so the same code trains and runs
on the TensorFlow, JAX or PyTorch backend. The input width is left open: the net
trains on random time crops and, being fully convolutional up to a global average,
classifies a whole 387-column window at once (test-time averaging over crops for free).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers, ops

from .. import features


@dataclass(frozen=True)
class DenseNetConfig:
    """Architecture knobs; stored in the bundle so a model can be rebuilt."""

    blocks: tuple[int, ...] = (4, 4, 4)
    growth: int = 12
    stem_filters: int = 24
    stem_stride: int = 2
    bottleneck: int = 4
    compression: float = 0.5
    dropout: float = 0.3
    bn_momentum: float = 0.9
    weight_decay: float = 1e-4
    #: "gap": average over time and frequency; "freq": mean and max over time only,
    #: keeping which bands are loud (genre lives there), then a dense layer.
    head: str = "gap"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DenseNetConfig:
        d = {**cls().to_dict(), **d}
        d["blocks"] = tuple(d["blocks"])
        return cls(**d)


@keras.saving.register_keras_serializable(package="tagger")
class Levels(layers.Layer):
    """uint8 levels → floats, normalised per mel band with training statistics.

    The statistics live in the layer (and so in the ``.keras`` file), which keeps
    inference from needing anything but the model.
    """

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mean_values = list(mean) if mean is not None else [0.5] * features.N_MELS
        self.std_values = list(std) if std is not None else [0.25] * features.N_MELS

    def call(self, x):
        x = ops.cast(x, "float32") / float(features.LEVELS)
        mean = ops.reshape(ops.convert_to_tensor(self.mean_values, "float32"), (1, features.N_MELS, 1, 1))
        std = ops.reshape(ops.convert_to_tensor(self.std_values, "float32"), (1, features.N_MELS, 1, 1))
        return (ops.expand_dims(x, -1) - mean) / std

    def compute_output_shape(self, input_shape):
        return (*input_shape, 1)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean_values, "std": self.std_values}


@keras.saving.register_keras_serializable(package="tagger")
class TimePool(layers.Layer):
    """Pool over the time axis only (any width), keeping frequency and channels."""

    def __init__(self, mode: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        return ops.mean(x, axis=2) if self.mode == "mean" else ops.max(x, axis=2)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[3])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _bn_relu(x, cfg: DenseNetConfig, name: str):
    x = layers.BatchNormalization(momentum=cfg.bn_momentum, epsilon=1.001e-5, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _conv(filters: int, size: int, cfg: DenseNetConfig, name: str, strides: int = 1):
    reg = keras.regularizers.L2(cfg.weight_decay) if cfg.weight_decay else None
    return layers.Conv2D(filters, size, strides=strides, padding="same", use_bias=False, kernel_regularizer=reg, name=name)


def build_densenet(
    n_classes: int,
    cfg: DenseNetConfig | None = None,
    *,
    band_mean: list[float] | None = None,
    band_std: list[float] | None = None,
    name: str = "densenet",
) -> keras.Model:
    """DenseNet-BC: stem conv, dense blocks joined by compressing transitions, GAP, softmax."""
    cfg = cfg or DenseNetConfig()
    inputs = keras.Input((features.N_MELS, None), dtype="uint8", name="levels")
    x = Levels(band_mean, band_std, name="levels_norm")(inputs)
    x = _conv(cfg.stem_filters, 3, cfg, "stem_conv", strides=cfg.stem_stride)(x)
    x = _bn_relu(x, cfg, "stem")
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    channels = cfg.stem_filters
    for b, n_layers in enumerate(cfg.blocks):
        for i in range(n_layers):
            p = f"block{b + 1}_{i + 1}"
            y = _bn_relu(x, cfg, f"{p}_a")
            y = _conv(cfg.bottleneck * cfg.growth, 1, cfg, f"{p}_a_conv")(y)
            y = _bn_relu(y, cfg, f"{p}_b")
            y = _conv(cfg.growth, 3, cfg, f"{p}_b_conv")(y)
            x = layers.Concatenate(axis=-1, name=f"{p}_concat")([x, y])
            channels += cfg.growth
        if b < len(cfg.blocks) - 1:
            channels = int(channels * cfg.compression)
            p = f"transition{b + 1}"
            x = _bn_relu(x, cfg, p)
            x = _conv(channels, 1, cfg, f"{p}_conv")(x)
            x = layers.AveragePooling2D(2, name=f"{p}_pool")(x)
    x = _bn_relu(x, cfg, "final")
    if cfg.head == "freq":
        x = layers.Concatenate(name="time_pool")([TimePool("mean", name="time_mean")(x), TimePool("max", name="time_max")(x)])
        x = layers.Flatten(name="flatten")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="genre", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def ensemble(members: list[keras.Model]) -> keras.Model:
    """One model whose output is the mean of its members' probabilities."""
    if len(members) == 1:
        return members[0]
    inputs = keras.Input((features.N_MELS, None), dtype="uint8", name="levels")
    outs = []
    for i, m in enumerate(members):
        m.name = f"member{i}"
        outs.append(m(inputs))
    return keras.Model(inputs, layers.Average(name="mean_prob")(outs), name="ensemble")
