"""A trial's augmentation as Keras preprocessing layers, run inside the tf.data pipeline.

The layers work on the float batches the pipeline gathers (already scaled to [0, 1]), on
the pipeline's own threads, so the model never holds them: validation, test, the report
and every exported format see the images as they are, and nothing of the augmentation
reaches a device. Each layer is seeded from the trial's seed.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from mloptimizer.space import Augment

__all__ = ["augmentation_layers", "augmenter"]


def augmentation_layers(augment: Augment, seed: int) -> list[keras.layers.Layer]:
    """The preprocessing layers of ``augment``, in a fixed order (geometry, then colour)."""
    layers: list[keras.layers.Layer] = []
    flips = [
        m
        for m, on in (("horizontal", augment.horizontal_flip), ("vertical", augment.vertical_flip))
        if on
    ]
    if flips:
        mode = "horizontal_and_vertical" if len(flips) == 2 else flips[0]
        layers.append(keras.layers.RandomFlip(mode, seed=seed))
    if augment.rotation > 0:
        layers.append(keras.layers.RandomRotation(augment.rotation, seed=seed + 1))
    if augment.zoom > 0:
        layers.append(keras.layers.RandomZoom((-augment.zoom, augment.zoom), seed=seed + 2))
    if augment.translation > 0:
        t = augment.translation
        layers.append(keras.layers.RandomTranslation(t, t, seed=seed + 3))
    if augment.contrast > 0:
        layers.append(
            keras.layers.RandomContrast(augment.contrast, value_range=(0, 1), seed=seed + 4)
        )
    if augment.brightness > 0:
        layers.append(
            keras.layers.RandomBrightness(augment.brightness, value_range=(0, 1), seed=seed + 5)
        )
    return layers


def augmenter(augment: Augment | None, seed: int) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """A function from a training batch to its augmented copy, or None for no change."""
    if augment is None or not augment.active():
        return None
    layers = augmentation_layers(augment, seed)

    def apply(images: tf.Tensor) -> tf.Tensor:
        for layer in layers:
            images = layer(images, training=True)
        return images

    return apply
