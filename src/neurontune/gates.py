"""Stochastic gates that adapt and prune at once (FineGates), with a physical pruning export.

Gaussian stochastic gates (Yamada et al. 2020): ``g = clamp(z + eps, 0, 1)``, ``z = tanh(a) + 0.5``,
``eps ~ N(0, sigma^2)`` in training and no noise at eval; ``P(g > 0) = Phi(z / sigma)`` is a
differentiable L0 surrogate. Gates start exactly open (``z = 1``), so training starts from the base model.

Two sparsity-target penalties (``GateConfig.penalty``), averaged over gate groups (one group per layer
and kind):

- ``"ranked"`` (default): ``lambda * sum(Phi(z / tau) over the k gates of lowest z) / n``, ``k`` the
  export plan's count to remove from the group (structured; linear: ``round(target * n)``), ramped up
  from 0 over ``ramp_steps``. It pushes the gates the task values least shut and leaves the rest to the
  task loss, so the achieved (eval) sparsity converges to the target. ``tau`` (0.5) is wider than the noise ``sigma``
  (0.1): ``Phi(z / 0.1)`` is flat for every gate above ``z = 0.4``, so it would never start closing an
  open gate, while noise as wide as 0.5 on every channel wrecks a pretrained model (SmolLM2-135M's
  first-step loss on Rotten Tomatoes: 5.0 ungated, 5.3 with sigma 0.1, 11.2 with sigma 0.5).
- ``"mean"`` (FineGates' formula): ``lambda * |mean(P(g > 0)) - (1 - target)|``. It constrains the
  *expected* number of open gates only; on our tiny-model tests every gate then drifts to ``z = 0``
  together (``P = 0.5`` each, the constraint met, nothing shut at eval), which is why it is not the
  default. Use it to reproduce the paper.

Granularities (``GateConfig.granularity``):

- ``"structured"`` (what a real speed-up needs, Llama-family models): one gate per MLP intermediate
  channel (gate/up rows and down columns together; the gate scales the input of ``down_proj``) and,
  with ``prune_heads``, one per attention head (q rows + o columns; grouped KV heads are respected
  by keeping the same number of query heads in every KV group). :func:`export_pruned` removes the
  closed channels/heads, folds the open gate values into ``down_proj`` / ``o_proj`` and writes a
  model that plain ``transformers`` loads. The target is a share of the MLP+attention parameters
  (:func:`export_plan`: the heads nearest to it, then the MLP channels the rest needs). Every layer
  keeps the same number of channels and heads
  (the per-layer penalty makes the layers agree; :meth:`GatedModel.finalize` picks exactly that many
  per layer), so the standard config with a smaller ``intermediate_size`` / ``num_attention_heads``
  and an explicit ``head_dim`` describes it.
- ``"linear"`` (the paper's): a row and a column gate on every target linear,
  ``W' = diag(g_r) (W0 + s B A) diag(g_c)``. Export folds the gates into the weights (dense zeros: no
  speed-up, as row gates on q/k/v do not respect head structure).

``low_rank=r`` adds a trainable ``s·B A`` term (``B``: out×r zero-initialised, ``A``: r×in) inside the
gates of every target linear; export folds it into the weights. The base weights stay frozen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurontune.errors import NeurontuneError
from neurontune.gate_config import GateConfig
from neurontune.targets import ModelWrapper, find_target_modules, set_submodule

GATES_FORMAT = "neurontune.gates/1"


@dataclass
class ExportPlan:
    """The uniform structure the export writes, fixed before training so the penalty trains exactly it."""

    mlp_width: int  # intermediate channels per layer in the model
    mlp_keep: int  # ... and in the export
    width_multiple: int  # the multiple mlp_keep was rounded to (1 when the width is too small for it)
    kv_heads: int
    heads_per_group: int
    heads_keep: int | None  # query heads kept per KV group (None: heads are not pruned)
    removed_fraction: float = 0.0  # of the MLP+attention parameters (what count_prunable counts)

    def describe(self, target: float) -> str:
        mult = f", a multiple of {self.width_multiple}" if self.width_multiple > 1 else ""
        text = (
            f"MLP channels {self.mlp_width} -> {self.mlp_keep} per layer "
            f"({1 - self.mlp_keep / self.mlp_width:.1%} removed{mult})"
        )
        if self.heads_keep is not None:
            n, k = self.heads_per_group * self.kv_heads, self.heads_keep * self.kv_heads
            text += (
                f"; query heads {n} -> {k} ({1 - k / n:.1%} removed), the nearest that {self.kv_heads} KV "
                f"groups of {self.heads_per_group} allow to {target:.0%}"
            )
        return text + f": {self.removed_fraction:.1%} of the MLP+attention parameters (target {target:.0%})"


def export_plan(model_config: Any, mlp_width: int, cfg: GateConfig) -> ExportPlan:
    """The uniform export that removes at least ``cfg.target_sparsity`` of the MLP+attention parameters:
    with ``prune_heads`` the query heads per KV group nearest to the target's share, then as many MLP
    channels as the rest of the target needs (rounded to the multiple, down, so the target is met)."""
    mc, s = model_config, cfg.target_sparsity
    hidden, kv, heads = mc.hidden_size, mc.num_key_value_heads, mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or hidden // heads
    mb, ab = int(bool(getattr(mc, "mlp_bias", False))), int(bool(getattr(mc, "attention_bias", False)))
    per_channel = 3 * hidden + 2 * mb  # gate and up rows (and biases), a down column
    per_head = 2 * hidden * head_dim + ab * head_dim  # q rows (and bias), o columns
    total = (
        mlp_width * per_channel
        + mb * hidden
        + heads * per_head
        + 2 * kv * head_dim * (hidden + ab)
        + ab * hidden
    )
    per_group = heads // kv
    heads_keep = None
    if cfg.prune_heads:
        want = (1 - s) * per_group
        # LlamaConfig insists on hidden_size % num_attention_heads == 0: the counts that fit
        fits = [h for h in range(1, per_group + 1) if hidden % (h * kv) == 0]
        heads_keep = min(fits, key=lambda h: (abs(h - want), -h))
    heads_removed = (per_group - (heads_keep or per_group)) * kv * per_head
    m = cfg.width_multiple if mlp_width >= 4 * cfg.width_multiple else 1
    channels = max(0, math.ceil((s * total - heads_removed) / per_channel - 1e-9))
    mlp_keep = min(mlp_width, max(m, (mlp_width - channels) // m * m))
    removed = (mlp_width - mlp_keep) * per_channel + heads_removed
    return ExportPlan(mlp_width, mlp_keep, m, kv, per_group, heads_keep, removed / total)


class GaussianGate(nn.Module):
    """``n`` Gaussian stochastic gates; after :meth:`fix` some are forced shut (``keep`` mask)."""

    def __init__(self, n: int, sigma: float = 0.1, init: float = 1.0) -> None:
        super().__init__()
        a = math.atanh(init - 0.5)
        if init >= 1.0:
            a += 1e-3  # so that tanh(a) + 0.5 is >= 1 in float32 and eval gates are exactly 1
        self.a = nn.Parameter(torch.full((n,), a))
        self.sigma = sigma
        self.register_buffer("keep", torch.ones(n, dtype=torch.bool))
        self.bypass = False  # GatedModel.dense(): every gate exactly open

    def mu(self) -> torch.Tensor:
        return torch.tanh(self.a)

    def forward(self) -> torch.Tensor:
        if self.bypass:
            return torch.ones_like(self.a)
        z = self.mu() + 0.5
        if self.training:
            z = z + self.sigma * torch.randn_like(z)
        return z.clamp(0.0, 1.0) * self.keep

    def open_prob(self, width: float | None = None) -> torch.Tensor:
        """``P(g > 0) = Phi(z / sigma)``, or the smoother ``Phi(z / width)``."""
        return 0.5 * (1 + torch.erf((self.mu() + 0.5) / ((width or self.sigma) * math.sqrt(2))))

    def eval_values(self) -> torch.Tensor:
        """The deterministic gate values (what eval mode multiplies by)."""
        return ((self.mu() + 0.5).clamp(0.0, 1.0) * self.keep).detach()


class LowRank(nn.Module):
    """``W0 x + s B A x`` around a frozen linear (``B`` starts at zero, so the output is unchanged)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float | None) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = (alpha if alpha is not None else 2 * r) / r
        self.bypass = False  # GatedModel.dense(): the frozen linear alone

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(x)
        return self.base(x) + self.scale * ((x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype))


class InputGated(nn.Module):
    """Scales the input features of ``inner`` by a gate, expanded ``block`` times (head_dim for heads)."""

    def __init__(self, inner: nn.Module, gate: GaussianGate, block: int = 1) -> None:
        super().__init__()
        self.inner, self.gate, self.block = inner, gate, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate()
        if self.block > 1:
            g = g.repeat_interleave(self.block)
        return self.inner(x * g.to(x.dtype))


class RowColGated(nn.Module):
    """The paper's gates on one linear: ``y = g_r * inner(g_c * x)``."""

    def __init__(self, inner: nn.Module, rows: GaussianGate, cols: GaussianGate) -> None:
        super().__init__()
        self.inner, self.rows, self.cols = inner, rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.cols().to(x.dtype)) * self.rows().to(x.dtype)


def _linear(module: nn.Module) -> nn.Linear:
    """The frozen nn.Linear inside a (possibly low-rank-wrapped) module."""
    return module.base if isinstance(module, LowRank) else module


def check_structured(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` has the Llama-style layout structured gates need."""
    _layers(model)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer, "self_attn") for layer in layers):
        raise NeurontuneError(
            f"structured gates need a Llama-style decoder (model.layers[i].mlp / .self_attn); "
            f"got {type(model).__name__}. Use granularity='linear' for other architectures."
        )
    for layer in layers:
        if not all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise NeurontuneError(
                f"structured gates need gate/up/down projections; {type(layer.mlp).__name__} has none"
            )
    return list(layers)


class GatedModel(ModelWrapper):
    """A frozen model with stochastic gates (and optional low-rank terms) as its only trainable state, or
    with ``train_weights`` the target modules' weights trained with them."""

    def __init__(self, model: nn.Module, config: GateConfig | None = None) -> None:
        super().__init__()
        self.base_model, self.gate_config = model, config or GateConfig()
        cfg = self.gate_config
        model.requires_grad_(False)
        self.groups: dict[str, GaussianGate] = {}
        targets = find_target_modules(model, cfg.target_modules)
        for name in targets if cfg.train_weights else []:
            model.get_submodule(name).weight.requires_grad_(True)
        if cfg.low_rank:
            for name in targets:
                self._replace(name, LowRank(model.get_submodule(name), cfg.low_rank, cfg.low_rank_alpha))
        self.plan: ExportPlan | None = None
        if cfg.granularity == "structured":
            mc = model.config
            self.head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
            self.plan = export_plan(mc, _linear(_layers(model)[0].mlp.down_proj).in_features, cfg)
            for i, layer in enumerate(_layers(model)):
                down = layer.mlp.down_proj
                gate = self._gate(f"layer{i}.mlp", _linear(down).in_features)
                layer.mlp.down_proj = InputGated(down, gate)
                if cfg.prune_heads:
                    o = layer.self_attn.o_proj
                    gate = self._gate(f"layer{i}.heads", _linear(o).in_features // self.head_dim)
                    layer.self_attn.o_proj = InputGated(o, gate, self.head_dim)
        else:
            for name in find_target_modules(model, cfg.target_modules):
                inner = model.get_submodule(name)
                lin = _linear(inner)
                rows = self._gate(f"{name}.rows", lin.out_features)
                cols = self._gate(f"{name}.cols", lin.in_features)
                self._replace(name, RowColGated(inner, rows, cols))
        self.gates = nn.ModuleDict({k.replace(".", "/"): g for k, g in self.groups.items()})

    def _gate(self, key: str, n: int) -> GaussianGate:
        g = GaussianGate(n, self.gate_config.sigma, self.gate_config.init)
        self.groups[key] = g
        return g

    def _replace(self, name: str, new: nn.Module) -> None:
        set_submodule(self.base_model, name, new)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @contextlib.contextmanager
    def dense(self) -> Iterator[GatedModel]:
        """Within it the model computes the ungated base: every gate open, the low-rank terms off (the
        teacher of gate-phase distillation, without a second copy of the model)."""
        switched = [m for m in self.modules() if isinstance(m, GaussianGate | LowRank)]
        for m in switched:
            m.bypass = True
        try:
            yield self
        finally:
            for m in switched:
                m.bypass = False

    def dense_forward(self, **inputs: Any) -> Any:
        """A forward of the ungated base (:meth:`dense`), as a distillation teacher."""
        with self.dense():
            return self(**inputs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return (
            sum(p.numel() for p in self.parameters() if p.requires_grad),
            sum(p.numel() for p in self.parameters()),
        )

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Gates at ``gate_config.lr`` without weight decay (decay would pull every gate to z = 0.5), with
        ``gate_config.lr_scheduler`` "constant" outside the run's schedule
        (:func:`neurontune.train.make_scheduler`); the low-rank terms and trained weights at ``lr`` with
        the run's weight decay."""
        cfg = self.gate_config
        gates = [g.a for g in self.groups.values()]
        ids = {id(p) for p in gates}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": gates, "lr": cfg.lr or lr, "weight_decay": 0.0}]
        if cfg.lr_scheduler:
            groups[0]["lr_scheduler"] = cfg.lr_scheduler
        return groups + ([{"params": rest}] if rest else [])

    def training_hooks(self, lr: float) -> dict[str, Any]:
        """What :func:`neurontune.train.train` needs beyond the model: the two optimizer groups, the
        penalty and the per-step sparsity (``train(gated, data, args, **gated.training_hooks(args.lr))``)."""
        return {
            "param_groups": self.param_groups(lr),
            "regularization": self.regularization,
            "step_stats": self.sparsity,
        }

    # ---- sparsity ------------------------------------------------------------------------------
    def ramp(self, step: int | None) -> float:
        """The share of the target the penalty asks for at optimizer step ``step`` (0-based; ``None``:
        all of it): ``(step + 1) / ramp_steps`` up to 1."""
        r = self.gate_config.ramp_steps
        return 1.0 if step is None or r <= 0 else min(1.0, (step + 1) / r)

    def regularization(self, step: int | None = None) -> torch.Tensor:
        """The sparsity-target penalty (see the module docstring) at optimizer step ``step`` (the target
        ramps up over ``ramp_steps``), averaged over gate groups."""
        cfg = self.gate_config
        share = self.ramp(step)
        terms = []
        for key, g in self.groups.items():
            groups, full = self._to_shut(key)
            if cfg.penalty == "mean":  # the expected share open: the export plan's share kept in the group
                target = cfg.target_sparsity if self.plan is None else groups * full / g.a.numel()
                terms.append((g.open_prob().mean() - (1.0 - share * target)).abs())
            else:  # push shut exactly what the export removes: the lowest gates, per layer (and KV group)
                p, mu = g.open_prob(cfg.tau), g.mu().detach()
                shut = round(share * full)
                lowest = mu.view(groups, -1).argsort(dim=1)[:, :shut]
                terms.append(p.view(groups, -1).gather(1, lowest).sum() / p.numel())
        return cfg.lam * torch.stack(terms).mean()

    def _to_shut(self, key: str) -> tuple[int, int]:
        """``(blocks, gates to shut in each)`` for gate group ``key``, from the export plan."""
        n = self.groups[key].a.numel()
        if self.plan is None:  # linear granularity: the target share of every row/column gate group
            return 1, round(self.gate_config.target_sparsity * n)
        if key.endswith(".heads"):
            return self.plan.kv_heads, self.plan.heads_per_group - self.plan.heads_keep
        return 1, n - self.plan.mlp_keep

    def sparsity(self) -> dict[str, float]:
        """Fraction of gates closed at eval (deterministic), overall and per kind."""
        closed = {k: int((g.eval_values() == 0).sum()) for k, g in self.groups.items()}
        total = {k: g.a.numel() for k, g in self.groups.items()}
        out = {"gate_sparsity": sum(closed.values()) / max(1, sum(total.values()))}
        for kind in ("mlp", "heads", "rows", "cols"):
            keys = [k for k in closed if k.endswith(kind)]
            if keys:
                out[f"sparsity_{kind}"] = sum(closed[k] for k in keys) / sum(total[k] for k in keys)
        return out

    def iter_structured(self) -> Iterator[tuple[int, nn.Module, GaussianGate, GaussianGate | None]]:
        for i, layer in enumerate(_layers(self.base_model)):
            heads = layer.self_attn.o_proj.gate if isinstance(layer.self_attn.o_proj, InputGated) else None
            yield i, layer, layer.mlp.down_proj.gate, heads

    @torch.no_grad()
    def open_share_of_removed(self) -> float:
        """The share of what the export would remove now that is still open (what :meth:`finalize` would
        report as ``forced_fraction``), leaving the gates as they are."""
        forced, total = 0, 0
        for _, gate, keep, blocks in self._planned_gates():
            cut = ~_top_mask(gate, keep, blocks)
            forced += int(((gate.eval_values() > 0) & cut).sum())
            total += int(cut.sum())
        return forced / total if total else 0.0

    def _planned_gates(self) -> Iterator[tuple[str, GaussianGate, int, int]]:
        """``(kind, gate, gates the export keeps, blocks they are kept in)`` for every layer's MLP and
        head gates, by :attr:`plan`."""
        plan = self.plan
        if plan is None:
            raise NeurontuneError("finalize/export_pruned need granularity='structured'")
        for _, _, mlp, heads in self.iter_structured():
            yield "mlp", mlp, plan.mlp_keep, 1
            if heads is not None:
                yield "heads", heads, (plan.heads_keep or 0) * plan.kv_heads, plan.kv_heads

    @torch.no_grad()
    def finalize(self) -> dict[str, Any]:
        """Shut exactly what the export removes (:attr:`plan`): in every layer the gates of largest ``z``
        stay, ``plan.mlp_keep`` channels and ``plan.heads_keep`` heads per KV group, the rest are shut.
        After this, eval outputs equal the pruned export's.

        Returns the shape and how much of what is removed was still open (``forced_*``: gates cut
        although their eval value was above 0), which is where the export's function differs from
        the trained gated model's.
        """
        forced, removed = {"mlp": 0, "heads": 0}, {"mlp": 0, "heads": 0}
        for kind, gate, keep, blocks in self._planned_gates():
            open_before = gate.eval_values() > 0
            _keep_top(gate, keep, groups=blocks)
            cut = ~gate.keep
            forced[kind] += int((open_before & cut).sum())
            removed[kind] += int(cut.sum())
        plan = self.plan
        out: dict[str, Any] = {
            "intermediate_size": plan.mlp_keep,
            "heads_per_kv_group": plan.heads_keep or plan.heads_per_group,
            "removed_channels": removed["mlp"],
            "forced_channels": forced["mlp"],
        }
        if plan.heads_keep is not None:
            out |= {"removed_heads": removed["heads"], "forced_heads": forced["heads"]}
        total = removed["mlp"] + removed["heads"]
        out["forced_fraction"] = (forced["mlp"] + forced["heads"]) / total if total else 0.0
        return out

    def state_dict_gates(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def config_dict(self) -> dict[str, Any]:
        return {"format": GATES_FORMAT, **asdict(self.gate_config)}


def _top_mask(gate: GaussianGate, k: int, groups: int) -> torch.Tensor:
    """The ``k`` gates of largest ``z`` (unclamped, so fully open or shut gates still rank), ``k / groups``
    within each of ``groups`` equal blocks."""
    v = gate.mu().view(groups, -1)
    idx = v.topk(k // groups, dim=1).indices
    return torch.zeros_like(v, dtype=torch.bool).scatter_(1, idx, True).flatten()


def _keep_top(gate: GaussianGate, k: int, groups: int) -> None:
    """Keep :func:`_top_mask`'s gates, shut the rest."""
    gate.keep.copy_(_top_mask(gate, k, groups))


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding copies of ``weight`` (out x in) and ``bias``."""
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _sliced(
    lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, col_scale: torch.Tensor | None
) -> nn.Linear:
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    if col_scale is not None:
        w = w * col_scale.to(w.dtype)
    b = lin.bias.detach() if lin.bias is not None else None
    return _new_linear(w, b[rows] if b is not None and rows is not None else b)


def _fold_low_rank(module: nn.Module) -> nn.Linear:
    if not isinstance(module, LowRank):
        return module
    lin = module.base
    w = lin.weight.detach() + module.delta_weight().detach().to(lin.weight.dtype)
    return _new_linear(w, lin.bias.detach() if lin.bias is not None else None)


@torch.no_grad()
def export_pruned(
    gated: GatedModel, output_dir: str | Path | None = None, tokenizer: Any = None
) -> nn.Module:
    """Remove shut channels/heads, fold gate values and low-rank terms into the weights, and return
    (and with ``output_dir``, save) a plain transformers model. Call :meth:`GatedModel.finalize` first.
    """
    model = gated.base_model
    mc = model.config
    kv = mc.num_key_value_heads
    head_dim = gated.head_dim
    widths, heads_kept = set(), set()
    for _, layer, mlp_gate, head_gate in gated.iter_structured():
        mlp = layer.mlp
        g = mlp_gate.eval_values()
        keep = mlp_gate.keep.nonzero().flatten()  # finalize's choice (a kept gate may be 0: scaled away)
        widths.add(keep.numel())
        mlp.gate_proj = _sliced(_fold_low_rank(mlp.gate_proj), keep, None, None)
        mlp.up_proj = _sliced(_fold_low_rank(mlp.up_proj), keep, None, None)
        mlp.down_proj = _sliced(_fold_low_rank(mlp.down_proj.inner), None, keep, g[keep])
        attn = layer.self_attn
        for p in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, p, _fold_low_rank(getattr(attn, p)))
        if head_gate is not None:
            hg = head_gate.eval_values()
            kept_heads = head_gate.keep.nonzero().flatten()
            heads_kept.add(kept_heads.numel())
            cols = (kept_heads[:, None] * head_dim + torch.arange(head_dim, device=hg.device)).flatten()
            attn.q_proj = _sliced(attn.q_proj, cols, None, None)
            attn.o_proj = _sliced(
                _fold_low_rank(attn.o_proj.inner), None, cols, hg[kept_heads].repeat_interleave(head_dim)
            )
            attn.num_key_value_groups = kept_heads.numel() // kv
        else:
            attn.o_proj = _fold_low_rank(attn.o_proj)
    if len(widths) != 1 or len(heads_kept) > 1:
        raise NeurontuneError(
            f"layers differ in kept channels {sorted(widths)} / heads {sorted(heads_kept)}; call finalize() first"
        )
    mc.intermediate_size = widths.pop()
    mc.head_dim = head_dim
    if heads_kept:
        mc.num_attention_heads = heads_kept.pop()
    if output_dir is not None:
        from neurontune.io import save_pretrained_atomic

        save_pretrained_atomic(output_dir, model, tokenizer)
    return model


@torch.no_grad()
def fold_linear_gates(gated: GatedModel) -> nn.Module:
    """Linear granularity: ``W' = diag(g_r) (W0 + s B A) diag(g_c)``, ``b' = g_r * b`` folded into plain
    linears (same shapes, closed rows/columns become zeros). Returns the plain model."""
    model = gated.base_model
    for name, m in list(model.named_modules()):
        if isinstance(m, RowColGated):
            lin = _fold_low_rank(m.inner)
            r, c = m.rows.eval_values().to(lin.weight.dtype), m.cols.eval_values().to(lin.weight.dtype)
            lin.weight.data.copy_(lin.weight.detach() * r[:, None] * c[None, :])
            if lin.bias is not None:
                lin.bias.data.copy_(lin.bias.detach() * r)
            gated._replace(name, lin)
    return model


def count_prunable(model: nn.Module) -> int:
    """Parameters of the attention and MLP linears (what structured pruning can remove); in a gated
    model, of the frozen linears inside the gate and low-rank wrappers."""
    total = 0
    for layer in _layers(model):
        for m in (*layer.mlp.children(), *layer.self_attn.children()):
            while isinstance(m, InputGated | RowColGated | LowRank):
                m = m.base if isinstance(m, LowRank) else m.inner
            if isinstance(m, nn.Linear):
                total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return total
