"""Row-sparse layers under mixed precision and torch.compile: every matmul in the autocast dtype, fp32
master deltas and gradients, nothing saved for backward in fp32, compiled == eager.

CPU autocast (``torch.autocast("cpu", dtype=torch.bfloat16)``) follows the same rules as CUDA autocast,
so these tests check on a CPU what ``neurontune finetune`` does on a GPU with ``precision=auto``.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neurontune import RowTuneConfig, get_rowtune_model
from neurontune.models import tiny_model
from neurontune.rowtune import RowSparseLinear

from .conftest import make_batch
from .helpers import random_spec

IMPLS = ["auto", "merged", "fused", "index_add"]
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear"}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the floating tensor arguments of every matmul-like aten op."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            dts = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.calls.append((name, dts))
        return func(*args, **(kwargs or {}))


def _fwd_bwd(model, batch, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cols", [None, 5])
def test_every_matmul_in_bf16_under_autocast(model_kind, impl, cols):
    base = tiny_model(model_kind)
    model = get_rowtune_model(base, random_spec(base, k=4, cols=cols), RowTuneConfig(impl=impl))
    model.train()
    rec = MatmulDtypes()
    with rec:
        _fwd_bwd(model, make_batch(base), autocast=True)
    assert len(rec.calls) > 10
    fp32 = [c for c in rec.calls if c[1] != {torch.bfloat16}]
    assert not fp32, f"{len(fp32)} of {len(rec.calls)} matmuls not in bf16: {fp32[:5]}"
    for layer in model.rowtune_layers().values():
        assert layer.delta.dtype == torch.float32 and layer.delta.grad.dtype == torch.float32
        assert layer.base_layer.weight.dtype == torch.float32


def test_matmul_recorder_sees_fp32():
    """The recorder above is not blind: without autocast the same model's matmuls are fp32."""
    base = tiny_model("tiny-llama")
    model = get_rowtune_model(base, random_spec(base, k=4))
    rec = MatmulDtypes()
    with rec:
        _fwd_bwd(model, make_batch(base), autocast=False)
    assert rec.calls and all(dts == {torch.float32} for _, dts in rec.calls)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_grads_match_fp32_reference(model_kind, impl):
    base = tiny_model(model_kind)
    spec = random_spec(base, k=6, cols=None)
    ref = get_rowtune_model(copy.deepcopy(base), spec, RowTuneConfig(impl="index_add"))
    amp = get_rowtune_model(base, spec, RowTuneConfig(impl=impl))
    # a non-zero delta, so that the delta's own path (not only the base) is in the gradient
    for m in (ref, amp):
        g = torch.Generator().manual_seed(1)
        for layer in m.rowtune_layers().values():
            with torch.no_grad():
                layer.delta.copy_(0.02 * torch.randn(layer.delta.shape, generator=g))
    batch = make_batch(base, batch=4, seq=16)
    loss_ref = _fwd_bwd(ref, batch, autocast=False)
    loss_amp = _fwd_bwd(amp, batch, autocast=True)
    torch.testing.assert_close(loss_amp.float(), loss_ref, rtol=2e-2, atol=0)
    g_ref = torch.cat([lyr.delta.grad.flatten() for lyr in ref.rowtune_layers().values()])
    g_amp = torch.cat([lyr.delta.grad.flatten() for lyr in amp.rowtune_layers().values()])
    # bf16 has an 8-bit mantissa: a few percent relative error over a whole backward pass
    rel = (g_amp - g_ref).norm() / g_ref.norm()
    assert rel < 0.05, f"relative gradient error {rel:.3f}"
    assert torch.nn.functional.cosine_similarity(g_amp, g_ref, dim=0) > 0.998


@pytest.mark.parametrize("impl", ["merged", "fused"])
@pytest.mark.parametrize("cols", [None, 6])
def test_backward_saves_only_the_input_in_the_compute_dtype(impl, cols):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    layer = RowSparseLinear(
        lin, rows=[1, 7, 9], cols=None if cols is None else list(range(3, 3 + cols)), impl=impl
    )
    x = torch.randn(4, 10, 32, requires_grad=True)
    params = {lin.weight.data_ptr(), layer.delta.data_ptr(), layer.rows.data_ptr()}
    if layer.cols is not None:
        params.add(layer.cols.data_ptr())
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    copies = [t for t in saved if t.data_ptr() not in params]
    assert len(copies) == 1, [(t.dtype, t.shape) for t in copies]
    (xs,) = copies
    assert xs.dtype == torch.bfloat16
    assert xs.shape == (4, 10, 32 if cols is None else cols)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.delta.grad.dtype == torch.float32


@pytest.mark.parametrize("impl", ["merged", "fused"])
def test_pure_bf16_base(impl):
    """A bf16 base without autocast computes in bf16; the delta and its gradient stay fp32."""
    base = tiny_model("tiny-llama", dtype=torch.bfloat16)
    model = get_rowtune_model(base, random_spec(base, k=4, cols=3), RowTuneConfig(impl=impl))
    rec = MatmulDtypes()
    with rec:
        _fwd_bwd(model, make_batch(base), autocast=False)
    assert all(dts == {torch.bfloat16} for _, dts in rec.calls)
    for layer in model.rowtune_layers().values():
        assert layer.delta.grad.dtype == torch.float32 and torch.isfinite(layer.delta.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_checkpointing_every_impl(impl):
    base = tiny_model("tiny-llama")
    spec = random_spec(base, k=3, cols=None)
    ref = get_rowtune_model(copy.deepcopy(base), spec, RowTuneConfig(impl=impl))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = get_rowtune_model(base, spec, RowTuneConfig(impl=impl))
    batch = make_batch(base)
    for m in (ref, ckpt):
        m.train()
        _fwd_bwd(m, batch, autocast=True)
    for (_, p), (_, q) in zip(ref.named_parameters(), ckpt.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["merged", "fused", "index_add"])
def test_compiled_equals_eager_without_graph_breaks(impl):
    torch._dynamo.reset()
    base = tiny_model("tiny-llama")
    spec = random_spec(base, k=4, cols=None)
    eager = get_rowtune_model(copy.deepcopy(base), spec, RowTuneConfig(impl=impl))
    model = get_rowtune_model(base, spec, RowTuneConfig(impl=impl))
    batch = make_batch(base)
    explain = torch._dynamo.explain(model)(**batch)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for m in (eager, compiled):
        m.train()
        _fwd_bwd(m, batch, autocast=False)
    for (n, p), (_, q) in zip(eager.named_parameters(), model.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["merged", "fused"])
def test_inductor_compiled_equals_eager(impl):
    torch._dynamo.reset()
    base = tiny_model("tiny-llama")
    spec = random_spec(base, k=4, cols=3)
    eager = get_rowtune_model(copy.deepcopy(base), spec, RowTuneConfig(impl=impl))
    model = get_rowtune_model(base, spec, RowTuneConfig(impl=impl))
    compiled = torch.compile(model)
    batch = make_batch(base)
    losses = [_fwd_bwd(m, batch, autocast=True).item() for m in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    for (n, p), (_, q) in zip(eager.named_parameters(), model.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=1e-3, msg=n)


def test_auto_rule():
    lin = torch.nn.Linear(8, 6)
    layer = RowSparseLinear(lin, rows=[0, 3], impl="auto")
    x = torch.randn(2, 8)
    assert layer.resolved_impl(x) == "fused"  # fp32 weights, fp32 compute: no weight copy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.resolved_impl(x) == "merged"  # the bf16 cast of the weight is made anyway
    bf = RowSparseLinear(torch.nn.Linear(8, 6).to(torch.bfloat16), rows=[0], impl="auto")
    assert bf.resolved_impl(x.to(torch.bfloat16)) == "fused"
    assert RowSparseLinear(torch.nn.Linear(8, 6), rows=[0], impl="fused").resolved_impl(x) == "fused"
    lin.weight.requires_grad_(True)  # a trainable base needs plain autograd
    assert layer.resolved_impl(x) == "index_add"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_rule_on_a_gpu():
    """Same rule as on a CPU (gpu_step.md: fused is fastest in pure bf16, merged under autocast)."""
    bf = RowSparseLinear(torch.nn.Linear(8, 6).cuda().to(torch.bfloat16), rows=[0], impl="auto")
    assert bf.resolved_impl(torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)) == "fused"
    fp = RowSparseLinear(torch.nn.Linear(8, 6).cuda(), rows=[0], impl="auto")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fp.resolved_impl(torch.randn(2, 8, device="cuda")) == "merged"


@pytest.mark.parametrize("cast", ["bf16", "half", "to-cpu-bf16", "double"])
def test_casting_the_model_keeps_every_delta_bit_exact(cast):
    """``model.to(bf16)`` casts the frozen base; the deltas keep fp32 and their exact values (a cast down
    and back up would round random deltas of ~1e-3 by up to ~1e-5)."""
    model = get_rowtune_model(tiny_model("tiny-llama"), random_spec(tiny_model("tiny-llama"), k=3, cols=5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.rowtune_layers().values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 1e-3)
            layer.delta.grad = torch.randn(layer.delta.shape, generator=g)
    before = {n: (m.delta.detach().clone(), m.delta.grad.clone()) for n, m in model.rowtune_layers().items()}
    order = [n for n, _ in model.named_parameters()]
    {
        "bf16": lambda: model.to(torch.bfloat16),
        "half": lambda: model.half(),
        "to-cpu-bf16": lambda: model.to("cpu", torch.bfloat16),
        "double": lambda: model.double(),
    }[cast]()
    for n, layer in model.rowtune_layers().items():
        assert layer.delta.dtype == torch.float32
        assert torch.equal(layer.delta, before[n][0]) and torch.equal(layer.delta.grad, before[n][1]), n
        assert layer.base_layer.weight.dtype != torch.float32
        assert isinstance(layer.delta, torch.nn.Parameter) and layer.delta.requires_grad
    assert [n for n, _ in model.named_parameters()] == order
