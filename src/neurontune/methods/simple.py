"""``method=full`` (every parameter trains; saves a full model) and ``method=none`` (zero-shot)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurontune.methods.base import Method, register

if TYPE_CHECKING:
    from torch import nn


@register
class Full(Method):
    name = "full"
    help = "full fine-tuning of every parameter; saves output_dir/model"
    outputs = ("model",)
    default_lr = 3e-5

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        return model.requires_grad_(True)

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        from neurontune.io import save_pretrained_atomic

        return save_pretrained_atomic(out / "model", model, tok)

    @classmethod
    def can_load(cls, path: Path, adapter_config: dict[str, Any] | None) -> bool:
        return (path / "config.json").is_file()  # a whole model (full, merged, gates' pruned export)

    @classmethod
    def load(
        cls,
        path: Path,
        model_name: str | None,
        dtype: str,
        is_trainable: bool,
        quantization: str | None = None,
    ) -> tuple[nn.Module, Any]:
        from neurontune.models import load_model
        from neurontune.runtime import device

        if model_name is not None:
            from neurontune.errors import NeurontuneError

            raise NeurontuneError(
                f"{path} is a whole model, not an adapter: pass it as --model, without --adapter"
            )
        model, tok = load_model(str(path), dtype=dtype, device=device(), quantization=quantization)
        return model.requires_grad_(is_trainable), tok


@register
class NoTraining(Method):
    name = "none"
    help = "no training: evaluate the base model (zero-shot)"
    trains = False
    supports_quantization = True

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        return model.requires_grad_(False)
