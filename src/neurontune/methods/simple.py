"""``method=full`` (every parameter trains; saves a full model) and ``method=none`` (zero-shot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from neurontune.methods.base import Method, register


@register
class Full(Method):
    name = "full"
    help = "full fine-tuning of every parameter; saves output_dir/model"

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        return model.requires_grad_(True)

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        from neurontune.io import save_pretrained_atomic

        return save_pretrained_atomic(out / "model", model, tok)


@register
class NoTraining(Method):
    name = "none"
    help = "no training: evaluate the base model (zero-shot)"
    trains = False

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        return model.requires_grad_(False)
