r"""Export a row adapter as a standard PEFT LoRA adapter that gives exactly the same function.

A row delta ``D`` (k x c) on output rows ``I`` and input columns ``J`` adds ``D x[J]`` to ``y[I]``.
That is a LoRA update ``B A`` with scaling 1 in either of two exact factorisations::

    rank k:  A = D placed on the columns J (k x in),   B = one-hot columns e_I (out x k)
    rank c:  A = one-hot rows e_J (c x in),             B = D placed on the rows I (out x c)

We take the smaller rank per module (rows only: ``c = in``, so rank ``k``). By default every module is
zero-padded to the largest rank, with ``lora_alpha = r`` (scaling 1): loaders that read one ``r`` and
one ``lora_alpha`` for the whole adapter (vLLM; llama.cpp computes alpha / rank per tensor) then
compute the same function. ``per_module_rank=True`` writes each module at its own rank with PEFT's
``rank_pattern`` / ``alpha_pattern`` instead (smaller; PEFT and transformers load it).

Serving limits, as documented by the stacks: vLLM serves LoRA ranks up to its ``--max-lora-rank``,
16 by default, settable to 8, 16, 32, 64, 128, 256, 320 or 512. :func:`export_peft_lora` warns above 16
and above 512.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from neurontune.errors import NeurontuneError
from neurontune.io import atomic_dir, refuse_existing, write_json, write_safetensors
from neurontune.spec import adapter_spec, peft_key, read_adapter

VLLM_DEFAULT_MAX_RANK = 16
VLLM_MAX_RANK = 512


def lora_factors(
    delta: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` equal to the delta scattered into an (out x in) zero matrix; rank
    ``min(k, c)``."""
    out_f, in_f = shape
    k, c = delta.shape
    rows = torch.arange(out_f) if rows is None else rows.long()
    cols = torch.arange(in_f) if cols is None else cols.long()
    delta = delta.float()
    if k <= c:
        a = torch.zeros(k, in_f)
        a[:, cols] = delta
        b = torch.zeros(out_f, k)
        b[rows, torch.arange(k)] = 1.0
    else:
        a = torch.zeros(c, in_f)
        a[torch.arange(c), cols] = 1.0
        b = torch.zeros(out_f, c)
        b[rows] = delta
    return a, b


def _pad(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = r - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], 1)


def export_peft_lora(
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike,
    per_module_rank: bool = False,
    base_model: str | None = None,
    fan_in_fan_out: bool | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the row adapter in ``adapter_dir`` as a PEFT LoRA adapter in ``output`` (atomically; an
    existing ``output`` is replaced only with ``overwrite``).

    Returns a summary: ``ranks`` per module, ``r`` (the adapter's), ``warnings``. ``fan_in_fan_out``
    (GPT-2 ``Conv1D`` bases) is taken from the adapter's record when not given.
    """
    from peft import LoraConfig

    cfg, tensors = read_adapter(adapter_dir)
    spec = adapter_spec(cfg, tensors, adapter_dir)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, sel in spec.modules.items():
        rows = tensors.get(f"{name}.rows") if sel.rows is not None else None
        cols = tensors.get(f"{name}.cols") if sel.cols is not None else None
        factors[name] = lora_factors(tensors[f"{name}.delta"], rows, cols, tuple(sel.shape))
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    r = max(ranks.values())
    if fan_in_fan_out is None:
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    common = dict(
        target_modules=sorted(factors), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or cfg.get("base_model"), fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
    )  # fmt: skip
    if per_module_rank:
        # escaped full names: PEFT matches patterns as regexes against module names
        pattern = {re.escape(n): k for n, k in ranks.items()}
        lcfg = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), **common)
    else:
        factors = {n: _pad(a, b, r) for n, (a, b) in factors.items()}
        lcfg = LoraConfig(r=r, lora_alpha=r, **common)
    weights = {}
    for name, (a, b) in factors.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        weights[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    warnings = []
    if r > VLLM_MAX_RANK:
        warnings.append(
            f"rank {r} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_RANK}); vLLM cannot serve it"
        )
    elif r > VLLM_DEFAULT_MAX_RANK:
        warnings.append(
            f"rank {r} exceeds vLLM's default --max-lora-rank ({VLLM_DEFAULT_MAX_RANK}): serve with "
            f"--max-lora-rank {next(v for v in (32, 64, 128, 256, 320, 512) if v >= r)}"
        )
    provenance = {"exported_from": str(adapter_dir), "format": cfg.get("format"), "ranks": ranks}
    with atomic_dir(output, replace=overwrite) as tmp:
        lcfg.save_pretrained(str(tmp))
        write_safetensors(tmp / "adapter_model.safetensors", weights, {"format": "pt"})
        write_json(tmp / "neurontune_export.json", provenance)
    return {"r": r, "ranks": ranks, "warnings": warnings, "per_module_rank": per_module_rank}


def export_peft_rowtune(
    adapter_dir: str | os.PathLike, output: str | os.PathLike, base_model: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write the row adapter in ``adapter_dir`` (either format) in the PEFT format of the registered
    ``rowtune`` method: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel`` / ``AutoPeftModelForCausalLM`` in a process that imported neurontune. The deltas and
    indices are copied bit for bit."""
    from neurontune.rowtune import RowTuneConfig

    cfg, tensors = read_adapter(adapter_dir)
    spec = adapter_spec(cfg, tensors, adapter_dir)
    modules = {n: sel.layout() for n, sel in spec.modules.items()}
    provenance = {**cfg.get("provenance", {}), "base_quantization": cfg.get("base_quantization", "none")}
    provenance["converted_from"] = {"path": str(adapter_dir), "format": cfg.get("format")}
    config = RowTuneConfig(
        task_type="CAUSAL_LM", base_model_name_or_path=base_model or cfg.get("base_model"), modules=modules,
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")), provenance=provenance,
        **cfg.get("rowtune_config", {}),
    )  # fmt: skip
    weights = {}
    for name in spec.modules:
        for part in ("delta", "rows", "cols"):
            if f"{name}.{part}" in tensors:
                t = tensors[f"{name}.{part}"]
                weights[peft_key(name, part)] = t if part == "delta" else t.long()
    with atomic_dir(output, replace=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        write_safetensors(tmp / "adapter_model.safetensors", weights, {"format": "pt"})
    return {"modules": len(modules), "params": spec.num_params()}


def check_export(adapter_dir: str | os.PathLike, peft_dir: str | os.PathLike, model: Any) -> float:
    """Largest absolute difference between the logits of the row adapter and of the exported PEFT
    adapter (LoRA or rowtune), both applied to ``model``'s weights, on a fixed batch of token ids. One copy of the base:
    the row adapter is put into ``model``, run, and taken out again (its layers give back the very
    modules they wrapped) before the PEFT adapter goes in."""
    from peft import PeftModel

    from neurontune.rowtune import RowTuneModel

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g).to(model.device)
    rows = RowTuneModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        a = rows(input_ids=ids).logits.float()
    base = rows.unload()
    lora = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        b = lora(input_ids=ids).logits.float()
    return float((a - b).abs().max())


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def export(
    adapter: str, to: str, output: str, per_module_rank: bool, check: bool, model: str | None,
    overwrite: bool = False,
) -> dict:  # fmt: skip
    """The ``neurontune export`` command."""
    from neurontune.models import load_model
    from neurontune.spec import is_row_adapter

    if to not in ("peft-lora", "peft-rowtune"):
        raise NeurontuneError(f"--to {to!r}: peft-lora or peft-rowtune")
    if not is_row_adapter(adapter):
        raise NeurontuneError(f"{adapter}: not a neurontune row adapter (only row adapters need exporting)")
    if Path(output).resolve() == Path(adapter).resolve():
        raise NeurontuneError(f"--output {output} would replace the adapter {adapter} itself")
    refuse_existing(output, overwrite)
    cfg, _ = read_adapter(adapter)
    if to == "peft-rowtune":
        if cfg.get("peft"):
            raise NeurontuneError(f"{adapter} is in the PEFT format already; load it with PeftModel")
        summary = export_peft_rowtune(adapter, output, model, overwrite)
        if check:
            base = load_model(model or cfg.get("base_model"), dtype="auto", device=_device())[0]
            summary["max_abs_logit_diff"] = check_export(adapter, output, base)
        print(f"wrote {output}/ (PEFT rowtune, {json.dumps(summary)})")
        return summary
    # the base once, in the dtype finetune used (auto: the checkpoint's own on a GPU, fp32 on a CPU)
    base = load_model(model or cfg.get("base_model"), dtype="auto", device=_device())[0] if check else None
    fan_in_fan_out = None  # from the adapter's record; adapters of neurontune <= 0.1 have none:
    if cfg.get("fan_in_fan_out") is None:
        from transformers.pytorch_utils import Conv1D

        if base is None:
            raise NeurontuneError(f"{adapter} predates the fan_in_fan_out record: export it with --check")
        fan_in_fan_out = any(isinstance(base.get_submodule(n), Conv1D) for n in cfg["modules"])
    summary = export_peft_lora(adapter, output, per_module_rank, model, fan_in_fan_out, overwrite)
    if check:
        summary["max_abs_logit_diff"] = check_export(adapter, output, base)
    for w in summary["warnings"]:
        print(f"warning: {w}")
    shown = {k: v for k, v in summary.items() if k != "ranks"}
    print(f"wrote {output}/ (PEFT LoRA, {json.dumps(shown)})")
    return summary
