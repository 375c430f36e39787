"""The trainer: model builder, datasets, training loop and broker worker.

Importing this package quiets TensorFlow and keeps Keras' files out of ``~/.keras``;
both must happen before TensorFlow is first imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault(
    "KERAS_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "/tmp"), "mloptimizer-keras")
)
