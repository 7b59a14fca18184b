r"""Row-sparse linear layer: only selected output rows (optionally only selected input columns) train.

SPruFT-style parameterisation (Li & Bhaskara, arXiv 2502.11439), initialised at zero::

    y = W x + b                      frozen base (any dtype, never copied in place)
    y[..., rows] += D x[..., cols]   D: (k, c) fp32 trainable delta, k = |rows|, c = |cols|

    merge:  W[rows, cols] += D       (the original block is kept, so unmerge is exact)

Gradients and optimizer state exist only for the k x c entries of D; the frozen weight has
``requires_grad=False`` and gets no gradient, so weight decay cannot touch unselected rows.

**Precision.** Every matmul runs in the *compute dtype*: the autocast dtype when autocast is on for
the input's device (``torch.autocast("cuda"|"cpu", dtype=torch.bfloat16)``, what accelerate's
``mixed_precision="bf16"`` uses), else the input's dtype. The master delta and its gradient stay in
``delta_dtype`` (fp32); no activation or weight is ever cast *up* to fp32. Backward keeps only the
input in the compute dtype (just its selected columns in column mode) plus references to the frozen
weight and the delta: a half-precision copy of the weight is recomputed in backward, never stored.

**Formulations** (``impl``), all the same math:

- ``"merged"``: one GEMM per call with the effective weight ``W' = W; W'[rows, cols] += D``, built in
  the compute dtype for the call and rebuilt in backward (never stored). Backward:
  ``dx = dy W'`` (one GEMM) and ``dD = dy[..., rows]^T x[..., cols]`` (a k-row GEMM). Costs one
  weight-sized copy per call; under fp32-weights + autocast that copy is the cast autocast makes anyway.
  In half precision the delta's effect is rounded into ``W'`` as it will be in the merged model.
- ``"fused"``: the base GEMM plus a k-row delta GEMM added into the output rows in place (``narrow``
  when the rows are a contiguous range, ``index_add_`` otherwise); backward ``dx = dy W +
  scatter(dy[..., rows] D)``. No weight-sized temporary in pure bf16/fp32.
- ``"index_add"``: plain autograd (``y.index_add(-1, rows, x D^T)``); the reference, and the only one
  that works when the base weight itself is trainable.
- ``"auto"`` (default): the rule below; ``index_add`` whenever the base is trainable or quantized.

**Quantized bases** (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, ``quantization=nf4|fp4|int8``): the
base output comes from the layer's own forward (its 4-bit/8-bit kernels, as QLoRA's LoRA does), the
delta is added into the selected rows (``index_add``), and backward gives ``dx`` through the
quantized layer's own backward. ``merged`` and ``fused`` need a dense weight and are refused. A
quantized layer cannot take a delta in place: :meth:`RowSparseLinear.merge` refuses, and
:meth:`RowSparseLinear.dequantized` returns a plain ``nn.Linear`` holding ``dequant(W) + D`` (what
``merge_and_unload`` writes), which computes what was trained.

**The auto rule, and the measurements behind it** (``benchmarks/gpu_step.py``; results in
``benchmarks/results/gpu_step.md`` on a GPU, ``gpu_step_cpu.md`` on a CPU):

``merged`` when the weight has to be cast to the compute dtype anyway (fp32 weights under bf16
autocast: the effective weight *is* that cast), else ``fused`` (a pure-bf16 or fp32 model, where
``merged`` adds a weight-sized copy per call), on a GPU and on a CPU alike.

- GPU, measured on an H100 80GB (torch 2.11, CUDA 13; ``gpu_step.md``; rank-16 budget, one repeat of
  the median of 10 steps by CUDA events; step time relative to PEFT LoRA's):

  ==================================  ======  ======  =========
  shape, precision, checkpointing     merged  fused   index_add
  ==================================  ======  ======  =========
  Llama-3.2-1B 4x1024, bf16           0.82x   0.70x   0.70x
  Llama-3.2-1B, bf16, checkpointing   0.86x   0.77x   0.87x
  Llama-3.2-1B, fp32 + autocast       0.72x   0.85x   0.74x
  Llama-3.2-1B, autocast, ckpt        0.96x   0.99x   0.94x
  Llama-3-8B 2x1024, bf16             0.74x   0.63x   0.65x
  Llama-3-8B, fp32 + autocast         0.79x   0.78x   0.78x
  ==================================  ======  ======  =========

  In pure bf16 ``fused`` wins clearly (``merged`` pays for its weight copy); under autocast
  ``merged`` wins on the 1B shape and ties on 8B. (An earlier rule took ``merged`` on every GPU,
  from a prototype in issue #10; this table replaced it.)
- CPU, measured on 2 cores (``gpu_step_cpu.md``, SmolLM2-135M shape, batch 4x128, rank-16 budget):

  ============================  ======  ======  =========
  precision, checkpointing      merged  fused   index_add
  ============================  ======  ======  =========
  fp32                          0.98x   0.95x   0.98x
  fp32, gradient checkpointing  0.87x   0.89x   0.91x
  bf16 autocast                 0.90x   1.00x   0.94x
  bf16 autocast, checkpointing  0.85x   0.94x   0.94x
  ============================  ======  ======  =========

  In fp32 the two are within noise of each other; under autocast ``merged`` is clearly ahead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neurontune.choices import IMPLS
from neurontune.targets import as_out_in, dense_weight, get_weight, is_quantized, linear_shape

Impl = Literal["auto", "merged", "fused", "index_add"]

Span = tuple[int, int] | None  # (start, stop) when the indices are a contiguous range, else None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls of a call with input ``x`` run in: autocast's if enabled, else ``x``'s."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _span(idx: torch.Tensor | None) -> Span:
    """``(start, stop)`` if ``idx`` is ``start, start+1, ..., stop-1``, else ``None``."""
    if idx is None or idx.numel() == 0:
        return None
    start = int(idx[0])
    if torch.equal(idx.cpu(), torch.arange(start, start + idx.numel())):
        return start, start + idx.numel()
    return None


def _take(t: torch.Tensor, idx: torch.Tensor | None, span: Span) -> torch.Tensor:
    """``t[..., idx]``: a view when ``idx`` is a contiguous range."""
    if idx is None:
        return t
    if span is not None:
        return t.narrow(-1, span[0], span[1] - span[0])
    return t.index_select(-1, idx)


def _add_into(t: torch.Tensor, idx: torch.Tensor | None, span: Span, value: torch.Tensor) -> None:
    """``t[..., idx] += value`` in place."""
    if idx is None:
        t.add_(value)
    elif span is not None:
        t.narrow(-1, span[0], span[1] - span[0]).add_(value)
    else:
        t.index_add_(-1, idx, value)


def get_block(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``w[rows][:, cols]`` (a copy unless both are ``None``)."""
    block = w if rows is None else w.index_select(0, rows)
    return block if cols is None else block.index_select(1, cols)


def put_block(
    w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, value: torch.Tensor
) -> None:
    """``w[rows][:, cols] = value`` in place."""
    value = value.to(w.dtype)
    if rows is None and cols is None:
        w.copy_(value)
    elif cols is None:
        w.index_copy_(0, rows, value)
    elif rows is None:
        w.index_copy_(1, cols, value)
    else:
        w[rows[:, None], cols[None, :]] = value


def effective_weight(
    weight: torch.Tensor,
    delta: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A new tensor ``W`` in ``dtype`` with ``W[rows, cols] = (weight[rows, cols] + delta)``, the sum in
    ``delta``'s dtype and rounded once."""
    w = weight.to(dtype, copy=True)
    put_block(w, rows, cols, get_block(weight, rows, cols).to(delta.dtype) + delta)
    return w


@torch.no_grad()
def dequantized_linear(
    base: nn.Module,
    blocks: list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``dequant(W)`` of a (quantized) ``base`` with each ``(rows, cols,
    delta)`` added in fp32, in ``dtype`` (default: the base's compute dtype), frozen."""
    dtype = dtype or getattr(base, "compute_dtype", None) or torch.float32
    w = dense_weight(base, torch.float32)
    for rows, cols, delta in blocks:
        put_block(w, rows, cols, get_block(w, rows, cols) + delta.float())
    layer = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None)
    layer = layer.to(device=w.device, dtype=dtype)
    layer.weight.copy_(w)
    if base.bias is not None:
        layer.bias.copy_(base.bias)
    return layer.requires_grad_(False)


def resolve_impl(impl: str, base_layer: nn.Module, quantized: bool, x: torch.Tensor) -> str:
    """The formulation a forward with input ``x`` uses, ``auto`` resolved by the rule of the module
    docstring; ``index_add`` whenever the base is quantized or trainable."""
    weight, bias = base_layer.weight, base_layer.bias
    if quantized or weight.requires_grad or (bias is not None and bias.requires_grad):
        return "index_add"
    if impl != "auto":
        return impl
    return "merged" if weight.dtype != compute_dtype(x) else "fused"


def add_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
) -> torch.Tensor:
    """``index_add``: ``y`` (the base output) with ``delta x[..., cols]`` added into ``rows``, in the
    compute dtype, by plain autograd."""
    xs = x if cols is None else x.index_select(-1, cols)
    cd = compute_dtype(x)
    d = F.linear(xs.to(cd), delta.to(cd)).to(y.dtype)
    return y + d if rows is None else y.index_add(-1, rows, d)


@torch.no_grad()
def follow_device(p: nn.Parameter, fn) -> None:
    """Move ``p`` (and its gradient) to the device that ``Module._apply``'s ``fn`` sends a tensor of
    ``p``'s dtype to, keeping its dtype and values: how the row deltas take part in ``.to()``."""
    target = fn(torch.empty(0, dtype=p.dtype, device=p.device)).device
    if target != p.device:
        p.data = p.data.to(target)
        if p.grad is not None:
            p.grad = p.grad.to(target)


class _FusedRowLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` with ``D x[..., cols]`` added into output rows ``rows``; W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, cols, row_span, col_span):
        cd = compute_dtype(x)
        xc = x.to(cd)
        y = F.linear(xc, weight.to(cd), None if bias is None else bias.to(cd))
        xs = _take(xc, cols, col_span)
        _add_into(y, rows, row_span, F.linear(xs, delta.to(cd)))
        ctx.save_for_backward(xs, weight, delta, rows, cols)
        ctx.meta = (cd, x.dtype, row_span, col_span)
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, weight, delta, rows, cols = ctx.saved_tensors
        cd, x_dtype, row_span, col_span = ctx.meta
        gy = gy.to(cd)
        gys = _take(gy, rows, row_span)
        gx = gdelta = None
        if ctx.needs_input_grad[0]:
            gx = gy @ weight.to(cd)
            _add_into(gx, cols, col_span, gys @ delta.to(cd))
            gx = gx.to(x_dtype)
        if ctx.needs_input_grad[3]:
            gdelta = _delta_grad(gys, xs, delta)
        return gx, None, None, gdelta, None, None, None, None


class _MergedRowLinear(torch.autograd.Function):
    """``F.linear(x, W', b)`` with the effective weight ``W'`` (delta folded in) rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, cols, row_span, col_span):
        cd = compute_dtype(x)
        xc = x.to(cd)
        y = F.linear(
            xc, effective_weight(weight, delta, rows, cols, cd), None if bias is None else bias.to(cd)
        )
        ctx.save_for_backward(_take(xc, cols, col_span), weight, delta, rows, cols)
        ctx.meta = (cd, x.dtype, row_span, col_span)
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, weight, delta, rows, cols = ctx.saved_tensors
        cd, x_dtype, row_span, _ = ctx.meta
        gy = gy.to(cd)
        gx = gdelta = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ effective_weight(weight, delta, rows, cols, cd)).to(x_dtype)
        if ctx.needs_input_grad[3]:
            gdelta = _delta_grad(_take(gy, rows, row_span), xs, delta)
        return gx, None, None, gdelta, None, None, None, None


def _delta_grad(gys: torch.Tensor, xs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``dD = dy[..., rows]^T x[..., cols]`` over all leading dims, in the compute dtype, returned in
    the delta's dtype."""
    k, c = delta.shape
    return (gys.reshape(-1, k).t() @ xs.reshape(-1, c)).to(delta.dtype)


_FUNCTIONS = {"fused": _FusedRowLinear, "merged": _MergedRowLinear}


def check_impl(base_layer: nn.Module, impl: str) -> None:
    """Raise ``ValueError`` if ``impl`` cannot run on ``base_layer`` (a dense-weight formulation on a
    quantized layer)."""
    if impl in ("merged", "fused") and is_quantized(base_layer):
        raise ValueError(
            f"impl={impl} needs a dense weight, and this {type(base_layer).__name__} is quantized; "
            "use impl=auto or index_add"
        )


class RowSparseLinear(nn.Module):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D``; trains a dense delta for the selected rows/columns only.

    Args:
        base_layer: the frozen layer (its parameters are set to ``requires_grad=False``).
        rows: output-row indices (``None``: all rows).
        cols: input-column indices (``None``: all columns).
        delta_dtype: dtype of the trainable delta; fp32 by default whatever the base dtype.
        impl: ``"auto"``, ``"merged"``, ``"fused"`` or ``"index_add"`` (see module docstring).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rows: list[int] | torch.Tensor | None,
        cols: list[int] | torch.Tensor | None = None,
        delta_dtype: torch.dtype = torch.float32,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise TypeError(f"RowSparseLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        check_impl(base_layer, impl)
        self.quantized = is_quantized(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.out_features, self.in_features = shape
        device = base_layer.weight.device
        # Index buffers stay int64 whatever `.to(dtype)` is applied to the model (buffers of integer
        # dtype are never cast by nn.Module.to).
        self.register_buffer(
            "rows", None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=device)
        )
        self.register_buffer(
            "cols", None if cols is None else torch.as_tensor(cols, dtype=torch.long, device=device)
        )
        # contiguous index ranges become slices (views) instead of gathers/scatters
        self.row_span, self.col_span = _span(self.rows), _span(self.cols)
        k = self.out_features if rows is None else len(self.rows)
        c = self.in_features if cols is None else len(self.cols)
        self.delta = nn.Parameter(torch.zeros(k, c, dtype=delta_dtype, device=device))
        self.register_buffer("_merged_block", None, persistent=False)
        self.delta_dtype = delta_dtype
        self.impl: Impl = impl
        self.disabled = False
        self.register_state_dict_post_hook(_standard_state)
        self.register_load_state_dict_pre_hook(_from_standard_state)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast the frozen base; the delta keeps `delta_dtype`
        # (fp32 by default) and its values bit for bit (a cast down and back up would round them), so
        # optimizer updates to it do not underflow. Devices still follow `fn`: where `fn` takes a tensor
        # of the delta's dtype is read from an empty one, and the delta alone is moved there.
        delta = self._parameters.pop("delta")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["delta"] = delta
        follow_device(delta, fn)
        if delta.dtype != self.delta_dtype:
            delta.data = delta.data.to(self.delta_dtype)
        return self

    # ---- state ---------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged_block is not None

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects `.weight` (e.g. dtype checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        k, c = self.delta.shape
        return f"rows={k}/{self.out_features}, cols={c}/{self.in_features}, impl={self.impl}"

    def resolved_impl(self, x: torch.Tensor) -> str:
        """The formulation a forward with input ``x`` uses, ``auto`` resolved (the rule is in the module
        docstring); depends on the autocast state, so ask inside the same autocast context."""
        return resolve_impl(self.impl, self.base_layer, self.quantized, x)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        impl = self.resolved_impl(x)
        if impl == "index_add":
            return add_delta(self.base_layer(x), x, self.delta, self.rows, self.cols)
        return _FUNCTIONS[impl].apply(
            x,
            get_weight(self.base_layer),
            self.base_layer.bias,
            self.delta,
            self.rows,
            self.cols,
            self.row_span,
            self.col_span,
        )

    # ---- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight (``W[rows, cols] += D``); keeps the original block."""
        if self.merged:
            return
        if self.quantized:
            raise NotImplementedError(
                f"a delta cannot be merged into the quantized {type(self.base_layer).__name__} in place; "
                "dequantized() (and merge_and_unload) give a plain layer with it folded in"
            )
        w = get_weight(self.base_layer)
        block = get_block(w, self.rows, self.cols).clone()
        put_block(w, self.rows, self.cols, block.to(self.delta.dtype) + self.delta)
        self._merged_block = block

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weights (the saved block, not a lossy subtraction)."""
        if not self.merged:
            return
        put_block(get_weight(self.base_layer), self.rows, self.cols, self._merged_block)
        self._merged_block = None

    @torch.no_grad()
    def reset_delta(self) -> None:
        self.delta.zero_()

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with ``dequant(W) + D`` in ``dtype`` (default: the layer's compute
        dtype), for a quantized base: the function that was trained, in a layer anything can load."""
        return dequantized_linear(self.base_layer, [(self.rows, self.cols, self.delta)], dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A copy of the base weight (in its own layout and dtype) with the delta folded in."""
        if self.quantized:
            return self.dequantized().weight
        if self.merged:
            return self.base_layer.weight.detach().clone()
        w = get_weight(self.base_layer)
        # the (out, in) view back in the layer's own layout (Conv1D's transpose is its own inverse)
        return as_out_in(effective_weight(w, self.delta, self.rows, self.cols, w.dtype), self.base_layer)


# ---- state dicts: a row-tuned model saves as the standard model it stands for -----------------------
# Anything that saves `model.state_dict()` (transformers' save_pretrained, the HF Trainer's checkpoints,
# torch.save) writes the layer as a plain linear with the delta merged in, under the plain layer's
# names, so `AutoModelForCausalLM.from_pretrained` loads the trained weights. Loading such a state dict
# back into a row-tuned model recovers the delta as (merged - base) on the selected entries in the
# delta's dtype (exact to float rounding for an fp32 base; a bf16 base rounds as a merged bf16 model
# does), and refuses weights that differ from the frozen base outside the selection.
def _standard_state(module: RowSparseLinear, state: dict, prefix: str, local_metadata: dict) -> None:
    if prefix + "base_layer.weight" not in state or module.quantized:  # a packed base keeps its own layout
        return
    state.pop(prefix + "base_layer.weight")
    merged = module.merged_weight()
    for key in ("delta", "rows", "cols"):
        state.pop(prefix + key, None)
    new = {prefix + "weight": merged}
    if prefix + "base_layer.bias" in state:
        new[prefix + "bias"] = state.pop(prefix + "base_layer.bias")
    for k in [k for k in state if k.startswith(prefix + "base_layer.")]:  # anything else the base holds
        new[prefix + k[len(prefix + "base_layer.") :]] = state.pop(k)
    state.update(new)


def _from_standard_state(
    module: RowSparseLinear, state: dict, prefix: str, local_metadata: dict, strict: bool,
    missing: list, unexpected: list, error_msgs: list,
) -> None:  # fmt: skip
    if prefix + "weight" not in state or prefix + "delta" in state:
        return  # the module's own layout (or nothing for it): the default loading applies
    w = state.pop(prefix + "weight")
    base = module.base_layer.weight
    if tuple(w.shape) != tuple(base.shape):
        error_msgs.append(f"{prefix}weight: shape {tuple(w.shape)} does not fit {tuple(base.shape)}")
        return
    with torch.no_grad():
        got = as_out_in(w.to(base.device), module.base_layer)
        ref = get_weight(module.base_layer)
        outside = got.to(ref.dtype) != ref
        put_block(
            outside, module.rows, module.cols, torch.zeros_like(get_block(outside, module.rows, module.cols))
        )
        if outside.any():
            error_msgs.append(
                f"{prefix}weight differs from the frozen base outside the selected rows/columns "
                f"({int(outside.sum())} entries): it was not saved from a row-tuned copy of this base"
            )
            return
        d = get_block(got, module.rows, module.cols).to(module.delta.dtype)
        d -= get_block(ref, module.rows, module.cols).to(module.delta.dtype)
        state[prefix + "delta"] = d
    state[prefix + "base_layer.weight"] = base.detach()
    for key in ("rows", "cols"):
        if getattr(module, key) is not None:
            state[prefix + key] = getattr(module, key)
    if prefix + "bias" in state:
        state[prefix + "base_layer.bias"] = state.pop(prefix + "bias")
