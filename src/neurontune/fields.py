"""Config fields with help text, allowed values and a ``--help`` group (read by :mod:`neurontune.config`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import Field, field
from typing import Any


def opt(
    default: Any,
    help: str,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    group: str | None = None,
) -> Any:
    """A dataclass field whose metadata drives the command line: ``help``, ``choices`` (checked when the
    config is built, listed in ``--help``; a callable for open sets such as registered methods and
    scorers) and ``group`` (the ``--help`` section it is listed under)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices if callable(choices) else tuple(choices)
    if group is not None:
        meta["group"] = group
    return field(default=default, metadata=meta)


def choices_of(f: Field) -> tuple[str, ...] | None:
    """The allowed values of a field made by :func:`opt` (``None``: any)."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices
