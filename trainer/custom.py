"""The user's own model: import ``searchSpace.custom.builder`` and call it, in the trainer.

Only trainers run user code (the operator samples the parameters and never imports the
builder). The module comes from the trainer image's Python path, or, for
``mloptimizer run``, from the folder of the search file (:func:`add_builder_path`).
Two ways to fail, told apart because they mean different things:

* :class:`BuilderUnavailable`: the builder cannot be imported. No trial of the search can
  be built, so the result's error starts with ``BUILDER_UNAVAILABLE`` and the dispatcher
  fails the search with that reason.
* :class:`BuilderFailed`: the builder raised, or returned something that is not a Keras
  model for these images. Only that trial fails, with the reason.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from mloptimizer.space import Architecture

__all__ = [
    "BuilderFailed",
    "BuilderUnavailable",
    "add_builder_path",
    "build_custom",
    "import_builder",
]


class BuilderUnavailable(Exception):
    """The builder's module or function cannot be found: no trial can be built."""


class BuilderFailed(Exception):
    """The builder raised, or returned no model fit for these images: this trial fails."""


def add_builder_path(folder: Path) -> None:
    """Let builders be imported from ``folder`` too (after everything on the path already:
    a file there never hides an installed package)."""
    path = str(folder.resolve())
    if path not in sys.path:
        sys.path.append(path)


def import_builder(name: str) -> Callable[..., Any]:
    """The function ``name`` (``module:function``) names, imported.

    Importing the module also registers any Keras classes it declares, which a saved
    custom model needs before it can be loaded.

    Raises:
        BuilderUnavailable: the module cannot be imported or lacks the function.
    """
    module_name, _, function = name.partition(":")
    where = (
        "put it on the trainer image's Python path (or beside the search file for mloptimizer run)"
    )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time error: a syntax error is as fatal
        raise BuilderUnavailable(
            f"{name}: cannot import {module_name} ({type(error).__name__}: {error}); {where}"
        ) from error
    built = getattr(module, function, None)
    if not callable(built):
        raise BuilderUnavailable(f"{name}: {module_name} has no function {function}; {where}")
    return built  # type: ignore[no-any-return]


def build_custom(
    arch: Architecture, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """Call the builder with the trial's parameters; check that it made a model for these
    images (float32 in [0, 1] of ``input_shape``) with ``num_classes`` outputs.

    Raises:
        BuilderUnavailable: the builder cannot be imported.
        BuilderFailed: the builder raised, or returned no fitting Keras model.
    """
    assert arch.custom_builder is not None
    name = arch.custom_builder
    build = import_builder(name)
    try:
        model = build(
            dict(arch.custom_params or {}), input_shape=input_shape, num_classes=num_classes
        )
    except Exception as error:
        raise BuilderFailed(f"the builder {name} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, keras.Model):
        raise BuilderFailed(
            f"the builder {name} returned {type(model).__name__}, not a keras.Model"
        )
    given = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if (
        given is None
        or len(given) != 3
        or any(d is not None and d != want for d, want in zip(given, input_shape, strict=True))
    ):
        raise BuilderFailed(
            f"the builder {name} made a model for inputs {model.input_shape}, but the images "
            f"are {input_shape}: build it with keras.Input(shape=input_shape)"
        )
    outputs = model.output_shape
    if isinstance(outputs, list) or outputs[-1] != num_classes:
        raise BuilderFailed(
            f"the builder {name} made a model with outputs {outputs}; it must end in a "
            f"softmax over num_classes ({num_classes})"
        )
    return model
