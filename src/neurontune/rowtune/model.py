"""Wrap a transformers model so that only the neurons of a :class:`NeuronSpec` train.

model = get_rowtune_model(base, spec)       # base parameters frozen, zero deltas
...train...                                  # only `*.delta` parameters have requires_grad
model.save_pretrained("adapter/")            # neurontune_adapter.json + neurontune_adapter.safetensors
model = RowTuneModel.from_pretrained(base, "adapter/")
plain = model.merge_and_unload()             # a plain transformers model again
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from neurontune import __version__
from neurontune.errors import AdapterError, NeurontuneError, SpecError, TargetError
from neurontune.io import atomic_dir, write_json, write_safetensors
from neurontune.models import model_quantization
from neurontune.rowtune.config import RowTuneConfig
from neurontune.rowtune.layer import RowSparseLinear
from neurontune.spec import (  # the adapter format: neurontune.spec reads it, this module writes it
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    NeuronSpec,
    adapter_spec,
    read_adapter,
)
from neurontune.targets import ModelWrapper, drop_quantization, refuse_tied_weights, set_submodule

ADAPTER_README = """# neurontune row adapter

Trained rows (fp32 deltas) and their indices, for the base model named in `neurontune_adapter.json`.
This is not a PEFT adapter: load it with `neurontune.RowTuneModel.from_pretrained(base, this_dir)`,
evaluate it with `neurontune eval --adapter this_dir`, merge it with `neurontune merge`, or turn it
into an exactly equivalent PEFT LoRA adapter (for PEFT, vLLM, TGI, llama.cpp) with

    neurontune export --adapter this_dir --to peft-lora --output OUT
"""


def _model_id(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


class RowTuneModel(ModelWrapper):
    """A model whose selected linear rows carry trainable fp32 deltas; everything else is frozen.

    Attribute access falls through to the wrapped model, so ``generate``, ``config`` and friends work.
    """

    def __init__(self, model: nn.Module, spec: NeuronSpec, config: RowTuneConfig | None = None) -> None:
        super().__init__()
        self.base_model = model
        self.rowtune_config = config or RowTuneConfig()
        spec.validate(model)
        self.neuron_spec = spec
        for p in model.parameters():
            p.requires_grad_(False)
        refuse_tied_weights(model, spec.modules)
        dtype = self.rowtune_config.torch_delta_dtype
        for name, sel in spec.modules.items():
            base_layer = model.get_submodule(name)
            try:
                layer = RowSparseLinear(base_layer, sel.rows, sel.cols, dtype, self.rowtune_config.impl)
            except ValueError as e:  # a layout the layer cannot train (impl=merged on a 4-bit layer)
                raise TargetError(f"{name}: {e}") from None
            set_submodule(model, name, layer)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model, with the row layers injected in place (as PEFT's method).

        Hand this to tools that want a ``PreTrainedModel`` (TRL's ``SFTTrainer``, lm-eval's ``HFLM``):
        it shares the trainable deltas with this wrapper, so ``save_pretrained`` here sees their updates.
        """
        return self.base_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    # ---- introspection --------------------------------------------------------------------------
    def rowtune_layers(self) -> dict[str, RowSparseLinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, RowSparseLinear)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)``; ``total`` counts the base model once (deltas are extra) and a 4-bit
        weight by its unpacked size (two values per stored byte), as PEFT does."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> str:
        trainable, total = self.get_nb_trainable_parameters()
        msg = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        print(msg)
        return msg

    # ---- merge / disable -----------------------------------------------------------------------
    def merge(self) -> None:
        for layer in self.rowtune_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.rowtune_layers().values():
            layer.unmerge()

    def set_adapter_enabled(self, enabled: bool) -> None:
        for layer in self.rowtune_layers().values():
            layer.disabled = not enabled

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model as if no delta existed (merged deltas are unmerged)."""
        layers = self.rowtune_layers().values()
        was_merged = [layer.merged for layer in layers]
        self.unmerge()
        self.set_adapter_enabled(False)
        try:
            yield
        finally:
            self.set_adapter_enabled(True)
            for layer, m in zip(layers, was_merged, strict=True):
                if m:
                    layer.merge()

    def _unwrap(self, merge: bool) -> nn.Module:
        quantized = False
        for name, layer in self.rowtune_layers().items():
            if merge and layer.quantized:
                set_submodule(self.base_model, name, layer.dequantized())
                quantized = True
                continue
            if merge:
                layer.merge()
            else:
                layer.unmerge()
            layer._merged_block = None
            set_submodule(self.base_model, name, layer.base_layer)
        if quantized:
            drop_quantization(self.base_model)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Fold every delta into the base weights and return the plain model (``save_pretrained``-able).

        On a quantized base (bitsandbytes 4-bit/8-bit) the result is dequantized: every linear layer
        becomes a plain one in the layers' compute dtype holding ``dequant(W)`` (+ the delta on the
        trained rows), i.e. exactly the function that was trained, at 2-4x the quantized size."""
        return self._unwrap(merge=True)

    def unload(self) -> nn.Module:
        """Drop the deltas and return the untouched base model."""
        return self._unwrap(merge=False)

    # ---- adapter files -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.rowtune_layers().items():
            out[f"{name}.delta"] = layer.delta.detach()
            if layer.rows is not None:
                out[f"{name}.rows"] = layer.rows.to(torch.int32)
            if layer.cols is not None:
                out[f"{name}.cols"] = layer.cols.to(torch.int32)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **extra_config: Any) -> Path:
        """Write ``neurontune_adapter.json`` + ``neurontune_adapter.safetensors`` (deltas and indices only)
        and a README saying what they are, atomically."""
        save_directory = Path(save_directory)
        layers = self.rowtune_layers()
        cfg = {
            "format": ADAPTER_FORMAT,
            "neurontune_version": __version__,
            "base_model": _model_id(self.base_model),
            "base_quantization": model_quantization(self.base_model),  # load the base the same way
            "rowtune_config": self.rowtune_config.legacy_dict(),
            "provenance": self.neuron_spec.provenance,
            # GPT-2 style Conv1D bases store weights as (in, out): PEFT's LoRA needs fan_in_fan_out then
            "fan_in_fan_out": any(isinstance(m.base_layer, Conv1D) for m in layers.values()),
            "modules": {
                n: {
                    "shape": [m.out_features, m.in_features],
                    "delta_shape": list(m.delta.shape),
                    "rows": m.rows is not None,
                    "cols": m.cols is not None,
                }
                for n, m in layers.items()
            },
            **extra_config,
        }
        with atomic_dir(save_directory) as tmp:
            write_safetensors(tmp / ADAPTER_WEIGHTS, self.adapter_state_dict(), {"format": ADAPTER_FORMAT})
            write_json(tmp / ADAPTER_CONFIG, cfg)
            (tmp / "README.md").write_text(ADAPTER_README, encoding="utf-8")
        return save_directory

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False
    ) -> RowTuneModel:
        """Load an adapter onto ``model``. Checks it fits (module names, shapes, indices) before touching it."""
        cfg, tensors = read_adapter(adapter_dir)
        spec = adapter_spec(cfg, tensors, adapter_dir)
        try:
            spec.validate(model)
        except SpecError as e:
            raise AdapterError(
                f"adapter {adapter_dir} does not fit this model ({type(model).__name__}, "
                f"{_model_id(model)!r}; adapter made for {cfg.get('base_model')!r}): {e}"
            ) from None
        for name, sel in spec.modules.items():
            if tuple(tensors[f"{name}.delta"].shape) != sel.delta_shape():
                raise AdapterError(
                    f"adapter {adapter_dir}: {name}.delta has shape {tuple(tensors[f'{name}.delta'].shape)}, "
                    f"expected {sel.delta_shape()} from its indices"
                )
        try:
            rt_config = RowTuneConfig.from_dict(cfg.get("rowtune_config", {}))
        except (TypeError, NeurontuneError) as e:
            raise AdapterError(f"adapter {adapter_dir}: bad rowtune_config: {e}") from None
        wrapped = cls(model, spec, rt_config)
        with torch.no_grad():
            for name, layer in wrapped.rowtune_layers().items():
                layer.delta.copy_(tensors[f"{name}.delta"].to(layer.delta.dtype))
        wrapped.requires_grad_(False)
        if is_trainable:
            for layer in wrapped.rowtune_layers().values():
                layer.delta.requires_grad_(True)
        return wrapped


def get_rowtune_model(
    model: nn.Module, spec: NeuronSpec, config: RowTuneConfig | None = None
) -> RowTuneModel:
    """Freeze ``model`` and make the spec's rows trainable (zero-initialised, so outputs are unchanged)."""
    return RowTuneModel(model, spec, config)
