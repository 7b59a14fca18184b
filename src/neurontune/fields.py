"""Config fields with help text, allowed values and a ``--help`` group (read by :mod:`neurontune.config`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, choices: Sequence[str] | None = None, group: str | None = None) -> Any:
    """A dataclass field whose metadata drives the command line: ``help``, ``choices`` (checked when the
    config is built, listed in ``--help``) and ``group`` (the ``--help`` section it is listed under)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if group is not None:
        meta["group"] = group
    return field(default=default, metadata=meta)
