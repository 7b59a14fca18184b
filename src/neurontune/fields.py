"""Config fields with help text, allowed values and a ``--help`` group (read by :mod:`neurontune.config`),
and whether the user set a field (:func:`is_set`)."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import Field, field
from typing import Any

# the fields the user set (command line, YAML), while config_from_args builds a config
GIVEN: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("given", default=None)


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


def is_set(cfg: Any, name: str) -> bool:
    """Whether the user set ``name`` (even to its default value); for a config built in Python, whether
    it differs from the default."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return name in given
    return getattr(cfg, name) != next(f.default for f in dataclasses.fields(cfg) if f.name == name)
