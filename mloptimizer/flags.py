"""Command-line flags that fall back to environment variables, and say so in ``--help``.

A pod takes its settings from the environment (often from Secrets); a person at a terminal
from flags. :func:`env_flag` gives every flag both: the flag wins, then the variable, then
the default, and the help text ends with ``(env NAME; default VALUE)`` so that ``--help``
is the reference. The variable and the documented default stay on the argparse action
(``action.env``, ``action.shown_default``) for the tests that hold README to the code.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["env_flag"]


def env_flag(
    parser: argparse.ArgumentParser | Any,
    *flags: str,
    env: str,
    help: str,
    default: Any = None,
    shown: str | None = None,
    type: Any = str,
    **options: Any,
) -> argparse.Action:
    """Add a flag whose default comes from the environment variable ``env``.

    Args:
        parser: The (sub)parser or argument group.
        flags: The option strings, such as ``"--broker"``.
        env: The environment variable read when the flag is not given.
        help: What the flag does (``%`` doubled, as argparse wants).
        default: Used when neither flag nor variable is set.
        shown: How ``--help`` and README name the default, when ``str(default)`` is not it.
        type: Converts the flag's text and the variable's text alike (argparse applies it
            to string defaults, so a malformed variable is reported like a malformed flag).
        options: More ``add_argument`` options.
    """
    shown = shown if shown is not None else ("none" if default is None else _text(default))
    from_env = os.environ.get(env)
    action: argparse.Action = parser.add_argument(
        *flags,
        default=from_env if from_env is not None else default,
        type=type,
        help=f"{help} (env {env}; default {shown})",
        **options,
    )
    setattr(action, "env", env)  # noqa: B010 (argparse actions take extra attributes)
    setattr(action, "shown_default", shown)  # noqa: B010
    return action


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
