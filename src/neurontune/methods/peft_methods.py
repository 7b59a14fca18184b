"""Baselines backed by PEFT: ``lora``, ``dora``, ``pissa``, ``shira``.

Each is a PEFT config built for the run's target modules at the run's budget (``lora_r``: by
default the R of a ``lora:R`` budget, so rows and these baselines train the same number of
parameters; DoRA adds one magnitude per output row). Adding another PEFT method is a subclass that
returns its config from :meth:`PeftMethod.peft_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurontune.errors import NeurontuneError
from neurontune.fields import opt
from neurontune.methods.base import Method, register

if TYPE_CHECKING:
    from torch import nn


@dataclass
class LoraOptions:
    lora_r: int | None = opt(
        None, "rank (default: R of a lora:R budget, else 8)", group="lora, dora, pissa, shira"
    )
    lora_alpha: float | None = opt(None, "LoRA alpha (default: 2 * lora_r)", group="lora, dora, pissa, shira")
    lora_dropout: float = opt(0.0, "LoRA dropout", group="lora, dora, pissa, shira")


def lora_rank(cfg: Any) -> int:
    """``lora_r``, else the R of a ``lora:R`` or ``lora-global:R`` budget, else 8."""
    if cfg.lora_r is not None:
        return cfg.lora_r
    b = cfg.budget_kwargs()
    return b.get("match_lora_rank") or b.get("global_lora_rank") or 8


class PeftMethod(Method):
    """A PEFT tuner on the run's target modules; saves a PEFT adapter (safetensors)."""

    options = LoraOptions
    outputs = ("adapter", "merged")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.lora_r is not None and cfg.lora_r <= 0:
            raise NeurontuneError(f"lora_r must be positive, got {cfg.lora_r}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise NeurontuneError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")

    def peft_config(self, targets: list[str]) -> Any:
        raise NotImplementedError

    def lora_config(self, targets: list[str], **kwargs: Any) -> Any:
        from peft import LoraConfig

        r = lora_rank(self.cfg)
        alpha = self.cfg.lora_alpha if self.cfg.lora_alpha is not None else 2 * r
        return LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=self.cfg.lora_dropout, target_modules=targets,
            task_type="CAUSAL_LM", **kwargs,
        )  # fmt: skip

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        from peft import get_peft_model

        from neurontune.targets import find_target_modules

        targets = find_target_modules(
            model, self.cfg.target_modules_value(), self.cfg.exclude_modules_value()
        )
        return get_peft_model(model, self.peft_config(targets))

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        from neurontune.io import atomic_dir, save_pretrained_atomic

        model.peft_config["default"].base_model_name_or_path = self.cfg.model  # what load() reloads
        with atomic_dir(out / "adapter") as tmp:
            self.save_adapter(model, tmp)
        if self.cfg.save_merged:
            save_pretrained_atomic(out / "merged", merge_untied(model), tok)
        return out / "adapter"

    def save_adapter(self, model: nn.Module, path: Path) -> None:
        self.save_peft_adapter(model, path)

    def metrics(self) -> dict[str, Any]:
        return {"lora_r": lora_rank(self.cfg)}

    @classmethod
    def can_load(cls, path: Path, adapter_config: dict[str, Any] | None) -> bool:
        return isinstance(adapter_config, dict) and "peft_type" in adapter_config

    @classmethod
    def load(
        cls,
        path: Path,
        model_name: str | None,
        dtype: str,
        is_trainable: bool,
        quantization: str | None = None,
    ) -> tuple[nn.Module, Any]:
        from neurontune.io import read_json
        from neurontune.models import DEFAULT_MODEL, load_model
        from neurontune.runtime import device

        if not (path / "adapter_model.safetensors").is_file():
            raise NeurontuneError(
                f"{path}: PEFT adapter without adapter_model.safetensors (pickles are refused)"
            )
        cfg = read_json(path / "adapter_config.json", "adapter config")
        base_name = model_name or cfg.get("base_model_name_or_path") or DEFAULT_MODEL
        base, tok = load_model(base_name, dtype=dtype, device=device(), quantization=quantization)
        return load_peft_adapter(base, path, is_trainable, base_name), tok


@register
class Lora(PeftMethod):
    name = "lora"
    default_lr = 1e-3
    help = "PEFT LoRA at rank lora_r (same trainable count as rows at a lora:R budget; QLoRA on a 4-bit base)"
    supports_quantization = True

    def peft_config(self, targets: list[str]) -> Any:
        return self.lora_config(targets)

    def sharded_load_refused(self) -> str | None:
        return None  # A random, B zero: nothing read from the base


@register
class Dora(PeftMethod):
    name = "dora"
    default_lr = 1e-3
    help = "PEFT DoRA (weight-decomposed LoRA) at rank lora_r"
    supports_quantization = True

    def peft_config(self, targets: list[str]) -> Any:
        return self.lora_config(targets, use_dora=True)


@register
class Pissa(PeftMethod):
    name = "pissa"
    help = "LoRA initialised from the principal singular vectors (PiSSA, fast SVD); saved as plain LoRA"

    def peft_config(self, targets: list[str]) -> Any:
        return self.lora_config(targets, init_lora_weights="pissa_niter_4")

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        import tempfile

        peft_model = super().build(model, tok, task, out)
        # PiSSA moves the principal part out of the base weights. To save an adapter for the
        # *original* base, PEFT converts it against the initial adapter, kept until the save.
        self._init_dir = tempfile.TemporaryDirectory(prefix="pissa-init-")
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(self._init_dir.name, save_embedding_layers=False)
        peft_model.peft_config["default"].init_lora_weights = "pissa_niter_4"
        return peft_model

    def save_adapter(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(
            path, save_embedding_layers=False, path_initial_model_for_weight_conversion=self._init_dir.name
        )

    def metrics(self) -> dict[str, Any]:
        r = lora_rank(self.cfg)
        return {"lora_r": r, "saved_lora_r": 2 * r}  # the conversion to plain LoRA doubles the rank


@register
class Shira(PeftMethod):
    name = "shira"
    help = "PEFT SHiRA: a sparse high-rank mask with lora_r * (in + out) trainable entries per module"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        if cfg.lora_alpha is not None or cfg.lora_dropout:
            raise NeurontuneError("method=shira has no alpha or dropout; drop lora_alpha / lora_dropout")

    def peft_config(self, targets: list[str]) -> Any:
        from peft import ShiraConfig

        return ShiraConfig(r=lora_rank(self.cfg), target_modules=targets, random_seed=self.cfg.seed)


def load_peft_adapter(base: nn.Module, path: Path, is_trainable: bool, base_name: str) -> nn.Module:
    """``PeftModel.from_pretrained(base, path)``, a misfit said in one line (our own errors, a row
    adapter's, pass as they are)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, path, is_trainable=is_trainable)
    except NeurontuneError:
        raise
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise NeurontuneError(
            f"PEFT adapter {path} does not fit the base model {base_name!r}: "
            f"{first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__}"
        ) from None


def merge_untied(peft_model: Any) -> Any:
    """``peft_model.merge_and_unload()`` after :func:`untie_adapted_weights`: the plain model that computes
    what the adapter did, a tied ``lm_head`` included."""
    untie_adapted_weights(peft_model)
    return peft_model.merge_and_unload()


def untie_adapted_weights(peft_model: Any) -> list[str]:
    """Before a merge: every adapted module whose base weight is shared with another module (an
    ``lm_head`` tied to the input embeddings) gets its own copy, and the config says the weights are no
    longer tied, so merging changes that module alone (folding B·A into a shared matrix would change the
    embeddings too). Returns the names untied; a note says so."""
    import torch

    base = peft_model.get_base_model()
    owners: dict[int, list[str]] = {}
    for n, p in base.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    untied = []
    for name, module in base.named_modules():
        layer = getattr(module, "base_layer", None)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and len(owners.get(id(weight), [])) > 1:
            layer.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(name)
    if untied:
        for cfg in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        print(
            f"note: {', '.join(untied)} shared its weight with the input embeddings; the merged model unties "
            "them (tie_word_embeddings=false), so the adapter changes the output layer alone"
        )
    return untied
