"""NeuronSpec: which output rows (and optionally input columns) of which linear modules are trainable.

A *neuron* is one output row ``W[i, :]`` of a linear layer. A spec maps full module names
(``model.layers.3.mlp.up_proj``) to a :class:`ModuleSelection` and records where the selection came
from (scorer, budget, base model, seed), so a selection is reproducible and comparable later.
Saved as plain JSON.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontune.errors import AdapterError, NeurontuneError, SpecError
from neurontune.io import read_json, read_safetensors, write_json

SPEC_FORMAT = "neurontune.neuron_spec/1"


def _clean_indices(
    name: str, what: str, idx: Iterable[int] | torch.Tensor | None, size: int | None
) -> list[int] | None:
    if idx is None:
        return None
    if isinstance(idx, torch.Tensor):
        if idx.is_floating_point() or idx.is_complex():
            raise SpecError(f"{name}: {what} indices must be integers, got a {idx.dtype} tensor")
        idx = idx.flatten().tolist()
    out: list[int] = []
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                if int(i) != i:
                    raise ValueError
                i = int(i)
            except (TypeError, ValueError):
                raise SpecError(f"{name}: {what} index {i!r} is not an integer") from None
        out.append(i)
    if not out:
        raise SpecError(f"{name}: empty {what} selection; drop the module from the spec instead")
    dups = sorted(i for i, c in Counter(out).items() if c > 1)
    if dups:
        raise SpecError(f"{name}: duplicated {what} indices {dups[:10]}")
    bad = [i for i in out if i < 0 or (size is not None and i >= size)]
    if bad:
        bound = f"[0, {size})" if size is not None else ">= 0"
        raise SpecError(f"{name}: {what} index {bad[0]} out of range {bound}")
    return sorted(out)


@dataclass
class ModuleSelection:
    """Selected rows/columns of one linear module.

    ``rows=None`` means every output row; ``cols=None`` means every input column. ``shape`` is the
    module's ``(out_features, in_features)`` and is used to range-check indices.
    """

    rows: list[int] | None
    cols: list[int] | None = None
    shape: tuple[int, int] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.shape is not None:
            if len(self.shape) != 2 or any(int(s) <= 0 for s in self.shape):
                raise SpecError(f"{self.name}: shape must be (out_features, in_features), got {self.shape}")
            self.shape = (int(self.shape[0]), int(self.shape[1]))
        out_f, in_f = self.shape if self.shape is not None else (None, None)
        self.rows = _clean_indices(self.name, "row", self.rows, out_f)
        self.cols = _clean_indices(self.name, "column", self.cols, in_f)
        if self.rows is None and self.cols is None and self.shape is None:
            raise SpecError(f"{self.name}: selecting every row and column needs the module shape")

    def delta_shape(self) -> tuple[int, int]:
        if self.shape is None and (self.rows is None or self.cols is None):
            raise SpecError(f"{self.name}: shape unknown; validate the spec against a model first")
        k = len(self.rows) if self.rows is not None else self.shape[0]
        c = len(self.cols) if self.cols is not None else self.shape[1]
        return k, c

    def num_params(self) -> int:
        k, c = self.delta_shape()
        return k * c

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "shape": list(self.shape) if self.shape else None}

    def layout(self) -> dict[str, Any]:
        """What a PEFT row adapter's config keeps of the selection: how many rows and columns (``None``:
        all), and the module shape; the indices travel in the weights file."""
        return {
            "rows": None if self.rows is None else len(self.rows),
            "cols": None if self.cols is None else len(self.cols),
            "shape": list(self.shape) if self.shape else None,
        }


@dataclass
class NeuronSpec:
    """Module name -> selected rows (and optional columns), plus provenance.

    Example::

        spec = NeuronSpec({"model.layers.0.mlp.up_proj": [3, 17, 42]})
        spec.save("neurons.json")
    """

    modules: dict[str, ModuleSelection] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mods: dict[str, ModuleSelection] = {}
        for name, sel in dict(self.modules).items():
            if not isinstance(name, str) or not name:
                raise SpecError(f"module names must be non-empty strings, got {name!r}")
            if isinstance(sel, ModuleSelection):
                sel.name = name
            elif isinstance(sel, Mapping):
                unknown = set(sel) - {"rows", "cols", "shape"}
                if unknown:
                    raise SpecError(f"{name}: unknown keys {sorted(unknown)} (expected rows, cols, shape)")
                shape = sel.get("shape")
                sel = ModuleSelection(sel.get("rows"), sel.get("cols"), tuple(shape) if shape else None, name)
            else:  # a plain list/tensor of row indices
                sel = ModuleSelection(sel, None, None, name)
            mods[name] = sel
        self.modules = mods
        self.provenance = dict(self.provenance)
        self.provenance.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    # ---- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules.items())

    def num_rows(self) -> int:
        return sum(len(s.rows) if s.rows is not None else s.delta_shape()[0] for s in self.modules.values())

    def num_params(self) -> int:
        return sum(s.num_params() for s in self.modules.values())

    def validate(self, model: torch.nn.Module) -> NeuronSpec:
        """Check every module exists in ``model``, is tunable, and every index is in range.

        Fills in missing shapes. Returns ``self`` for chaining. Raises :class:`SpecError`.
        """
        from neurontune.targets import linear_shape  # local import: targets imports nothing from here

        named = dict(model.named_modules())
        for name, sel in self.modules.items():
            if name not in named:
                close = [n for n in named if n.endswith(name.split(".")[-1])][:3]
                hint = f"; modules with the same suffix: {close}" if close else ""
                raise SpecError(f"spec names module {name!r}, which the model does not have{hint}")
            if hasattr(named[name], "base_layer") and hasattr(named[name], "delta"):
                raise SpecError(f"{name} is already wrapped by neurontune; unload the first adapter")
            module = named[name]
            if callable(getattr(module, "get_base_layer", None)):  # a PEFT tuner layer: its base decides
                module = module.get_base_layer()
            shape = linear_shape(module)
            if shape is None:
                raise SpecError(
                    f"spec names {name!r}, a {type(named[name]).__name__}, which is not a linear layer"
                )
            if sel.shape is not None and tuple(sel.shape) != shape:
                raise SpecError(
                    f"{name}: spec was made for shape {tuple(sel.shape)} but the model's module has shape {shape}"
                )
            self.modules[name] = ModuleSelection(sel.rows, sel.cols, shape, name)
        return self

    def summary(self) -> dict[str, Any]:
        """Rows selected per module type (the last name component) and per layer index."""
        by_type: Counter[str] = Counter()
        by_layer: Counter[str] = Counter()
        for name, sel in self.modules.items():
            k = len(sel.rows) if sel.rows is not None else sel.delta_shape()[0]
            by_type[name.split(".")[-1]] += k
            layer = next((p for p in name.split(".") if p.isdigit()), "-")
            by_layer[layer] += k
        return {
            "modules": len(self.modules),
            "rows": sum(by_type.values()),
            "params": self.num_params(),
            "rows_by_type": dict(by_type),
            "rows_by_layer": dict(
                sorted(
                    by_layer.items(),
                    key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0),
                )
            ),
        }

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "provenance": self.provenance,
            "modules": {n: s.to_dict() for n, s in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "spec") -> NeuronSpec:
        if not isinstance(d, Mapping) or "modules" not in d:
            raise SpecError(f"{source}: not a NeuronSpec (no 'modules' key)")
        fmt = d.get("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise SpecError(f"{source}: unsupported spec format {fmt!r} (expected {SPEC_FORMAT!r})")
        if not isinstance(d["modules"], Mapping):
            raise SpecError(f"{source}: 'modules' must be a mapping of module name -> selection")
        return cls(dict(d["modules"]), dict(d.get("provenance", {})))

    def save(self, path: str | os.PathLike, replace: bool = True) -> None:
        write_json(path, self.to_dict(), replace=replace)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronSpec:
        return cls.from_dict(read_json(path, "neuron spec"), source=str(path))


# ---- row adapters: the spec and its deltas on disk ------------------------------------------------
# Two formats are read. Since the PEFT method (neurontune.rowtune.tuner), finetune writes PEFT's files:
# `adapter_config.json` with peft_type "ROWTUNE" and `adapter_model.safetensors` holding
# `base_model.model.<module>.rowtune_{delta,rows,cols}`. Before it, `neurontune.rowtune.RowTuneModel`
# wrote (and still writes) our own names, `neurontune_adapter.json` + `neurontune_adapter.safetensors`
# with `<module>.{delta,rows,cols}`; neurontune <= 0.1 wrote that format under PEFT's file names.
# `read_adapter` gives both in the second one's terms, so export, analysis and the loaders read either.
ADAPTER_CONFIG = "neurontune_adapter.json"
ADAPTER_WEIGHTS = "neurontune_adapter.safetensors"
LEGACY_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's names
ADAPTER_FORMAT = "neurontune.rowtune/1"
PEFT_TYPE = "ROWTUNE"
PEFT_PREFIX = "base_model.model."
# what `neurontune_adapter.json` keeps of a RowTuneConfig (its `rowtune_config`)
ROWTUNE_CONFIG_KEYS = ("target_modules", "exclude_modules", "delta_dtype", "impl")


def peft_key(module: str, part: str) -> str:
    """The name of a module's ``delta`` / ``rows`` / ``cols`` in a PEFT row adapter's weights file."""
    return f"{PEFT_PREFIX}{module}.rowtune_{part}"


def adapter_files(adapter_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The (config, weights) files of a row adapter: ours, or PEFT's names (the PEFT format, or the
    neurontune format of older versions)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file() and (d / LEGACY_FILES[0]).is_file():
        return d / LEGACY_FILES[0], d / LEGACY_FILES[1]
    return d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS


def is_peft_row_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and cfg.get("peft_type") == PEFT_TYPE


def is_row_adapter(adapter_dir: str | os.PathLike) -> bool:
    """Whether ``adapter_dir`` holds a neurontune row adapter (either format, either file naming)."""
    cfg_file, _ = adapter_files(adapter_dir)
    if not cfg_file.is_file():
        return False
    try:
        cfg = read_json(cfg_file, "adapter config")
    except NeurontuneError:
        return cfg_file.name == ADAPTER_CONFIG  # ours but broken: read_adapter says what is wrong
    return isinstance(cfg, dict) and (cfg.get("format") == ADAPTER_FORMAT or is_peft_row_config(cfg))


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and sanity-check an adapter directory (JSON + safetensors only; nothing is unpickled).

    Returns the config and tensors in the ``neurontune_adapter`` terms (``<module>.delta`` etc.),
    whichever format is on disk; ``cfg["peft"]`` says whether it was the PEFT one."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory not found: {adapter_dir}")
    cfg_file, weights_file = adapter_files(adapter_dir)
    if not cfg_file.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a neurontune row adapter")
    try:
        cfg = read_json(cfg_file, "adapter config")
        tensors = read_safetensors(weights_file, "adapter weights")
    except NeurontuneError as e:
        raise AdapterError(str(e)) from None
    if is_peft_row_config(cfg):
        return _from_peft_format(cfg, tensors, cfg_file)
    if not isinstance(cfg, dict) or cfg.get("format") != ADAPTER_FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        hint = (
            " (this looks like a PEFT adapter; load it with peft)"
            if isinstance(cfg, dict) and "peft_type" in cfg
            else ""
        )
        raise AdapterError(f"{cfg_file}: not a neurontune row adapter (format={got!r}){hint}")
    if not isinstance(cfg.get("modules"), dict) or not cfg["modules"]:
        raise AdapterError(f"{cfg_file}: no 'modules' listed")
    return cfg, tensors


def _from_peft_format(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = cfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise AdapterError(f"{where}: no 'modules' listed")
    out: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, m in modules.items():
        if not isinstance(m, dict):
            raise AdapterError(f"{where}: modules[{name!r}] must be an object, got {type(m).__name__}")
        key = peft_key(name, "delta")
        if key not in tensors:
            raise AdapterError(f"adapter {where.parent}: tensor {key} missing from {LEGACY_FILES[1]}")
        out[f"{name}.delta"] = tensors.pop(key)
        for part in ("rows", "cols"):
            if m.get(part) is not None:
                key = peft_key(name, part)
                if key not in tensors:
                    raise AdapterError(f"adapter {where.parent}: tensor {key} missing from {LEGACY_FILES[1]}")
                out[f"{name}.{part}"] = tensors.pop(key)
        info[name] = {
            "shape": m.get("shape"),
            "delta_shape": list(out[f"{name}.delta"].shape),
            "rows": m.get("rows") is not None,
            "cols": m.get("cols") is not None,
        }
    if tensors:
        raise AdapterError(
            f"adapter {where.parent}: unexpected tensors {sorted(tensors)[:5]} in {LEGACY_FILES[1]}"
        )
    provenance = cfg.get("provenance") or {}
    legacy = {
        "format": ADAPTER_FORMAT,
        "peft": True,
        "base_model": cfg.get("base_model_name_or_path"),
        "base_quantization": provenance.get("base_quantization", "none"),
        "rowtune_config": {k: cfg[k] for k in ROWTUNE_CONFIG_KEYS if k in cfg},
        "provenance": provenance,
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "modules": info,
    }
    return legacy, out


def adapter_spec(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: Any = "adapter") -> NeuronSpec:
    """Rebuild the :class:`NeuronSpec` an adapter was trained with from its config and index tensors."""
    expected: set[str] = set()
    modules: dict[str, dict[str, Any]] = {}
    for name, info in cfg["modules"].items():
        keys = [f"{name}.delta"] + [f"{name}.{k}" for k in ("rows", "cols") if info.get(k)]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise AdapterError(f"adapter {where}: tensors {missing} missing from {ADAPTER_WEIGHTS}")
        expected.update(keys)
        for k in ("rows", "cols"):
            t = tensors.get(f"{name}.{k}")
            if t is not None and t.is_floating_point():
                raise AdapterError(f"adapter {where}: {name}.{k} must be an integer tensor, got {t.dtype}")
        if not torch.isfinite(tensors[f"{name}.delta"]).all():
            raise AdapterError(
                f"adapter {where}: {name}.delta holds NaN or infinite values (from a diverged run?)"
            )
        modules[name] = {
            "rows": tensors.get(f"{name}.rows") if info.get("rows") else None,
            "cols": tensors.get(f"{name}.cols") if info.get("cols") else None,
            "shape": info.get("shape"),
        }
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterError(f"adapter {where}: unexpected tensors {extra[:5]} in {ADAPTER_WEIGHTS}")
    try:
        return NeuronSpec(modules, cfg.get("provenance", {}))
    except SpecError as e:
        raise AdapterError(f"adapter {where}: {e}") from None


def load_spec(path: str | Path) -> NeuronSpec:
    """A NeuronSpec from a spec JSON file, a neurontune adapter directory or a run directory."""
    p = Path(path)
    if p.is_file():
        return NeuronSpec.load(p)
    if (p / "neuron_spec.json").is_file():
        return NeuronSpec.load(p / "neuron_spec.json")
    if p.is_dir() and is_row_adapter(p):
        cfg, tensors = read_adapter(p)
        return adapter_spec(cfg, tensors, p)
    raise NeurontuneError(f"{p}: not a NeuronSpec file, a neurontune adapter or a run directory with one")
