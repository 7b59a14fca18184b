"""Conformance matrix for row-sparse tuning (PEFT test_custom_models style):
tiny Llama (nn.Linear, GQA) and tiny GPT-2 (Conv1D) x rows / rows+cols / contiguous rows x every impl."""

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from neurontune import RowTuneConfig, RowTuneModel, get_rowtune_model
from neurontune.targets import get_weight

from .conftest import make_batch
from .helpers import random_spec

IMPLS = ["auto", "merged", "fused", "index_add"]
SHAPES = {
    "rows": dict(k=3, cols=None),
    "rows+cols": dict(k=4, cols=5),
    "contiguous": dict(k=4, cols=None, contiguous=True),  # rows 2..5: slices instead of gathers
}
CONFIGS = {f"{s}-{i}": dict(**SHAPES[s], impl=i) for s in SHAPES for i in IMPLS}
# fp32 outputs of merged vs unmerged models agree to float rounding of one extra add.
ATOL = 1e-5


@pytest.fixture(params=list(CONFIGS))
def setup(request, model_kind, fresh_model):
    c = CONFIGS[request.param]
    base = fresh_model(model_kind)
    spec = random_spec(base, k=c["k"], cols=c["cols"], contiguous=c.get("contiguous", False))
    return base, spec, RowTuneConfig(impl=c["impl"])


def _train(model, steps=3, lr=1e-2, weight_decay=0.1, seed=0):
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    model.train()
    for s in range(steps):
        loss = model(**make_batch(model, seed=seed + s)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def test_zero_init_is_identity(setup):
    base, spec, cfg = setup
    batch = make_batch(base)
    ref = base(**batch).logits
    model = get_rowtune_model(base, spec, cfg)
    torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)


def test_only_selected_rows_change_with_weight_decay(setup):
    base, spec, cfg = setup
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_rowtune_model(base, spec, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)
    opt = _train(model)
    # optimizer state exists only for the deltas: k x c per module, never full-size
    for p, st in opt.state.items():
        assert st["exp_avg"].shape == p.shape
        assert p.dtype == torch.float32
    n_state = sum(st["exp_avg"].numel() for st in opt.state.values())
    assert n_state == spec.num_params()
    # frozen weights are bit-identical while unmerged
    for n, p in base.named_parameters():
        if not n.endswith(".delta"):
            torch.testing.assert_close(p, before[n.replace(".base_layer", "")], rtol=0, atol=0)
    plain = model.merge_and_unload()
    for name, sel in spec.modules.items():
        w0 = get_weight(_module_like(before, name, plain))
        w1 = get_weight(plain.get_submodule(name))
        changed = w1 != w0
        mask = torch.zeros_like(changed)
        rows = torch.arange(w0.shape[0]) if sel.rows is None else torch.tensor(sel.rows)
        cols = torch.arange(w0.shape[1]) if sel.cols is None else torch.tensor(sel.cols)
        mask[rows[:, None], cols[None, :]] = True
        assert not changed[~mask].any(), f"{name}: entries outside the selection changed"
        assert changed[mask].float().mean() > 0.9, f"{name}: selected entries did not train"
    for n, p in plain.named_parameters():
        mod = n.rsplit(".", 1)[0]
        if mod not in spec.modules:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def _module_like(before, name, plain):
    """The module `name` of `plain`, with its pre-training weight."""
    mod = copy.deepcopy(plain.get_submodule(name))
    with torch.no_grad():
        mod.weight.copy_(before[f"{name}.weight"])
    return mod


def test_merge_equals_unmerged_and_unmerge_is_exact(setup):
    base, spec, cfg = setup
    w_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_rowtune_model(base, spec, cfg)
    _train(model)
    batch = make_batch(base, seed=99)
    with torch.no_grad():
        unmerged = model(**batch).logits
        model.merge()
        merged = model(**batch).logits
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=ATOL)
        model.unmerge()
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=0, atol=0)
    for n, p in model.base_model.named_parameters():
        if not n.endswith(".delta"):
            torch.testing.assert_close(p, w_before[n.replace(".base_layer", "")], rtol=0, atol=0)


def test_disable_restores_base(setup):
    base, spec, cfg = setup
    batch = make_batch(base, seed=5)
    with torch.no_grad():
        ref = base(**batch).logits.clone()
    model = get_rowtune_model(base, spec, cfg)
    _train(model)
    with torch.no_grad():
        tuned = model(**batch).logits
        assert not torch.allclose(tuned, ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
        model.merge()
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(model(**batch).logits, tuned, rtol=0, atol=ATOL)


def test_save_load_roundtrip(setup, tmp_path, fresh_model, model_kind):
    base, spec, cfg = setup
    model = get_rowtune_model(base, spec, cfg)
    _train(model)
    batch = make_batch(base, seed=3)
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = RowTuneModel.from_pretrained(fresh_model(model_kind), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)
    assert loaded.neuron_spec.to_dict()["modules"] == model.neuron_spec.to_dict()["modules"]
    assert loaded.neuron_spec.provenance == spec.provenance
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = RowTuneModel.from_pretrained(fresh_model(model_kind), tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == spec.num_params()


def test_adapter_file_is_compact(setup, tmp_path):
    base, spec, cfg = setup
    model = get_rowtune_model(base, spec, cfg)
    model.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "neurontune_adapter.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    n_idx = sum(len(s.rows or []) + len(s.cols or []) for s in spec.modules.values())
    # fp32 deltas + int32 indices, nothing else: file = 8-byte length + JSON header + payload
    assert path.stat().st_size == 8 + header_len + spec.num_params() * 4 + n_idx * 4


def test_merge_and_unload_gives_plain_model(setup, tmp_path, fresh_model, model_kind):
    base, spec, cfg = setup
    model = get_rowtune_model(base, spec, cfg)
    _train(model)
    batch = make_batch(base, seed=11)
    with torch.no_grad():
        ref = model(**batch).logits
    plain = model.merge_and_unload()
    assert type(plain) is type(fresh_model(model_kind))
    assert not any("base_layer" in n or "delta" in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path / "merged")
    reloaded = type(plain).from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_fp32_delta_finite(model_kind, fresh_model, dtype):
    base = fresh_model(model_kind, dtype=dtype)
    spec = random_spec(base, k=3, cols=4)
    model = get_rowtune_model(base, spec)
    for layer in model.rowtune_layers().values():
        assert layer.delta.dtype == torch.float32
        assert layer.base_layer.weight.dtype == dtype
        assert layer.rows.dtype == torch.long
    model.to(dtype)  # casting the model must not cast index buffers
    assert all(lyr.rows.dtype == torch.long for lyr in model.rowtune_layers().values())
    _train(model, steps=2, lr=1e-3)
    with torch.no_grad():
        out = model(**make_batch(base)).logits
    assert torch.isfinite(out).all()
    assert all(
        torch.isfinite(lyr.delta).all() and lyr.delta.abs().sum() > 0
        for lyr in model.rowtune_layers().values()
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_matches_full_finetune_first_step(model_kind, fresh_model, impl):
    """Selecting every row of every linear gives the same first step as full fine-tuning of those linears."""
    full = fresh_model(model_kind)
    sparse_base = fresh_model(model_kind)
    spec = random_spec(sparse_base, all_rows=True)
    for p in full.parameters():
        p.requires_grad_(False)
    full_params = [full.get_submodule(n).weight for n in spec.modules]
    for p in full_params:
        p.requires_grad_(True)
    model = get_rowtune_model(sparse_base, spec, RowTuneConfig(impl=impl))
    lr = 1e-3
    opt_full = torch.optim.AdamW(full_params, lr=lr, weight_decay=0.0)
    opt_rows = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    batch = make_batch(full, seed=1)
    for m, opt in ((full, opt_full), (model, opt_rows)):
        m.train()
        loss = m(**batch).loss
        loss.backward()
        opt.step()
    # gradients agree entry by entry (Conv1D weights are stored transposed)
    for name in spec.modules:
        g_full = full.get_submodule(name).weight.grad
        if isinstance(full.get_submodule(name), Conv1D):
            g_full = g_full.t()
        torch.testing.assert_close(
            model.base_model.get_submodule(name).delta.grad, g_full, rtol=1e-4, atol=1e-6
        )
    plain = model.merge_and_unload()
    for name in spec.modules:
        torch.testing.assert_close(
            plain.get_submodule(name).weight, full.get_submodule(name).weight, rtol=0, atol=1e-6
        )


def test_impls_agree(model_kind, fresh_model):
    results = []
    for impl in IMPLS:
        base = fresh_model(model_kind)
        model = get_rowtune_model(base, random_spec(base, k=5, cols=6), RowTuneConfig(impl=impl))
        _train(model, steps=3)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_compatible(fresh_model):
    base = fresh_model("tiny-llama")
    spec = random_spec(base, k=3)
    ref_model = get_rowtune_model(copy.deepcopy(base), spec)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_rowtune_model(base, spec)
    batch = make_batch(base)
    for m in (ref_model, model):
        m.train()
        m(**batch).loss.backward()
    for (_n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
