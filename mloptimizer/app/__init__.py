"""The application layer: the command line, ``mloptimizer run`` and its report.

The only part of the code base that composes the core (:mod:`mloptimizer`) with the
trainer (:mod:`mloptimizer.trainer`) and the operator (:mod:`mloptimizer.operator`); it
imports the trainer and the operator lazily, so ``mloptimizer validate`` never loads
TensorFlow or kopf. The import contracts in ``pyproject.toml`` keep the other walls.
"""
