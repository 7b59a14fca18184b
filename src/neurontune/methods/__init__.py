"""Fine-tuning methods, one module each, registered by name (``method=<name>``).

Built in: ``rows``, ``neft`` (:mod:`.rows`); ``lora``, ``dora``, ``pissa``, ``shira`` (PEFT,
:mod:`.peft_methods`); ``full``, ``none`` (:mod:`.simple`); ``gates`` (:mod:`.gates`). A new method is
one :class:`Method` subclass decorated with :func:`register` (see :mod:`.base`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from neurontune.errors import NeurontuneError
from neurontune.methods.base import Method, register, registry

# isort: off
# importing a method's module registers it; this order is the order of --help and of load_output's tries
from neurontune.methods import rows, peft_methods, simple, gates  # noqa: F401
# isort: on

__all__ = ["Method", "get_method", "load_output", "method_names", "option_classes", "register", "registry"]


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def get_method(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NeurontuneError(f"unknown method {name!r}; choose one of {', '.join(methods)}{hint}")
    return methods[name]


def option_classes() -> list[type]:
    """The methods' option dataclasses, each once, in registration order."""
    return list(dict.fromkeys(m.options for m in registry().values() if m.options is not None))


def load_output(
    path: str | Path, model_name: str | None, dtype: str, is_trainable: bool = False,
    quantization: str | None = None,
) -> tuple[Any, Any, str]:  # fmt: skip
    """``(model, tokenizer, method name)`` for a saved adapter of any registered method."""
    from neurontune.io import read_json
    from neurontune.rundir import refuse_run_dir

    path = Path(path)
    if not path.is_dir():
        raise NeurontuneError(f"adapter directory not found: {path}")
    refuse_run_dir(path, "an adapter")
    cfg_file = path / "adapter_config.json"
    cfg = read_json(cfg_file, "adapter config") if cfg_file.is_file() else None
    for name, method in registry().items():
        if method.can_load(path, cfg):
            model, tok = method.load(path, model_name, dtype, is_trainable, quantization)
            return model, tok, name
    raise NeurontuneError(f"{path}: neither a neurontune row adapter nor a PEFT adapter")
