"""Bad input gets a clear NeurontuneError naming the problem, never a deep torch traceback."""

import json

import pytest

from neurontune import (
    AdapterError,
    NeuronSpec,
    NeurontuneError,
    RowTuneModel,
    SpecError,
    TargetError,
    find_target_modules,
    get_rowtune_model,
)

from .helpers import random_spec


def test_unknown_target_module(fresh_model):
    m = fresh_model("tiny-llama")
    with pytest.raises(TargetError, match=r"'qkv_proj' matches no linear layer.*q_proj"):
        find_target_modules(m, ["q_proj", "qkv_proj"])
    with pytest.raises(TargetError, match="selected no linear layer"):
        find_target_modules(m, r".*nothing_here")
    with pytest.raises(TargetError, match="regex"):
        find_target_modules(m, "([")


def test_target_selection(fresh_model):
    llama = fresh_model("tiny-llama")
    names = find_target_modules(llama)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert find_target_modules(llama, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert find_target_modules(llama, r".*layers\.1\.mlp\..*") == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert len(find_target_modules(llama, "all-linear", exclude_modules=["down_proj"])) == 12
    gpt2 = fresh_model("tiny-gpt2")
    assert sorted({n.split(".")[-1] for n in find_target_modules(gpt2)}) == ["c_attn", "c_fc", "c_proj"]


def test_spec_module_not_in_model(fresh_model):
    m = fresh_model("tiny-llama")
    with pytest.raises(SpecError, match="model.layers.7.mlp.up_proj.*does not have"):
        get_rowtune_model(m, NeuronSpec({"model.layers.7.mlp.up_proj": [1]}))
    with pytest.raises(SpecError, match="not a linear layer"):
        get_rowtune_model(m, NeuronSpec({"model.layers.0.input_layernorm": [1]}))


def test_index_out_of_range(fresh_model):
    m = fresh_model("tiny-llama")
    with pytest.raises(SpecError, match=r"row index 64 out of range \[0, 64\)"):
        get_rowtune_model(m, NeuronSpec({"model.layers.0.mlp.up_proj": [3, 64]}))
    with pytest.raises(SpecError, match="row index -1 out of range"):
        NeuronSpec({"model.layers.0.mlp.up_proj": [-1]})
    with pytest.raises(SpecError, match=r"column index 40 out of range \[0, 32\)"):
        get_rowtune_model(m, NeuronSpec({"model.layers.0.mlp.up_proj": {"rows": [1], "cols": [40]}}))


def test_duplicated_and_malformed_indices():
    with pytest.raises(SpecError, match=r"duplicated row indices \[3\]"):
        NeuronSpec({"a.b": [3, 1, 3]})
    with pytest.raises(SpecError, match="not an integer"):
        NeuronSpec({"a.b": [1.5]})
    with pytest.raises(SpecError, match="empty row selection"):
        NeuronSpec({"a.b": []})
    with pytest.raises(SpecError, match="unknown keys"):
        NeuronSpec({"a.b": {"rows": [1], "colums": [2]}})


def test_spec_shape_mismatch(fresh_model):
    m = fresh_model("tiny-llama")
    with pytest.raises(SpecError, match=r"made for shape \(128, 32\).*has shape \(64, 32\)"):
        get_rowtune_model(m, NeuronSpec({"model.layers.0.mlp.up_proj": {"rows": [1], "shape": [128, 32]}}))


def test_spec_json_roundtrip_and_bad_file(tmp_path, fresh_model):
    m = fresh_model("tiny-llama")
    spec = random_spec(m, k=2, cols=3)
    spec.save(tmp_path / "s.json")
    assert NeuronSpec.load(tmp_path / "s.json").to_dict() == spec.to_dict()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NeurontuneError, match="not valid JSON"):
        NeuronSpec.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SpecError, match="no 'modules' key"):
        NeuronSpec.load(tmp_path / "other.json")


def test_double_wrap_refused(fresh_model):
    m = fresh_model("tiny-llama")
    spec = random_spec(m, k=2)
    get_rowtune_model(m, spec)
    with pytest.raises(SpecError, match="already wrapped"):
        get_rowtune_model(m, spec)


@pytest.fixture
def saved_adapter(tmp_path, fresh_model):
    m = fresh_model("tiny-llama")
    get_rowtune_model(m, random_spec(m, k=2)).save_pretrained(tmp_path / "ad")
    return tmp_path / "ad"


def test_adapter_of_another_model(saved_adapter, fresh_model):
    with pytest.raises(AdapterError, match="does not fit this model.*GPT2LMHeadModel"):
        RowTuneModel.from_pretrained(fresh_model("tiny-gpt2"), saved_adapter)


def test_adapter_of_model_with_other_shapes(saved_adapter):
    from transformers import AutoModelForCausalLM

    from neurontune.models import tiny_model

    cfg = tiny_model("tiny-llama").config
    cfg.intermediate_size = 48
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(AdapterError, match=r"shape \(64, 32\).*shape \(48, 32\)"):
        RowTuneModel.from_pretrained(other, saved_adapter)


def test_missing_adapter(tmp_path, fresh_model):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no neurontune_adapter.json; not a neurontune row adapter"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), tmp_path / "empty")


def test_corrupted_adapter_weights(saved_adapter, fresh_model):
    f = saved_adapter / "neurontune_adapter.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(AdapterError, match="corrupted or not a safetensors file"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), saved_adapter)
    f.unlink()
    with pytest.raises(AdapterError, match="adapter weights not found"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), saved_adapter)


def test_corrupted_adapter_config(saved_adapter, fresh_model):
    c = saved_adapter / "neurontune_adapter.json"
    c.write_text(c.read_text()[:50])
    with pytest.raises(AdapterError, match="not valid JSON"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), saved_adapter)
    c.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterError, match="not a neurontune row adapter.*PEFT adapter"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), saved_adapter)


def test_adapter_tensor_tampering(saved_adapter, fresh_model):
    from safetensors.torch import load_file, save_file

    f = saved_adapter / "neurontune_adapter.safetensors"
    t = load_file(f)
    name = next(k for k in t if k.endswith(".rows"))
    t[name] = t[name].float()
    save_file(t, f)
    with pytest.raises(AdapterError, match="must be an integer tensor"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), saved_adapter)
    t[name] = t[name].int()
    del t[name.replace(".rows", ".delta")]
    save_file(t, f)
    with pytest.raises(AdapterError, match="missing from neurontune_adapter.safetensors"):
        RowTuneModel.from_pretrained(fresh_model("tiny-llama"), saved_adapter)


def test_failed_save_keeps_previous_adapter(saved_adapter, fresh_model, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved_adapter.iterdir()}
    m = fresh_model("tiny-llama")
    model = get_rowtune_model(m, random_spec(m, k=5, seed=1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("neurontune.rowtune.model.write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved_adapter)
    assert {p.name: p.read_bytes() for p in saved_adapter.iterdir()} == before
    assert [p.name for p in saved_adapter.parent.iterdir()] == ["ad"]  # no temp dirs left behind


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    import stat

    from neurontune.io import atomic_path

    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    (tmp_path / "b.txt").write_text("x")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt")


def test_tied_output_head_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from neurontune import NeuronSpec
    from neurontune.errors import TargetError

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    spec = NeuronSpec({"lm_head": {"rows": [0, 1], "cols": None, "shape": [64, 16]}}, {})
    with pytest.raises(TargetError, match=r"lm_head shares its weight with model.embed_tokens.weight \(tied"):
        get_rowtune_model(model, spec)
