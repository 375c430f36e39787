"""The model builder of custom-model.yaml: your own Keras code, searched with TPE.

MLOptimizer calls ``build(params, input_shape=..., num_classes=...)`` once per trial, in
the trainer, with the values it sampled for the parameters the search file declares
under ``searchSpace.custom.parameters``. Return an uncompiled (or compiled: it is compiled
again) Keras model that takes float32 images in [0, 1] of ``input_shape`` and ends in a
softmax over ``num_classes``. The trainer compiles it with Adam at the searched learning
rate, measures it against the device limits, trains, prunes, checkpoints and exports it
like any built-in model.

With ``mloptimizer run`` this file sits beside the search file. On a cluster, add it to
an image built FROM the trainer image (on its Python path) and name that image in
``workers.image``.
"""

from __future__ import annotations

from typing import Any

import keras


def build(
    params: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """A small residual CNN: ``blocks`` blocks of ``width`` filters, each convolution
    followed by batch normalisation and the searched activation."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(params["width"], 3, padding="same", use_bias=False)(inputs)
    for _ in range(params["blocks"]):
        shortcut = x
        x = keras.layers.Conv2D(params["width"], 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.Activation(params["activation"])(x)
        if params["residual"] == "yes":
            x = keras.layers.Add()([shortcut, x])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(params.get("dropout", 0.0))(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
