"""Row-sparse tuning as a registered PEFT method (``peft_type="ROWTUNE"``), PEFT's config/tuner/layer split.

    from peft import get_peft_model
    import neurontune

    config = neurontune.RowTuneConfig(task_type="CAUSAL_LM", init_rows="magnitude", budget="lora:8")
    model = get_peft_model(base, config)           # only the selected rows train
    model.save_pretrained("out")                   # adapter_config.json + adapter_model.safetensors (deltas, indices)
    AutoPeftModelForCausalLM.from_pretrained("out")   # in a process that imported neurontune

:class:`RowTuneLayer` keeps one delta per named adapter (``rowtune_delta[name]``, fp32 by default) and its
row / column indices (``rowtune_rows[name]``, ``rowtune_cols[name]``, int64 buffers saved beside the
deltas), and computes with the same engine as :class:`neurontune.rowtune.RowSparseLinear` (``fused``,
``merged``, ``index_add``; autocast-correct; a bitsandbytes base through its own forward).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from neurontune.errors import AdapterError, NeurontuneError, SpecError, TargetError
from neurontune.models import model_quantization
from neurontune.rowtune.config import RowTuneConfig, selection_from
from neurontune.rowtune.layer import (
    _FUNCTIONS,
    _span,
    add_delta,
    check_impl,
    dequantized_linear,
    follow_device,
    get_block,
    put_block,
    resolve_impl,
)
from neurontune.targets import drop_quantization, get_weight, is_quantized, linear_shape, refuse_tied_weights

PREFIX = "rowtune_"
DATA_FREE = ("magnitude", "random")  # scorers that need no calibration data


class RowTuneLayer(nn.Module, BaseTunerLayer):
    """A linear (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes 4/8-bit) whose selected rows carry deltas.

    ``y = base(x); y[..., rows] += D_a x[..., cols]`` for each active adapter ``a``. The base layer is
    never changed except by :meth:`merge` (which keeps the original block, so :meth:`unmerge` is exact).
    """

    adapter_layer_names = ("rowtune_delta",)
    other_param_names = ("rowtune_rows", "rowtune_cols", "rowtune_impl")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise TargetError(f"rowtune wraps nn.Linear or Conv1D layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.out_features, self.in_features = shape
        self.quantized = is_quantized(base_layer)
        self.rowtune_delta = nn.ParameterDict({})
        self.rowtune_rows = BufferDict({}, persistent=True)
        self.rowtune_cols = BufferDict({}, persistent=True)
        self.rowtune_impl: dict[str, str] = {}
        self._spans: dict[str, tuple[Any, Any]] = {}  # adapter -> (row span, column span)
        self._merged_blocks: list[tuple[str, torch.Tensor]] = []  # (adapter, original block), in merge order
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.update_layer(adapter_name, **kwargs)

    # ---- adapters ------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        k: int,
        c: int,
        delta_dtype: torch.dtype = torch.float32,
        impl: str = "auto",
        inference_mode: bool = False,
    ) -> None:
        try:
            check_impl(self.base_layer, impl)
        except ValueError as e:
            raise TargetError(str(e)) from None
        device = self.base_layer.weight.device
        self.rowtune_delta[adapter_name] = nn.Parameter(torch.zeros(k, c, dtype=delta_dtype, device=device))
        if rows is not None:
            self.rowtune_rows[adapter_name] = rows.to(device=device, dtype=torch.long)
        if cols is not None:
            self.rowtune_cols[adapter_name] = cols.to(device=device, dtype=torch.long)
        self.rowtune_impl[adapter_name] = impl
        self._refresh_spans(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts the frozen base; the deltas keep their dtype and values bit for
        # bit (a cast down and back up would round them), and follow `fn` only to its device.
        deltas = self._modules.pop("rowtune_delta")
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["rowtune_delta"] = deltas
        for p in deltas.values():
            follow_device(p, fn)
        return self

    def _index_buffers(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """An adapter's row and column index buffers (``None``: every row / column)."""
        rows = self.rowtune_rows[adapter] if adapter in self.rowtune_rows else None
        return rows, self.rowtune_cols[adapter] if adapter in self.rowtune_cols else None

    def _refresh_spans(self, adapter: str) -> None:
        """Check an adapter's indices and note whether they are contiguous ranges (one host sync; at
        creation and after every ``load_state_dict``, never in the forward, so it compiles without
        graph breaks). Placeholder indices (a config loaded without its weights) leave no spans."""
        rows, cols = self._index_buffers(adapter)
        self._spans.pop(adapter, None)
        for t, size, what in ((rows, self.out_features, "row"), (cols, self.in_features, "column")):
            if t is None or not t.numel():
                continue
            if bool((t < 0).all()):  # placeholders, not loaded (yet)
                return
            if int(t.min()) < 0 or int(t.max()) >= size:
                raise AdapterError(f"adapter {adapter!r}: {what} index out of range [0, {size})")
        self._spans[adapter] = (_span(rows), _span(cols))

    def _indices(self, adapter: str) -> tuple[Any, Any, Any, Any]:
        """``(rows, cols, row_span, col_span)`` of an adapter."""
        spans = self._spans.get(adapter)
        if spans is None:
            raise AdapterError(
                f"adapter {adapter!r}: its row indices were never loaded (a RowTuneConfig read from "
                "adapter_config.json alone has none: load the adapter with PeftModel.from_pretrained)"
            )
        return (*self._index_buffers(adapter), *spans)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.rowtune_delta]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1:
            a = active[0]
            impl = resolve_impl(self.rowtune_impl[a], self.base_layer, self.quantized, x)
            if impl in _FUNCTIONS:
                rows, cols, rs, cs = self._indices(a)
                return _FUNCTIONS[impl].apply(
                    x,
                    get_weight(self.base_layer),
                    self.base_layer.bias,
                    self.rowtune_delta[a],
                    rows,
                    cols,
                    rs,
                    cs,
                )
        y = self.base_layer(x, *args, **kwargs)
        for a in active:
            rows, cols, _, _ = self._indices(a)
            y = add_delta(y, x, self.rowtune_delta[a], rows, cols)
        return y

    # ---- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W[rows, cols] += D`` for each adapter (the original block kept, so unmerge is exact)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if self.quantized:
            raise NeurontuneError(
                f"a row delta cannot be merged into the quantized {type(self.base_layer).__name__} in place; "
                "load the base unquantized to merge (or use `neurontune merge`, which dequantizes)"
            )
        w = get_weight(self.base_layer)
        for a in adapter_names:
            if a not in self.rowtune_delta:
                continue
            rows, cols, _, _ = self._indices(a)
            block = get_block(w, rows, cols).clone()
            new = block.to(self.rowtune_delta[a].dtype) + self.rowtune_delta[a]
            if safe_merge and not torch.isfinite(new).all():
                raise NeurontuneError(f"NaNs or infinities in adapter {a!r}: the merge would break the model")
            put_block(w, rows, cols, new)
            self._merged_blocks.append((a, block))
            self.merged_adapters.append(a)

    @torch.no_grad()
    def unmerge(self) -> None:
        w = get_weight(self.base_layer)
        while self._merged_blocks:  # last merged first: each restores the block it saw
            a, block = self._merged_blocks.pop()
            rows, cols, _, _ = self._indices(a)
            put_block(w, rows, cols, block)
            self.merged_adapters.remove(a)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """What replaces this layer at ``merge_and_unload`` / ``unload``: the base layer (with the deltas
        merged in); a quantized base becomes a plain ``nn.Linear`` holding ``dequant(W) + D`` (what was
        trained, in the layer's compute dtype)."""
        if merge and self.quantized:
            names = check_adapters_to_merge(self, adapter_names)
            blocks = [
                (*self._indices(a)[:2], self.rowtune_delta[a]) for a in names if a in self.rowtune_delta
            ]
            return dequantized_linear(self.base_layer, blocks)
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            self.unmerge()
        return self.base_layer

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense ``(out, in)`` update of one adapter (zero outside its rows and columns)."""
        rows, cols, _, _ = self._indices(adapter)
        d = self.rowtune_delta[adapter]
        full = torch.zeros(self.out_features, self.in_features, dtype=d.dtype, device=d.device)
        put_block(full, rows, cols, d)
        return full

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.rowtune_impl.pop(adapter_name, None)
        self._spans.pop(adapter_name, None)

    def extra_repr(self) -> str:
        parts = [
            f"{a}: {tuple(d.shape)} of ({self.out_features}, {self.in_features})"
            for a, d in self.rowtune_delta.items()
        ]
        return ", ".join(parts)


def _refresh_after_load(layer: RowTuneLayer, incompatible_keys: Any) -> None:
    for adapter in layer.rowtune_delta:  # the loaded indices (PEFT loads them with the deltas)
        layer._refresh_spans(adapter)


class RowTuneTuner(BaseTuner):
    """The PEFT tuner of ``peft_type="ROWTUNE"``: wraps exactly the modules of the config's selection."""

    prefix: str = PREFIX
    tuner_layer_cls = RowTuneLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        dequantized = new_module is not getattr(child, "base_layer", None) and not isinstance(
            new_module, BaseTunerLayer
        )
        if isinstance(child, RowTuneLayer) and child.quantized and dequantized:
            setattr(parent, child_name, new_module)  # PEFT would put the 4-bit weight back into the new layer
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        quantized = merge and any(isinstance(m, RowTuneLayer) and m.quantized for m in self.model.modules())
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        if quantized:  # the other quantized layers are dequantized too: one plain model
            drop_quantization(model)
        return model

    def _prepare_adapter_config(self, peft_config: RowTuneConfig, model_config: dict) -> RowTuneConfig:
        return peft_config  # the selection, not target_modules, says what is wrapped

    def _prepare_model(self, peft_config: RowTuneConfig, model: nn.Module) -> None:
        resolve_selection(model, peft_config)

    @staticmethod
    def _check_target_module_exists(peft_config: RowTuneConfig, key: str) -> bool:
        return key in (peft_config.modules or {})

    def _create_and_replace(
        self, peft_config: RowTuneConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str, **optional_kwargs: Any,
    ) -> None:  # fmt: skip
        shape = peft_config.modules[current_key]
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        out_f, in_f = linear_shape(base)
        spec = getattr(peft_config, "_spec", None)
        sel = spec.modules.get(current_key) if spec is not None else None
        kwargs = {
            "k": shape["rows"] if shape["rows"] is not None else out_f,
            "c": shape["cols"] if shape["cols"] is not None else in_f,
            "rows": _indices(sel.rows if sel else None, shape["rows"]),
            "cols": _indices(sel.cols if sel else None, shape["cols"]),
            "delta_dtype": peft_config.torch_delta_dtype,
            "impl": peft_config.impl,
            "inference_mode": peft_config.inference_mode,
        }
        if isinstance(target, RowTuneLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TargetError(f"{current_key} already carries another PEFT method's adapter")
        new = RowTuneLayer(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new, target)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _indices(given: list[int] | None, count: int | None) -> torch.Tensor | None:
    """The index tensor of a selection, or placeholders (-1, refused by the forward) that loading fills."""
    if count is None:
        return None
    if given is not None:
        return torch.tensor(given, dtype=torch.long)
    return torch.full((count,), -1, dtype=torch.long)


def resolve_selection(model: nn.Module, config: RowTuneConfig) -> None:
    """Fill ``config.modules`` (and the in-memory ``config._spec``) from the config's selection, checked
    against ``model``; a data-free ``init_rows`` scorer is run here."""
    spec = getattr(config, "_spec", None) or selection_from(config)
    if spec is None and config.modules is None:
        if config.init_rows is None:
            raise NeurontuneError(
                "RowTuneConfig has no selection: give rows={module: [row indices]}, or init_rows='magnitude' "
                "(or a data-driven scorer with neurontune.select_rows(model, config, batches) first)"
            )
        if config.init_rows not in DATA_FREE:
            raise NeurontuneError(
                f"init_rows={config.init_rows!r} scores with calibration data: call "
                "neurontune.select_rows(model, config, batches) before get_peft_model "
                f"(or use one of {', '.join(DATA_FREE)})"
            )
        spec = _score_and_select(model, config, None)
    if spec is None:  # loading: the config lists the modules, the weights file brings the indices
        named = dict(model.named_modules())
        for name, info in config.modules.items():
            module = named.get(name)
            shape = linear_shape(_base(module)) if module is not None else None
            if shape is None:
                raise AdapterError(
                    f"the adapter names {name!r}, which this model does not have as a linear layer"
                )
            if info.get("shape") is not None and tuple(info["shape"]) != shape:
                raise AdapterError(
                    f"the adapter was made for {name} of shape {tuple(info['shape'])}; this model's is {shape}"
                )
        return
    try:
        spec.validate(model)
    except SpecError as e:
        raise TargetError(f"RowTuneConfig selection does not fit this model: {e}") from None
    refuse_tied_weights(model, spec.modules)
    if not config.provenance:
        config.provenance = {k: v for k, v in spec.provenance.items() if k != "config"}
    config.provenance.setdefault("base_quantization", model_quantization(model))
    config._spec = spec
    config.modules = {n: sel.layout() for n, sel in spec.modules.items()}
    config.fan_in_fan_out = any(isinstance(_base(model.get_submodule(n)), Conv1D) for n in spec.modules)


def _score_and_select(model: nn.Module, config: RowTuneConfig, batches: Any) -> Any:
    from neurontune.choices import parse_budget
    from neurontune.scoring import score_model
    from neurontune.selection import select
    from neurontune.spec import NeuronSpec

    scores = score_model(
        model, config.init_rows, batches=batches, target_modules=config.target_modules or "all-linear",
        exclude_modules=config.exclude_modules, seed=config.seed, **(config.scorer_options or {}),
    )  # fmt: skip
    provenance = {
        "scorer": config.init_rows,
        "scorer_options": config.scorer_options or {},
        "seed": config.seed,
    }
    spec = select(model, scores, seed=config.seed, provenance=provenance, **parse_budget(config.budget))
    # on a model that already has rowtune layers (a second adapter) the scored linears are their
    # `base_layer`s: the selection names the tuner layer, which takes the new adapter beside the first
    named = dict(model.named_modules())
    tail = ".base_layer"

    def owner(name: str) -> str:
        parent = name[: -len(tail)]
        return parent if name.endswith(tail) and isinstance(named.get(parent), BaseTunerLayer) else name

    return NeuronSpec({owner(n): s for n, s in spec.modules.items()}, spec.provenance)


def select_rows(model: nn.Module, config: RowTuneConfig, batches: Any = None) -> RowTuneConfig:
    """Score ``model``'s target rows with ``config.init_rows`` on ``batches`` (calibration batches: dicts of
    ``input_ids``, ``attention_mask``, ``labels``; a DataLoader works) and keep the ``config.budget``
    best, before ``get_peft_model`` (as PEFT's ``preprocess_corda`` / ``preprocess_loraga``). Returns
    ``config`` with the selection in it."""
    if config.init_rows is None:
        raise NeurontuneError("select_rows needs RowTuneConfig(init_rows=<scorer>)")
    if batches is not None and not isinstance(batches, list | tuple):
        batches = list(batches)
    spec = _score_and_select(model, config, batches)
    config.rows, config.cols, config.modules = spec, None, None
    config._spec = None
    return config


def register() -> None:
    """Register ``rowtune`` with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from neurontune.rowtune.config import _peft_type

    if _peft_type() in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name="rowtune", config_cls=RowTuneConfig, model_cls=RowTuneTuner, prefix=PREFIX)


register()
