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

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.saved_sharded: Path | None = None

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        return model.requires_grad_(True)

    def sharded_load_refused(self) -> str | None:
        return None  # the base's placeholders become trainable shards, filled from the checkpoint

    def gather_sharded(self, model: nn.Module, tok: Any, out: Path) -> None:
        """The whole model, written by every process together a parameter at a time (the main process
        writes): nothing gathers it whole anywhere."""
        from neurontune.runtime import process_state
        from neurontune.sharded import save_model_sharded

        save_model_sharded(model, out / "model", tok, process_state().is_main_process)
        self.saved_sharded = out / "model"

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        if self.saved_sharded is not None:  # written by gather_sharded
            return self.saved_sharded
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
