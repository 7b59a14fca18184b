"""Row-sparse tuning as a registered PEFT method: get_peft_model, save/load, AutoPeftModel, adapters, TRL."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import neurontune
from neurontune import RowTuneConfig, get_rowtune_model, select_rows
from neurontune.errors import AdapterError, NeurontuneError, TargetError
from neurontune.export import export
from neurontune.models import tiny_model
from neurontune.rowtune.tuner import RowTuneLayer
from neurontune.scoring import score_model
from neurontune.selection import select
from tests.conftest import make_batch
from tests.helpers import random_spec

IDS = torch.tensor([[5, 9, 17, 33, 2, 8, 40]])


def _train(model, steps=3, lr=1e-2, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for i in range(steps):
        batch = make_batch(model, seed=seed + i)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _saved_base(tmp_path, kind="tiny-llama"):
    from neurontune.models import tiny_tokenizer

    base = tmp_path / "base"
    tiny_model(kind).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base)


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["ROWTUNE"] is RowTuneConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ROWTUNE"] is neurontune.RowTuneTuner
    assert RowTuneConfig(rows={}).peft_type == "ROWTUNE"


def test_trains_only_the_selected_rows_and_saves_only_deltas_and_indices(tmp_path, model_kind):
    model = tiny_model(model_kind)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = random_spec(model, k=3, cols=5 if model_kind == "tiny-gpt2" else None)
    before = _logits(model)
    pm = get_peft_model(model, RowTuneConfig(task_type="CAUSAL_LM", rows=spec))
    torch.testing.assert_close(_logits(pm), before, rtol=0, atol=0)  # zero deltas: the base function
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".rowtune_delta.default" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == spec.num_params()
    _train(pm)
    trained = _logits(pm)
    assert (trained - before).abs().max() > 1e-4
    for n, p in pm.get_base_model().named_parameters():  # the base is untouched
        if "rowtune_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    with pm.disable_adapter():
        torch.testing.assert_close(_logits(pm), before, rtol=0, atol=0)

    pm.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    expected = {
        f"base_model.model.{n}.rowtune_{what}" for n, s in spec.modules.items() for what in ("delta", "rows")
    }
    expected |= {f"base_model.model.{n}.rowtune_cols" for n, s in spec.modules.items() if s.cols is not None}
    assert keys == expected
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert weights.stat().st_size < payload + 200 * len(keys)  # the tensors and a header, nothing else
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ROWTUNE" and cfg["rows"] is None  # the indices are in the weights file
    assert cfg["modules"][next(iter(spec.modules))]["rows"] == 3

    loaded = PeftModel.from_pretrained(tiny_model(model_kind), tmp_path / "a")
    torch.testing.assert_close(_logits(loaded), trained, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, RowTuneLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), trained, rtol=0, atol=1e-5)


def test_same_function_as_the_row_engine(model_kind):
    """The PEFT layer and RowSparseLinear compute the same thing for the same spec and deltas."""
    spec = random_spec(tiny_model(model_kind), k=4, cols=6, seed=3)
    old = get_rowtune_model(tiny_model(model_kind), spec)
    pm = get_peft_model(tiny_model(model_kind), RowTuneConfig(rows=spec))
    with torch.no_grad():
        for name, layer in old.rowtune_layers().items():
            layer.delta.normal_(0, 0.05)
            pm.get_base_model().get_submodule(name).rowtune_delta["default"].copy_(layer.delta)
    torch.testing.assert_close(_logits(pm), _logits(old), rtol=0, atol=1e-6)


def test_fresh_process_auto_peft_model_gives_identical_logits(tmp_path):
    """In a new process that imports neurontune before PEFT (the registration waits for PEFT's import)."""
    model = _saved_base(tmp_path)
    pm = get_peft_model(model, RowTuneConfig(task_type="CAUSAL_LM", init_rows="magnitude", budget="rows:2"))
    _train(pm)
    pm.save_pretrained(tmp_path / "adapter")
    torch.save(_logits(pm), tmp_path / "expected.pt")  # a tensor of our own, read back by this test
    code = (
        "import sys, torch, neurontune\n"
        "assert 'peft' not in sys.modules\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})\n"
        f"with torch.no_grad(): logits = m(input_ids=torch.tensor({IDS.tolist()})).logits\n"
        f"torch.save(logits, {str(tmp_path / 'got.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    torch.testing.assert_close(got, torch.load(tmp_path / "expected.pt", weights_only=True), rtol=0, atol=0)


@pytest.mark.slow
def test_fresh_process_peft_imported_first(tmp_path):
    model = _saved_base(tmp_path)
    pm = get_peft_model(model, RowTuneConfig(task_type="CAUSAL_LM", init_rows="random", budget="rows:2"))
    _train(pm)
    pm.save_pretrained(tmp_path / "adapter")
    code = (
        "import torch\nfrom peft import AutoPeftModelForCausalLM\nimport neurontune\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})\n"
        f"with torch.no_grad(): logits = m(input_ids=torch.tensor({IDS.tolist()})).logits\n"
        f"torch.save(logits, {str(tmp_path / 'got.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    torch.testing.assert_close(
        torch.load(tmp_path / "got.pt", weights_only=True), _logits(pm), rtol=0, atol=0
    )


def test_named_adapters_switch_train_and_save_separately(tmp_path):
    model = tiny_model("tiny-llama")
    before = _logits(model)
    pm = get_peft_model(model, RowTuneConfig(rows=random_spec(model, k=2, seed=0)))
    pm.add_adapter("other", RowTuneConfig(init_rows="random", budget="rows:3", seed=1))
    assert pm.active_adapters == ["default"]
    grads = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert grads and all(n.endswith(".default") for n in grads)
    _train(pm)
    a = _logits(pm)
    pm.set_adapter("other")
    assert all(n.endswith(".other") for n, p in pm.named_parameters() if p.requires_grad)
    torch.testing.assert_close(_logits(pm), before, rtol=0, atol=0)  # "other" is untrained
    _train(pm, seed=5)
    b = _logits(pm)
    assert (a - b).abs().max() > 1e-4
    pm.set_adapter("default")
    torch.testing.assert_close(_logits(pm), a, rtol=0, atol=0)
    pm.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path / "both")
    loaded.load_adapter(tmp_path / "both" / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(_logits(loaded), b, rtol=0, atol=0)
    pm.delete_adapter("other")
    assert not any("other" in n for n, _ in pm.named_parameters())


def test_merge_unmerge_is_exact_and_bf16_cast_keeps_deltas():
    model = tiny_model("tiny-llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = get_peft_model(model, RowTuneConfig(rows=random_spec(model, k=3)))
    _train(pm)
    expected = _logits(pm)
    pm.merge_adapter()
    torch.testing.assert_close(_logits(pm), expected, rtol=0, atol=1e-5)
    pm.unmerge_adapter()
    for n, p in pm.get_base_model().named_parameters():
        if "rowtune_" not in n:
            assert torch.equal(p, w0[n.replace(".base_layer", "")]), n
    deltas = {n: p.detach().clone() for n, p in pm.named_parameters() if "rowtune_delta" in n}
    pm.to(torch.bfloat16)
    for n, p in pm.named_parameters():
        if "rowtune_delta" in n:
            assert p.dtype == torch.float32 and torch.equal(p, deltas[n]), n
        else:
            assert p.dtype == torch.bfloat16, n


def test_select_rows_with_a_data_scorer_matches_the_selection_api():
    model = tiny_model("tiny-llama")
    batches = [make_batch(model, seed=i) for i in range(2)]
    config = select_rows(model, RowTuneConfig(init_rows="taylor", budget="lora:2"), batches)
    want = select(model, score_model(model, "taylor", batches=batches), match_lora_rank=2)
    pm = get_peft_model(model, config)
    for name, sel in want.modules.items():
        layer = pm.get_base_model().get_submodule(name)
        assert layer.rowtune_rows["default"].tolist() == sel.rows, name
    assert set(config.modules) == set(want.modules)


def test_bad_configs_get_one_clear_error():
    with pytest.raises(NeurontuneError, match="no selection"):
        get_peft_model(tiny_model("tiny-llama"), RowTuneConfig())
    with pytest.raises(NeurontuneError, match="select_rows"):
        get_peft_model(tiny_model("tiny-llama"), RowTuneConfig(init_rows="taylor"))
    with pytest.raises(TargetError, match="does not have"):
        get_peft_model(tiny_model("tiny-llama"), RowTuneConfig(rows={"model.layers.9.mlp.up_proj": [1]}))
    with pytest.raises(NeurontuneError, match="budget"):
        RowTuneConfig(init_rows="magnitude", budget="lora:x")
    with pytest.raises(NeurontuneError, match="unknown scorer|scorer"):
        RowTuneConfig(init_rows="magnitud")
    with pytest.raises(NeurontuneError, match="impl"):
        RowTuneConfig(impl="fast")


def test_a_config_without_its_weights_refuses_to_run(tmp_path):
    """adapter_config.json alone has no indices: the placeholders are refused, not used as rows 0, 0, ..."""
    pm = get_peft_model(tiny_model("tiny-llama"), RowTuneConfig(init_rows="magnitude", budget="rows:2"))
    pm.save_pretrained(tmp_path / "a")
    config = RowTuneConfig.from_pretrained(tmp_path / "a")
    bare = get_peft_model(tiny_model("tiny-llama"), config)
    with pytest.raises(AdapterError, match="indices were never loaded"):
        _logits(bare)


def test_autocast_forward_matches_the_row_engine():
    """Under bf16 autocast on fp32 weights the forward matches RowSparseLinear's (impl auto: merged)."""
    spec = random_spec(tiny_model("tiny-llama"), k=3)
    old = get_rowtune_model(tiny_model("tiny-llama"), spec)
    pm = get_peft_model(tiny_model("tiny-llama"), RowTuneConfig(rows=spec))
    with torch.no_grad():
        for name, layer in old.rowtune_layers().items():
            layer.delta.normal_(0, 0.05)
            pm.get_base_model().get_submodule(name).rowtune_delta["default"].copy_(layer.delta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(_logits(pm), _logits(old), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["merged", "fused", "index_add"])
def test_compiles_without_graph_breaks(impl):
    """Nothing in the forward syncs with the host or reads data pointers: dynamo traces it whole,
    after a save/load round trip too (the spans are refreshed when the indices are loaded)."""
    torch._dynamo.reset()
    base = tiny_model("tiny-llama")
    pm = get_peft_model(
        base, RowTuneConfig(rows=random_spec(base, k=4, contiguous=impl == "fused"), impl=impl)
    )
    batch = make_batch(base)
    explain = torch._dynamo.explain(pm)(**batch)
    assert explain.graph_break_count == 0, explain.break_reasons


def _sft(tmp_path, base_dir, out, steps, resume=None):
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = Dataset.from_list([{"prompt": f"Q: {i}+1?\nA:", "completion": f" {i + 1}"} for i in range(32)])
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, max_length=32, bf16=False, logging_steps=1, seed=0, data_seed=0,
    )  # fmt: skip
    config = RowTuneConfig(task_type="CAUSAL_LM", init_rows="magnitude", budget="rows:2")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=config
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_sft_trainer_with_peft_config_checkpoints_the_adapter_and_resumes_exactly(tmp_path):
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    from neurontune.models import tiny_tokenizer

    tok = tiny_tokenizer()
    # larger than tiny-llama, so that 5 % of it is more than a checkpoint's files
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=len(tok) - 3,
                    eos_token_id=len(tok) - 2, bos_token_id=len(tok) - 2, tie_word_embeddings=False)
    ).save_pretrained(base_dir)  # fmt: skip
    tok.save_pretrained(base_dir)
    base_bytes = (base_dir / "model.safetensors").stat().st_size

    full = _sft(tmp_path, base_dir, tmp_path / "a", 4)
    pm = full.model
    assert isinstance(pm, PeftModel)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("rowtune_delta" in n for n in trainable)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        files = list((tmp_path / "a" / ckpt).iterdir())
        assert (tmp_path / "a" / ckpt / "adapter_model.safetensors") in files
        assert not any(f.name.startswith("model") for f in files), files
        assert sum(f.stat().st_size for f in files if f.is_file()) < 0.05 * base_bytes

    import shutil

    _sft(tmp_path, base_dir, tmp_path / "b", 4)
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")  # as if killed after checkpoint-2 ...
    resumed = _sft(tmp_path, base_dir, tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    a = dict(pm.named_parameters())
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=0, atol=0, msg=n)  # ... continues exactly

    from peft import AutoPeftModelForCausalLM

    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-4")
    torch.testing.assert_close(_logits(loaded), _logits(pm), rtol=0, atol=0)


LEGACY = Path(__file__).parent / "data" / "legacy_row_adapter"


def _legacy_reference_logits():
    """The committed legacy adapter's function, computed by hand: each delta added into its block."""
    from safetensors.torch import load_file

    model = tiny_model("tiny-llama", seed=0)
    tensors = load_file(LEGACY / "neurontune_adapter.safetensors")
    cfg = json.loads((LEGACY / "neurontune_adapter.json").read_text())
    with torch.no_grad():
        for name in cfg["modules"]:
            w = model.get_submodule(name).weight
            rows = tensors.get(f"{name}.rows", torch.arange(w.shape[0])).long()
            cols = tensors.get(f"{name}.cols", torch.arange(w.shape[1])).long()
            w[rows[:, None], cols[None, :]] += tensors[f"{name}.delta"]
    return _logits(model)


def test_committed_legacy_adapter_still_loads(tmp_path):
    from neurontune.methods import load_output

    expected = _legacy_reference_logits()
    model, _, kind = load_output(LEGACY, None, "float32")
    assert kind == "rows"
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)


def test_legacy_adapter_converts_to_the_peft_format_exactly(tmp_path, capsys):
    from neurontune.cli import main
    from neurontune.methods import load_output

    expected = _legacy_reference_logits()
    out = tmp_path / "peft"
    assert main(["export", "--adapter", str(LEGACY), "--to", "peft-rowtune", "--output", str(out)]) == 0
    assert '"max_abs_logit_diff": 0.0' in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_model("tiny-llama", seed=0), out)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-5)
    model, _, kind = load_output(out, None, "float32")  # the CLI's loader takes it too
    assert kind == "rows" and isinstance(model, PeftModel)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)
    with pytest.raises(NeurontuneError, match="PEFT format already"):
        export(
            str(out), "peft-rowtune", str(tmp_path / "again"), per_module_rank=False, check=False, model=None
        )


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_on_a_quantized_base_trains_and_merges_dequantized(kind, tmp_path):
    """QLoRA-style: a bitsandbytes base computes through its own kernels, the deltas train in fp32, and
    merge_and_unload gives a plain model holding dequant(W) + D (what was trained)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from neurontune.models import load_model, model_quantization
    from neurontune.targets import is_quantized

    model = load_model("tiny-llama", quantization=kind)[0]
    pm = get_peft_model(model, RowTuneConfig(rows=random_spec(model, k=3, seed=2)))
    assert pm.peft_config["default"].provenance["base_quantization"] == kind
    _train(pm, lr=5e-2)
    trained = _logits(pm)
    with pm.disable_adapter():
        assert (trained - _logits(pm)).abs().max() > 1e-3
    with pytest.raises(NeurontuneError, match="cannot be merged into the quantized"):
        pm.merge_adapter()
    merged = pm.merge_and_unload()
    assert not any(is_quantized(m) for m in merged.modules() if hasattr(m, "weight"))
    assert model_quantization(merged) == "none"
    tol = 0.05 if kind == "int8" else 1e-4  # int8's forward quantizes the activations, the merged one not
    assert (_logits(merged) - trained).abs().max() < tol
    merged.save_pretrained(tmp_path / "m")
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), _logits(merged), rtol=0, atol=0
    )
