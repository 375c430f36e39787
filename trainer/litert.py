"""Keras models as LiteRT (TensorFlow Lite) files for devices: int8 full-integer quantization.

A device constraint on model size (``objective.constraints.maxModelKB``) is about the file a
drone or a phone loads, so the trainer converts the trial's trained model and measures it,
rather than estimating. Full-integer quantization needs a representative set: a slice of
the training images, scaled as the model sees them.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mloptimizer.logs import native_quiet

__all__ = ["LITERT_KINDS", "REPRESENTATIVE_IMAGES", "int8_litert", "litert", "multiply_adds"]

LITERT_KINDS = ("float32", "float16", "int8")

REPRESENTATIVE_IMAGES = 100


def int8_litert(model: keras.Model, images: np.ndarray) -> bytes:
    """``model`` as an int8 LiteRT flatbuffer (int8 input and output too)."""
    return litert(model, "int8", images)


def litert(model: keras.Model, kind: str, images: np.ndarray) -> bytes:
    """``model`` as a LiteRT flatbuffer of ``kind`` (one of :data:`LITERT_KINDS`).

    Args:
        model: A built Keras model taking float32 images scaled to [0, 1].
        kind: ``float32``; ``float16`` weights; or ``int8`` full-integer quantization
            (int8 input and output too).
        images: uint8 NHWC training images; for int8 the first ``REPRESENTATIVE_IMAGES``
            calibrate the quantization ranges.
    """
    if kind not in LITERT_KINDS:
        raise ValueError(f"unknown LiteRT kind {kind!r}; known: {', '.join(LITERT_KINDS)}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        sample = images[:REPRESENTATIVE_IMAGES].astype(np.float32) / 255.0

        def representative() -> Iterator[list[np.ndarray]]:
            for image in sample:
                yield [image[np.newaxis]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    # Keras prints the temporary SavedModel's signature, TensorFlow warns about input
    # statistics: noise on a trainer's console, once per trial.
    # Its C++ side logs each quantization step to file descriptor 2 (native_quiet).
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), native_quiet():
        warnings.simplefilter("ignore")
        flatbuffer: bytes = converter.convert()
    return flatbuffer


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one image's forward pass through the convolutions and dense layers."""
    total = 0
    for layer in model.layers:
        kernel: Any = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        weights = int(np.prod(kernel.shape))
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            _, height, width, _ = layer.output.shape
            total += int(height) * int(width) * weights
        elif isinstance(layer, keras.layers.Dense):
            total += weights
    return total
