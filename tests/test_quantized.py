"""A quantized base (bitsandbytes nf4 / fp4 / int8 on the CPU): rows and QLoRA train on it, only the
deltas change, scoring works through hooks, merge gives the trained function dequantized."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from neurontune.cli import main
from neurontune.errors import NeurontuneError, TargetError
from neurontune.models import load_model, model_quantization
from neurontune.rowtune import RowTuneConfig, RowTuneModel, get_rowtune_model
from neurontune.scoring import _weight_grads, score_model
from neurontune.spec import read_adapter
from neurontune.targets import dense_weight, find_target_modules, is_quantized
from tests.conftest import make_batch
from tests.helpers import random_spec

KINDS = ["nf4", "fp4", "int8"]


def quantized(kind: str = "nf4"):
    return load_model("tiny-llama", quantization=kind)[0]


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same weights as ``model``'s quantized ones, dequantized into plain layers (the reference)."""
    import copy

    return copy.deepcopy(model).dequantize()


@pytest.mark.parametrize("kind", KINDS)
def test_load_quantizes_every_linear_but_the_head(kind):
    model = quantized(kind)
    names = find_target_modules(model)
    assert names and all(is_quantized(model.get_submodule(n)) for n in names)
    assert not is_quantized(model.lm_head)
    assert model_quantization(model) == kind
    ref = load_model("tiny-llama")[0]
    b = make_batch(ref)
    with torch.no_grad():
        err = (model(input_ids=b["input_ids"]).logits - ref(input_ids=b["input_ids"]).logits).abs().max()
    assert 0 < err < 0.5  # quantized: close to the fp32 model, not equal to it


def test_unknown_quantization_is_one_clear_error():
    with pytest.raises(NeurontuneError, match="quantization must be one of"):
        load_model("tiny-llama", quantization="int4")


@pytest.mark.parametrize("kind", KINDS)
def test_rows_on_a_quantized_base_train_only_the_deltas(kind):
    model = quantized(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = dequantized_copy(model)
    spec = random_spec(model, k=3, seed=1)
    rt, rt_ref = get_rowtune_model(model, spec), get_rowtune_model(ref, spec)
    b = make_batch(model, seq=9)
    with torch.no_grad():  # zero deltas: exactly the base model
        base_logits = rt(input_ids=b["input_ids"]).logits
        with rt.disable_adapter():
            assert torch.equal(rt(input_ids=b["input_ids"]).logits, base_logits)
    rt.train()
    rt(**b).loss.backward()
    rt_ref(**b).loss.backward()
    for name, layer in rt.rowtune_layers().items():
        assert layer.delta.grad is not None and layer.delta.grad.abs().sum() > 0, name
        g_ref = rt_ref.rowtune_layers()[name].delta.grad
        # int8 quantizes the activations too (LLM.int8()), so its gradients only match loosely
        tol = 0.05 if kind == "int8" else 1e-4
        assert torch.allclose(layer.delta.grad, g_ref, rtol=tol, atol=tol * g_ref.abs().max()), name
    torch.optim.AdamW([p for p in rt.parameters() if p.requires_grad], lr=1e-2).step()
    after = {n.replace(".base_layer.", "."): p for n, p in rt.base_model.named_parameters()}
    assert {n for n in after if not n.endswith(".delta")} == set(before)
    for n, p in before.items():  # packed weights, norms and embeddings untouched; the deltas moved
        assert torch.equal(after[n], p), n
    assert all(layer.delta.abs().sum() > 0 for layer in rt.rowtune_layers().values())


def test_a_forward_in_eval_mode_does_not_break_later_training():
    """bitsandbytes' CPU inference layout makes a 4-bit layer non-differentiable once an eval-mode
    forward has rewritten it; load_model turns it off, so an evaluation before training is harmless."""
    model = quantized("nf4")
    b = make_batch(model, seq=9)
    with torch.no_grad():
        model.eval()(input_ids=b["input_ids"])
    rt = get_rowtune_model(model, random_spec(model, k=2))
    rt.train()
    rt(**b).loss.backward()
    first = rt.rowtune_layers()["model.layers.0.self_attn.q_proj"]
    assert first.delta.grad.abs().sum() > 0


def test_dense_impls_are_refused_on_a_quantized_layer():
    model = quantized("nf4")
    with pytest.raises(TargetError, match=r"q_proj: impl=merged needs a dense weight.*Linear4bit"):
        get_rowtune_model(model, random_spec(model, k=2), RowTuneConfig(impl="merged"))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_dequantizes_and_computes_what_was_trained(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantized(kind)
    rt = get_rowtune_model(model, random_spec(model, k=3, seed=2))
    with torch.no_grad():
        for layer in rt.rowtune_layers().values():
            layer.delta.normal_(0, 0.05)
    b = make_batch(model, seq=9)
    with torch.no_grad():
        unmerged = rt(input_ids=b["input_ids"]).logits
        merged = rt.merge_and_unload()
        assert not any(is_quantized(m) for m in merged.modules() if hasattr(m, "weight"))
        assert model_quantization(merged) == "none"
        got = merged(input_ids=b["input_ids"]).logits
    tol = 0.05 if kind == "int8" else 1e-4  # int8's forward quantizes the activations, the merged one not
    assert (got - unmerged).abs().max() < tol
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=b["input_ids"]).logits, got)


def test_adapter_save_load_is_exact_and_records_the_quantization(tmp_path):
    model = quantized("nf4")
    rt = get_rowtune_model(model, random_spec(model, k=3))
    with torch.no_grad():
        for layer in rt.rowtune_layers().values():
            layer.delta.normal_(0, 0.05)
    rt.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "neurontune_adapter.json").read_text())
    assert cfg["base_quantization"] == "nf4"
    again = RowTuneModel.from_pretrained(quantized("nf4"), tmp_path / "a")
    b = make_batch(model, seq=9)
    with torch.no_grad():
        assert torch.equal(again(input_ids=b["input_ids"]).logits, rt(input_ids=b["input_ids"]).logits)
    for name, layer in again.rowtune_layers().items():
        assert torch.equal(layer.delta, rt.rowtune_layers()[name].delta)


def test_gradients_from_hooks_equal_the_weight_gradients(fresh_model):
    model = fresh_model("tiny-llama").requires_grad_(False)
    b = make_batch(model, seq=9)
    names = find_target_modules(model)
    modules = {n: model.get_submodule(n) for n in names}
    hooked: dict[str, torch.Tensor] = {}
    with _weight_grads(modules, lambda n, g: hooked.__setitem__(n, g)):
        model(**b).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # nothing of the model was made trainable
    model.requires_grad_(True)
    model(**b).loss.backward()
    for n, m in modules.items():
        assert torch.allclose(hooked[n], m.weight.grad, atol=1e-6), n


@pytest.mark.parametrize("scorer", ["taylor", "fisher", "wanda", "magnitude", "activation"])
def test_scoring_a_quantized_model_equals_scoring_its_dequantized_weights(scorer):
    model = quantized("nf4")
    ref = dequantized_copy(model)
    batches = [make_batch(model, seq=9, seed=s) for s in range(2)]
    got = score_model(model, scorer, batches=batches)
    want = score_model(ref, scorer, batches=batches)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-6), n
    n = next(iter(want))
    assert torch.equal(dense_weight(model.get_submodule(n)), ref.get_submodule(n).weight)


@pytest.mark.parametrize("scorer", ["zo-taylor", "neft"])
def test_scorers_that_change_the_weights_are_refused_on_a_quantized_model(scorer):
    model = quantized("nf4")
    with pytest.raises(NeurontuneError, match="changes the weights it scores.*quantized"):
        score_model(model, scorer, batches=[make_batch(model)])


# ---- the command line ------------------------------------------------------------------------------
TINY = ["model=tiny-llama", "train_examples=16", "eval_examples=4", "forgetting_examples=0", "batch_size=4",
        "steps=2", "quantization=nf4"]  # fmt: skip


def test_finetune_eval_merge_on_a_4bit_base(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", *TINY, "scorer=taylor", f"output_dir={out}"]) == 0
    adapter = out / "adapter"
    assert read_adapter(adapter)[0]["base_quantization"] == "nf4"  # the PEFT adapter's provenance
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert main(["eval", f"--adapter={adapter}", "eval_examples=4", "forgetting_examples=0",
                 f"output={tmp_path / 'e.json'}"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == metrics["after"]["accuracy"]
    assert main(["merge", f"--adapter={adapter}", f"--output={tmp_path / 'merged'}"]) == 0
    assert "dequantized from its nf4 base" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_qlora_through_finetune(tmp_path):
    out = tmp_path / "qlora"
    assert main(["finetune", *TINY, "method=lora", f"output_dir={out}"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["method=full"], "method=full cannot train on a quantized base"),
        (["method=gates"], "method=gates cannot train on a quantized base"),
        (["scorer=zo-taylor"], "changes the weights it scores"),
        (["impl=fused"], "impl=fused needs a dense weight"),
        (["quantization=int3"], "quantization='int3' is not one of"),
    ],
)
def test_what_cannot_run_on_a_quantized_base_is_one_error_line(tmp_path, capsys, extra, expected):
    from tests.test_faults import one_error_line

    out = tmp_path / "bad"
    assert main(["finetune", *TINY, *extra, f"output_dir={out}"]) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not (out / "config.json").exists()
