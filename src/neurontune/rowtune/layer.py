r"""Row-sparse linear layer: only selected output rows (optionally only selected input columns) train.

SPruFT-style parameterisation (Li & Bhaskara, arXiv 2502.11439), initialised at zero::

    y = W x + b                      frozen base (any dtype, never copied)
    y[..., rows] += D x[..., cols]   D: (k, c) fp32 trainable delta, k = |rows|, c = |cols|

    merge:  W[rows, cols] += D       (the original block is kept, so unmerge is exact)

Gradients and optimizer state exist only for the k x c entries of D; the frozen weight has
``requires_grad=False`` and gets no gradient, so weight decay cannot touch unselected rows.

Two formulations of the same math (``impl``):

- ``"fused"`` (default): a custom autograd function that adds ``D x`` into the base output in place and
  in backward computes only ``dD = dy[..., rows]^T x[..., cols]`` and ``dx = dy W + scatter(dy[..., rows] D)``.
  It saves only ``x[..., cols]`` for backward and never allocates a second output-sized tensor.
- ``"index_add"``: plain autograd, ``y.index_add(-1, rows, x @ D^T)``; needed when the base weight
  itself is trainable and kept as a reference implementation.

``benchmarks/rowtune_overhead.py`` measures both against PEFT LoRA and full fine-tuning.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neurontune.targets import get_weight, linear_shape

Impl = Literal["fused", "index_add"]


class _RowDeltaLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` plus ``D x[..., cols]`` added into output rows ``rows``; W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, cols):
        y = F.linear(x, weight, bias)
        xs = x if cols is None else x.index_select(-1, cols)
        d = F.linear(xs.to(delta.dtype), delta).to(y.dtype)
        if rows is None:
            y += d
        else:
            y.index_add_(-1, rows, d)
        ctx.save_for_backward(xs, weight, delta, rows, cols)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, weight, delta, rows, cols = ctx.saved_tensors
        gys = gy if rows is None else gy.index_select(-1, rows)
        gx = gdelta = None
        if ctx.needs_input_grad[0]:
            gx = (gy.to(weight.dtype) @ weight).to(ctx.x_dtype)
            gd = (gys.to(delta.dtype) @ delta).to(ctx.x_dtype)
            if cols is None:
                gx += gd
            else:
                gx.index_add_(-1, cols, gd)
        if ctx.needs_input_grad[3]:
            k, c = delta.shape
            gdelta = gys.reshape(-1, k).to(delta.dtype).t() @ xs.reshape(-1, c).to(delta.dtype)
        return gx, None, None, gdelta, None, None


class RowSparseLinear(nn.Module):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D``; trains a dense delta for the selected rows/columns only.

    Args:
        base_layer: the frozen layer (its parameters are set to ``requires_grad=False``).
        rows: output-row indices (``None``: all rows).
        cols: input-column indices (``None``: all columns).
        delta_dtype: dtype of the trainable delta; fp32 by default whatever the base dtype.
        impl: ``"fused"`` or ``"index_add"`` (see module docstring).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rows: list[int] | torch.Tensor | None,
        cols: list[int] | torch.Tensor | None = None,
        delta_dtype: torch.dtype = torch.float32,
        impl: Impl = "fused",
    ) -> None:
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise TypeError(f"RowSparseLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        if impl not in ("fused", "index_add"):
            raise ValueError(f"impl must be 'fused' or 'index_add', got {impl!r}")
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
        k = self.out_features if rows is None else len(self.rows)
        c = self.in_features if cols is None else len(self.cols)
        self.delta = nn.Parameter(torch.zeros(k, c, dtype=delta_dtype, device=device))
        self.register_buffer("_merged_block", None, persistent=False)
        self.delta_dtype = delta_dtype
        self.impl: Impl = impl
        self.disabled = False

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast the frozen base; the delta keeps `delta_dtype`
        # (fp32 by default) so optimizer updates to it do not underflow. Devices still follow `fn`.
        super()._apply(fn, recurse)
        if self.delta.dtype != self.delta_dtype:
            self.delta.data = self.delta.data.to(self.delta_dtype)
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

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        weight = get_weight(self.base_layer)
        bias = self.base_layer.bias
        base_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if self.impl == "fused" and not base_trainable:
            return _RowDeltaLinear.apply(x, weight, bias, self.delta, self.rows, self.cols)
        y = self.base_layer(x)
        xs = x if self.cols is None else x.index_select(-1, self.cols)
        d = F.linear(xs.to(self.delta.dtype), self.delta).to(y.dtype)
        return y + d if self.rows is None else y.index_add(-1, self.rows, d)

    # ---- merge / unmerge -----------------------------------------------------------------------
    def _get_block(self, w: torch.Tensor) -> torch.Tensor:
        block = w if self.rows is None else w.index_select(0, self.rows)
        return block if self.cols is None else block.index_select(1, self.cols)

    def _put_block(self, w: torch.Tensor, value: torch.Tensor) -> None:
        value = value.to(w.dtype)
        if self.rows is None and self.cols is None:
            w.copy_(value)
        elif self.cols is None:
            w.index_copy_(0, self.rows, value)
        elif self.rows is None:
            w.index_copy_(1, self.cols, value)
        else:
            w[self.rows[:, None], self.cols[None, :]] = value

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight (``W[rows, cols] += D``); keeps the original block."""
        if self.merged:
            return
        w = get_weight(self.base_layer)
        block = self._get_block(w).clone()
        self._put_block(w, block.to(self.delta.dtype) + self.delta)
        self._merged_block = block

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weights (the saved block, not a lossy subtraction)."""
        if not self.merged:
            return
        self._put_block(get_weight(self.base_layer), self._merged_block)
        self._merged_block = None

    @torch.no_grad()
    def reset_delta(self) -> None:
        self.delta.zero_()
