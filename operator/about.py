"""The Kubernetes operator (kopf handlers over plain functions).

This folder is the package ``mloptimizer.operator``. It has no ``__init__.py`` on purpose:
with one, running Python from the repository root would shadow the standard library
module ``operator``.
"""
