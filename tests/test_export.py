"""`neurontune export --to peft-lora`: the PEFT LoRA copy of a row adapter computes the same function,
loads through PEFT and transformers, and our own adapter is not mistaken for a PEFT one."""

import json

import pytest
import torch
from peft import PeftModel

from neurontune import get_rowtune_model
from neurontune.cli import main
from neurontune.export import export_peft_lora, lora_factors
from neurontune.models import tiny_model

from .conftest import make_batch
from .helpers import random_spec

SHAPES = {"rows": dict(k=5, cols=None), "rows+cols": dict(k=6, cols=4), "cols<rows": dict(k=9, cols=3)}


def _trained_adapter(kind, shape, path):
    base = tiny_model(kind)
    model = get_rowtune_model(base, random_spec(base, **SHAPES[shape], seed=3))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.rowtune_layers().values():
            layer.delta.copy_(0.3 * torch.randn(layer.delta.shape, generator=g))
    model.save_pretrained(path)
    batch = make_batch(base, seed=2)
    with torch.no_grad():
        return model(**batch).logits, batch


def test_lora_factors_are_exact():
    d = torch.randn(3, 4)
    rows, cols = torch.tensor([5, 0, 2]), torch.tensor([1, 6, 3, 7])
    full = torch.zeros(8, 9)
    full[rows[:, None], cols[None, :]] = d
    for r, c in ((rows, cols), (rows, None), (None, cols)):
        dd = d if c is not None else torch.randn(3, 9)
        dd = dd if r is not None else torch.randn(8, 4)
        a, b = lora_factors(dd, r, c, (8, 9))
        expect = torch.zeros(8, 9)
        expect[
            (torch.arange(8) if r is None else r)[:, None], (torch.arange(9) if c is None else c)[None, :]
        ] = dd
        torch.testing.assert_close(b @ a, expect, rtol=0, atol=0)
        assert a.shape[0] == min(dd.shape)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("per_module_rank", [False, True])
def test_exported_lora_reproduces_the_row_adapter(tmp_path, model_kind, shape, per_module_rank):
    ref, batch = _trained_adapter(model_kind, shape, tmp_path / "rows")
    summary = export_peft_lora(tmp_path / "rows", tmp_path / "lora", per_module_rank=per_module_rank)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == summary["r"]
    assert bool(cfg["rank_pattern"]) == per_module_rank
    peft_model = PeftModel.from_pretrained(tiny_model(model_kind), tmp_path / "lora").eval()
    with torch.no_grad():
        got = peft_model(**batch).logits
    # fp32: the LoRA path adds (x A^T) B^T instead of x D^T, a few float roundings apart
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got - tiny_model(model_kind)(**batch).logits).abs().max() > 1e-2  # the adapter does something
    hf = tiny_model(model_kind)
    hf.load_adapter(str(tmp_path / "lora"))  # transformers' own PEFT integration
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, ref, rtol=0, atol=1e-5)


def test_export_command_checks_logits_and_warns_about_serving_ranks(tmp_path, capsys):
    base = tiny_model("tiny-llama")
    model = get_rowtune_model(base, random_spec(base, k=20, seed=1))
    model.save_pretrained(tmp_path / "rows")
    out = tmp_path / "lora"
    assert (
        main(["export", "--adapter", str(tmp_path / "rows"), "--output", str(out), "model=tiny-llama"]) == 0
    )
    printed = capsys.readouterr().out
    assert (
        "warning: rank 20 exceeds vLLM's default --max-lora-rank (16): serve with --max-lora-rank 32"
        in printed
    )
    assert '"max_abs_logit_diff": 0.0' in printed  # zero deltas: both are exactly the base
    assert main(["export", "--adapter", str(tmp_path / "rows"), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--adapter", str(out), "--output", str(tmp_path / "x")]) == 2
    assert "not a neurontune row adapter" in capsys.readouterr().err


def test_peft_refuses_a_row_adapter_with_a_clear_message(tmp_path):
    _trained_adapter("tiny-llama", "rows", tmp_path / "rows")
    assert (tmp_path / "rows" / "README.md").read_text().startswith("# neurontune row adapter")
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path / "rows")
    hf = tiny_model("tiny-llama")
    with pytest.raises((ValueError, OSError), match="adapter_config.json|adapter model file not found"):
        hf.load_adapter(str(tmp_path / "rows"))
