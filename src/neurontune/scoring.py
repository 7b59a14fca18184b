r"""Neuron scorers: one score per output row of every target linear; higher = more worth training.

A scorer is a small callable ``scorer(weight, stats) -> Tensor[out_features]`` where ``weight`` is
the module's ``(out, in)`` weight (fp32 copy) and ``stats`` a :class:`LayerStats` with the
statistics it declared in its ``needs`` attribute, gathered by :func:`score_model` over the
calibration batches:

=================  ==============================================  =================================
needs              what is gathered (streamed, fp32)               passes over the calibration data
=================  ==============================================  =================================
(nothing)          -                                                none
``"act_in"``       ``sum_t x_tk^2`` per input column k              forward
``"act_out"``      ``sum_t |y_tj|`` and ``#{t: y_tj > 0}`` per row  forward
``"grad"``         ``g = sum_b dL_b/dW`` (size of W)                forward + backward
``"grad_sq"``      ``sum_b (dL_b/dW)^2`` (size of W)                forward + backward per micro-batch
``"zo_grad"``      SPSA estimate of dL/dW, rebuilt from seeds        2 forwards per sample, no backward
``"probe"``        W after a probe fine-tune (NeFT)                  probe training (forward + backward)
=================  ==============================================  =================================

Built-in scorers (formulas from SPruFT, arXiv 2502.11439, and NeFT, arXiv 2403.11621):

- ``magnitude``   ``I_j = sum_k |W_jk|^p``
- ``taylor``      ``I_j = sum_k |W_jk g_jk|``
- ``fisher``      ``I_j = sum_k W_jk^2 mean_b(g_bjk^2)`` (micro-batch or per-sample gradients)
- ``zo-taylor``   ``I_j = sum_k |W_jk ĝ_jk|`` with ĝ from SPSA: ``(L(θ+εz) - L(θ-εz)) / 2ε · z``
- ``wanda``       ``I_j = sum_k |W_jk| ||X_k||_2``
- ``activation``  mean ``|y_j|`` over tokens (``mode="strength"``) or the fraction of tokens with
                  ``y_j > 0`` (``mode="frequency"``; on ``gate_proj`` that is how often an MLP neuron fires)
- ``neft``        ``1 - cos(W0_j, W_ft_j)`` after a probe fine-tune: the paper's lowest similarity is
                  our highest score
- ``random``      seeded uniform scores

Bring your own with :func:`scorer`::

    @scorer(needs=("grad",))
    def grad_norm(weight, stats):
        return stats.grad.norm(dim=1)

    spec = select(model, score_model(model, grad_norm, batches=calib), ratio=0.05)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from neurontune.errors import NeurontuneError
from neurontune.runtime import is_fsdp_sharded
from neurontune.targets import (
    as_out_in,
    dense_weight,
    find_target_modules,
    get_weight,
    is_quantized,
    linear_shape,
)
from neurontune.train import labelled_tokens

STAT_KINDS = frozenset({"act_in", "act_out", "grad", "grad_sq", "zo_grad", "probe"})


@dataclass
class LayerStats:
    """Statistics of one linear module gathered over the calibration data (all fp32, on CPU/device of W)."""

    name: str
    n_tokens: int = 0
    n_grad: int = 0
    act_in_sq: torch.Tensor | None = None  # (in,)  sum over tokens of x^2
    act_out_abs: torch.Tensor | None = None  # (out,) sum over tokens of |y|
    act_out_pos: torch.Tensor | None = None  # (out,) count of tokens with y > 0
    grad: torch.Tensor | None = None  # (out, in) sum of gradients
    grad_sq: torch.Tensor | None = None  # (out, in) sum of squared micro-batch gradients
    zo_grad: torch.Tensor | None = None  # (out, in) SPSA gradient estimate (mean over samples)
    weight_after: torch.Tensor | None = None  # (out, in) weight after the NeFT probe
    generator: torch.Generator | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ScorerFn = Callable[[torch.Tensor, LayerStats], torch.Tensor]
SCORERS: dict[str, Callable[..., ScorerFn]] = {}


def scorer(needs: Iterable[str] = (), name: str | None = None) -> Callable[[ScorerFn], ScorerFn]:
    """Mark a function ``fn(weight, stats) -> Tensor[out]`` as a scorer needing ``needs`` statistics."""
    needs = frozenset(needs)
    unknown = needs - STAT_KINDS
    if unknown:
        raise NeurontuneError(f"unknown scorer needs {sorted(unknown)}; choose from {sorted(STAT_KINDS)}")

    def deco(fn: ScorerFn) -> ScorerFn:
        fn.needs = needs
        fn.scorer_name = name or getattr(fn, "__name__", "custom")
        return fn

    return deco


def register(name: str) -> Callable:
    """Register a scorer factory ``factory(**options) -> scorer`` under ``name``."""

    def deco(factory: Callable[..., ScorerFn]) -> Callable[..., ScorerFn]:
        SCORERS[name] = factory
        return factory

    return deco


def get_scorer(name_or_fn: str | ScorerFn, **options: Any) -> ScorerFn:
    if callable(name_or_fn):
        if not hasattr(name_or_fn, "needs"):
            name_or_fn = scorer()(name_or_fn)
        return name_or_fn
    if name_or_fn not in SCORERS:
        raise NeurontuneError(f"unknown scorer {name_or_fn!r}; available: {sorted(SCORERS)}")
    try:
        return SCORERS[name_or_fn](**options)
    except TypeError as e:
        raise NeurontuneError(f"scorer {name_or_fn!r}: bad options {options}: {e}") from None


# ---- built-in scorers ------------------------------------------------------------------------------
@register("magnitude")
def _magnitude(p: int = 1) -> ScorerFn:
    @scorer(name="magnitude")
    def magnitude(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """``sum_k |W_jk|^p``; no data, one pass over the weights."""
        return weight.abs().pow(p).sum(dim=1)

    return magnitude


@register("random")
def _random() -> ScorerFn:
    @scorer(name="random")
    def random_scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Seeded uniform scores; no data."""
        return torch.rand(weight.shape[0], generator=stats.generator)

    return random_scores


@register("taylor")
def _taylor() -> ScorerFn:
    @scorer(needs=("grad",), name="taylor")
    def taylor(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """``sum_k |W_jk g_jk|``, g summed over the calibration batches; one backward per batch."""
        return (weight * stats.grad).abs().sum(dim=1)

    return taylor


@register("fisher")
def _fisher(per_sample: bool = False) -> ScorerFn:
    @scorer(needs=("grad_sq",), name="fisher")
    def fisher(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """``sum_k W_jk^2 mean(g_jk^2)``; one backward per micro-batch (or per sample)."""
        return (weight.pow(2) * stats.grad_sq / max(1, stats.n_grad)).sum(dim=1)

    fisher.per_sample = per_sample
    return fisher


@register("zo-taylor")
def _zo_taylor(samples: int = 4, eps: float = 1e-3) -> ScorerFn:
    @scorer(needs=("zo_grad",), name="zo-taylor")
    def zo_taylor(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """``sum_k |W_jk ĝ_jk|`` with an SPSA gradient estimate; forward passes only."""
        return (weight * stats.zo_grad).abs().sum(dim=1)

    zo_taylor.samples, zo_taylor.eps = samples, eps
    return zo_taylor


@register("wanda")
def _wanda() -> ScorerFn:
    @scorer(needs=("act_in",), name="wanda")
    def wanda(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """``sum_k |W_jk| ||X_k||_2`` over calibration tokens; forward passes only."""
        return (weight.abs() * stats.act_in_sq.sqrt()[None, :]).sum(dim=1)

    return wanda


@register("activation")
def _activation(mode: str = "strength") -> ScorerFn:
    if mode not in ("strength", "frequency"):
        raise NeurontuneError(f"activation mode must be 'strength' or 'frequency', got {mode!r}")

    @scorer(needs=("act_out",), name="activation")
    def activation(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """Mean |y_j| (strength) or fraction of tokens with y_j > 0 (frequency); forward passes only."""
        acc = stats.act_out_abs if mode == "strength" else stats.act_out_pos
        return acc / max(1, stats.n_tokens)

    return activation


@register("neft")
def _neft(
    probe_steps: int = 20, probe_lr: float = 1e-4, probe_params: str = "targets", probe_mode: str = "joint"
) -> ScorerFn:
    if probe_params not in ("targets", "all"):
        raise NeurontuneError(f"neft probe_params must be 'targets' or 'all', got {probe_params!r}")
    if probe_mode not in ("joint", "grouped"):
        raise NeurontuneError(f"neft probe_mode must be 'joint' or 'grouped', got {probe_mode!r}")
    if probe_mode == "grouped" and probe_params == "all":
        raise NeurontuneError(
            "neft probe_mode=grouped probes the target modules a group at a time: use probe_params=targets"
        )
    if not isinstance(probe_steps, int) or probe_steps <= 0:
        raise NeurontuneError(f"neft probe_steps must be a positive integer, got {probe_steps!r}")
    if not isinstance(probe_lr, int | float) or not 0 < probe_lr < float("inf"):
        raise NeurontuneError(f"neft probe_lr must be a positive number, got {probe_lr!r}")

    @scorer(needs=("probe",), name="neft")
    def neft(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """``1 - cos(W0_j, W_ft_j)`` per row after a probe fine-tune (the full FT of the paper, or a short one)."""
        cos = torch.nn.functional.cosine_similarity(weight, stats.weight_after, dim=1, eps=1e-12)
        return 1.0 - cos

    neft.probe_steps, neft.probe_lr, neft.probe_params = probe_steps, probe_lr, probe_params
    neft.probe_mode = probe_mode
    return neft


# ---- statistics collection ---------------------------------------------------------------------------
def _weight_fp32(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight in fp32: a quantized one dequantized (a copy, one module at a time)."""
    return dense_weight(module) if is_quantized(module) else get_weight(module).detach().float()


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    return model(**b).loss


def _check_batches(batches: Sequence[dict[str, torch.Tensor]] | None, what: str) -> Sequence[dict]:
    if batches is None:
        raise NeurontuneError(f"scorer {what!r} needs calibration data (batches=...)")
    batches = list(batches)
    if not batches or all(int((b["labels"] != -100).sum()) == 0 for b in batches):
        raise NeurontuneError(
            f"scorer {what!r}: the calibration data is empty (no batches or no labelled tokens)"
        )
    return batches


def _collect_activations(model, modules, stats, batches, needs, progress) -> None:
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}

    def tokens(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1, t.shape[-1]).float()
        m = mask_holder["mask"]
        return flat[m] if m is not None and m.numel() == flat.shape[0] else flat

    handles = []
    for name, mod in modules.items():
        st = stats[name]
        if "act_in" in needs:
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, args, st=st: st.__setattr__(
                        "act_in_sq", st.act_in_sq + tokens(args[0]).pow(2).sum(0)
                    )
                )
            )
        if "act_out" in needs:

            def out_hook(m, args, out, st=st):
                y = tokens(out)
                st.act_out_abs += y.abs().sum(0)
                st.act_out_pos += (y > 0).sum(0).float()

            handles.append(mod.register_forward_hook(out_hook))
    try:
        with torch.no_grad():
            for b in tqdm(batches, desc="activations", disable=not progress):
                mask_holder["mask"] = (
                    b["attention_mask"].reshape(-1).bool().to(next(model.parameters()).device)
                )
                n = int(mask_holder["mask"].sum())
                _loss(model, b)
                for st in stats.values():
                    st.n_tokens += n
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Make only ``params`` require grad; afterwards restore every flag and drop the gradients."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None


@contextlib.contextmanager
def _weight_grads(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]):
    """Hand ``dL/dW`` of each module in ``modules`` to ``sink(name, g)`` during backward, as ``(out, in)``
    in the weight's compute dtype, without any weight requiring grad (so no weight-sized ``.grad``
    exists, and a quantized weight, which cannot hold one, works alike).

    ``g = x^T dy`` (transposed) from the module's input ``x`` and its output's gradient ``dy``, the
    product autograd's linear backward forms for the weight. A module whose output does not require
    grad yet (nothing before it in the pass does) gets an output that does, as a leaf: backward then
    runs from the loss down to the earliest module given here and no further, and the leaf's own
    gradient is dropped as soon as it is accumulated."""

    def hook(name: str, mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        x = args[0].detach()
        leaf = not out.requires_grad
        if leaf:
            out = out.detach().requires_grad_()
        fp32 = is_quantized(mod)  # a quantized layer's gradients are formed in fp32, as they were

        def on_grad(gy: torch.Tensor) -> None:
            x2, g2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
            sink(name, g2.float().t() @ x2.float() if fp32 else (x2.t() @ g2.to(x2.dtype)).t())

        out.register_hook(on_grad)
        if leaf:
            out.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
            return out
        return None

    handles = [
        mod.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o))
        for name, mod in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _checkpointed(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled``, the decoder layers recompute their activations in backward (transformers'
    gradient checkpointing, non-reentrant) during the gradient passes, as the training step does when
    ``gradient_checkpointing`` is on. Only the layers themselves are put in training mode (what turns
    transformers' checkpointing on); their submodules stay as they are, so dropout stays off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not enabled or not layers or not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    flags = [(m.training, m.gradient_checkpointing) for m in layers]
    was_on = any(on for _, on in flags)
    # newer transformers name them activation_checkpointing_*, older ones (and 5.17) gradient_checkpointing_*
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        enable = functools.partial(
            model.activation_checkpointing_enable, activation_checkpointing_kwargs=kwargs
        )
        disable = model.activation_checkpointing_disable
    else:
        enable = functools.partial(model.gradient_checkpointing_enable, gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    if not was_on:
        enable()
    for m in layers:
        m.training = True
    # no KV cache in these passes: a layer recomputed in backward would append its keys to it a second time
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
        if not was_on:
            disable()
        for m, (training, _) in zip(layers, flags, strict=True):
            m.training = training


def _micro_batches(batches: Sequence[dict], per_sample: bool) -> list[dict]:
    if not per_sample:
        return list(batches)
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]


def _collect_grads(model, modules, stats, batches, needs, per_sample, progress, checkpointing=False) -> None:
    """Gradient statistics of ``modules`` (one group of the targets): ``grad`` (their sum over the
    micro-batches) and ``grad_sq`` (the sum of their squares), accumulated in fp32 in place as backward
    reaches each module (:func:`_weight_grads`); with ``grad_sq`` a module's gradient of the whole
    micro-batch is kept until its backward ends, since it is squared whole."""
    whole = "grad_sq" in needs
    pending: dict[str, torch.Tensor] = {}

    def sink(name: str, g: torch.Tensor) -> None:
        if whole:
            pending[name] = g if name not in pending else pending[name] + g
        else:
            stats[name].grad += g.float()

    with _train_only(model, []), _checkpointed(model, checkpointing), _weight_grads(modules, sink):
        for b in tqdm(_micro_batches(batches, per_sample), desc="gradients", disable=not progress):
            if int((b["labels"] != -100).sum()) == 0:
                continue
            loss = _loss(model, b)
            if loss.requires_grad:  # else no module of the group reaches the loss: zero gradients
                loss.backward()
            for name in modules:
                st = stats[name]
                if whole and (g := pending.pop(name, None)) is not None:
                    g = g.float()
                    if "grad" in needs:
                        st.grad += g
                    st.grad_sq += g.pow(2)
                st.n_grad += 1
            pending.clear()


def _zo_noise(shape: torch.Size, seed: int, module_index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + module_index)
    return torch.randn(shape, generator=g)


@contextlib.contextmanager
def _perturbed(modules: dict[str, nn.Module], eps: float) -> Iterator[Callable[[int, int], None]]:
    """``set(seed, side)``: from then on each module's forward uses ``W + side·ε·z`` (``side`` +1 or
    -1, ``z`` regenerated from ``seed`` and the module's index), built in the weight's dtype for its
    own forward and dropped after it; ``side`` 0 is the plain ``W``. The stored weights are never
    written, so the base is left bit-identical. The -1 side is formed as ``(W + ε z) - 2ε z``, the
    weight the earlier in-place perturbation (+ε, -2ε, +ε) evaluated, so the estimates are the same."""
    current = {"seed": 0, "side": 0}
    swapped: dict[str, nn.Parameter] = {}

    def pre(index: int, name: str, mod: nn.Module, args: tuple) -> None:
        if current["side"] == 0:
            return
        w = get_weight(mod)
        z = _zo_noise(w.shape, current["seed"], index)
        with torch.no_grad():
            p = w + (eps * z).to(device=w.device, dtype=w.dtype)
            if current["side"] < 0:
                p -= (2 * eps * z).to(device=w.device, dtype=w.dtype)
        swapped[name] = mod._parameters["weight"]
        mod._parameters["weight"] = as_out_in(p, mod)  # the layer's own layout (Conv1D: a transposed view)

    def restore(name: str, mod: nn.Module, *_: Any) -> None:
        if name in swapped:
            mod._parameters["weight"] = swapped.pop(name)

    handles = []
    for i, (name, mod) in enumerate(modules.items()):
        handles.append(mod.register_forward_pre_hook(lambda m, a, i=i, name=name: pre(i, name, m, a)))
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: restore(name, m)))

    def set_side(seed: int, side: int) -> None:
        current.update(seed=seed, side=side)

    try:
        yield set_side
    finally:
        for h in handles:
            h.remove()
        for name in list(swapped):  # a forward that raised between the two hooks
            restore(name, modules[name])


@torch.no_grad()
def _zo_record(model, modules, batches, samples, eps, seed, progress) -> list[tuple[int, float]]:
    """SPSA (MeZO-style): two forwards per sample at ``W ± εz`` (:func:`_perturbed`); only ``(seed,
    projected gradient)`` pairs are kept, each module's estimate is rebuilt from them when it is scored."""
    record: list[tuple[int, float]] = []
    rng = torch.Generator().manual_seed(seed)
    with _perturbed(modules, eps) as side:
        for b in tqdm(batches, desc="zo-spsa", disable=not progress):
            for _ in range(samples):
                s = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
                side(s, +1)
                lp = _loss(model, b).item()
                side(s, -1)
                lm = _loss(model, b).item()
                side(s, 0)
                record.append((s, (lp - lm) / (2 * eps)))
    return record


def _zo_estimate(shape: torch.Size, index: int, record: list[tuple[int, float]]) -> torch.Tensor:
    est = torch.zeros(shape)
    for s, c in record:
        est += c * _zo_noise(shape, s, index)
    return est / len(record)


@contextlib.contextmanager
def _probed(model, modules, batches, steps, lr, probe_params, progress, world=1):
    """Fine-tune (targets or all params) for ``steps`` steps; inside, the model holds the probed weights
    and the context yields ``before(name)``, module ``name``'s (out, in) weight before the probe in fp32;
    on exit every trained parameter is restored bit for bit from its snapshot.

    With ``world`` > 1 (every process calls this, each with the same batches) each step's batch is split
    by rows across the processes and the gradients are summed, each process's loss being its tokens'
    summed loss over the whole batch's token count: the step of one process, data-parallel."""
    params = dict(model.named_parameters())
    train_names = [
        n for n, p in params.items() if probe_params == "all" or any(p is m.weight for m in modules.values())
    ]
    snapshot = {n: params[n].detach().clone() for n in train_names}
    param_name = {id(p): n for n, p in params.items()}
    was_training = model.training
    opt_params = [params[n] for n in train_names]

    def before(name: str) -> torch.Tensor:
        mod = modules[name]
        return as_out_in(snapshot[param_name[id(mod.weight)]], mod).float()

    with _train_only(model, opt_params):
        opt = torch.optim.AdamW(opt_params, lr=lr, weight_decay=0.0)
        model.train()
        try:
            for step in tqdm(range(steps), desc="neft probe", disable=not progress):
                batch = batches[step % len(batches)]
                if world == 1:
                    _loss(model, batch).backward()
                else:
                    rank = torch.distributed.get_rank()
                    part = {k: v[rank::world] for k, v in batch.items()}
                    n_part, n_all = labelled_tokens(part), labelled_tokens(batch)
                    loss = _loss(model, part) * n_part if n_part else sum(p.sum() * 0 for p in opt_params)
                    (loss / n_all).backward()
                    for p in opt_params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                opt.step()
                opt.zero_grad(set_to_none=True)
            del opt  # its moments, before the scores are formed
            model.train(was_training)
            with torch.no_grad():
                yield before
        finally:
            with torch.no_grad():
                for n in train_names:
                    params[n].copy_(snapshot[n])
            model.train(was_training)


def check_quantized(fn: ScorerFn, modules: dict[str, nn.Module]) -> None:
    """Refuse a scorer that perturbs or trains the weights it scores (zo-taylor, NeFT's probe) on
    quantized modules, which cannot be changed in place; every other scorer works on them."""
    q = next((n for n, m in modules.items() if is_quantized(m)), None)
    if fn.needs & {"zo_grad", "probe"} and q is not None:
        raise NeurontuneError(
            f"scorer {getattr(fn, 'scorer_name', 'custom')!r} changes the weights it scores, and {q} is "
            f"quantized ({type(modules[q]).__name__}); score a quantized base with magnitude, taylor, fisher, "
            "wanda, activation or random, or score the unquantized model and pass spec="
        )


def module_seed(seed: int, name: str) -> int:
    """A seed of its own for module ``name`` (stable across processes and Python versions), so random
    draws differ between modules of the same shape."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


ADDITIVE = frozenset({"act_in", "act_out", "grad", "grad_sq"})  # statistics that are sums over batches
# statistics every process of a group computes together: the sums above, and NeFT's probe (data-parallel)
DATA_PARALLEL = ADDITIVE | {"probe"}


def probe_world(needs: Iterable[str], batches: Sequence[Any] | None) -> int:
    """How many processes train NeFT's probe together: the process group's size when torch.distributed
    is up, every statistic the scorer needs is one all processes compute (:data:`DATA_PARALLEL`, so
    they all got here) and every batch has a row per process; else 1."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or not set(needs) <= DATA_PARALLEL:
        return 1
    world = dist.get_world_size()
    return world if batches and all(b["input_ids"].shape[0] >= world for b in batches) else 1


def shardable_world(needs: Iterable[str], batches: Sequence[Any] | None) -> int:
    """How many processes share the scoring: the process group's size when torch.distributed is up,
    the scorer needs only statistics that add up over batches, and every process gets a batch; else 1."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or not set(needs) or not set(needs) <= ADDITIVE:
        return 1
    world = dist.get_world_size()
    return world if batches is not None and len(batches) >= world else 1


def _sum_over_processes(stats: Iterable[LayerStats], keys: Sequence[str], counts: Sequence[str]) -> None:
    """Add up statistics ``keys`` and counters ``counts`` of every process (the same modules on each)."""
    dist = torch.distributed
    for st in stats:
        for key in keys:
            t = getattr(st, key)
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        c = torch.tensor([getattr(st, k) for k in counts], dtype=torch.float64, device=_device_of(st))
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        for k, v in zip(counts, c.tolist(), strict=True):
            setattr(st, k, int(v))


def _device_of(st: LayerStats) -> torch.device:
    for key in ("act_in_sq", "act_out_abs", "grad", "grad_sq"):
        if (t := getattr(st, key)) is not None:
            return t.device
    return torch.device("cpu")


# ---- memory: which target modules are scored together ------------------------------------------------
GRAD_STATS = frozenset({"grad", "grad_sq"})
MIN_GROUP_BYTES = 512 * 2**20
GROUP_FRACTION = 16  # the default budget: 1/16 of the model's parameter bytes


def stat_bytes(module: nn.Module, needs: Iterable[str]) -> int:
    """Bytes that module's weight-sized statistics take while its group is scored: an fp32 ``(out, in)``
    accumulator per gradient statistic, and with ``grad_sq`` the micro-batch's gradient (compute dtype)."""
    needs = set(needs)
    out_f, in_f = linear_shape(module)
    n = out_f * in_f
    size = 4 * n * len(needs & GRAD_STATS)
    if "grad_sq" in needs:
        size += n * (4 if is_quantized(module) else module.weight.element_size())
    if "probe" in needs:  # a grouped NeFT probe: the weight's gradient, two AdamW moments and a snapshot
        size += 4 * n * module.weight.element_size()
    return size


def default_group_bytes(model: nn.Module) -> int:
    """The weight-sized statistics held at once unless told otherwise: a sixteenth of the model's
    parameter bytes, at least 512 MiB (so a model of up to ~300M parameters is scored in one pass, and an
    8B bf16 model holds 1 GB of statistics in each of ~28 passes)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(MIN_GROUP_BYTES, total // GROUP_FRACTION)


def plan_groups(modules: dict[str, nn.Module], needs: Iterable[str], budget: int) -> list[list[str]]:
    """The target modules in model order, cut into consecutive groups whose :func:`stat_bytes` add up to
    at most ``budget`` (a module larger than the budget alone makes a group). Each group is one pass
    over the calibration data; a scorer without weight-sized statistics is one group."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, mod in modules.items():
        size = stat_bytes(mod, needs)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _new_stats(name: str, mod: nn.Module, needs: frozenset[str], seed: int) -> LayerStats:
    out_f, in_f = linear_shape(mod)
    dev = mod.weight.device
    st = LayerStats(name, generator=torch.Generator().manual_seed(module_seed(seed, name)))
    if "act_in" in needs:
        st.act_in_sq = torch.zeros(in_f, device=dev)
    if "act_out" in needs:
        st.act_out_abs, st.act_out_pos = torch.zeros(out_f, device=dev), torch.zeros(out_f, device=dev)
    return st


def _score_one(fn: ScorerFn, name: str, w: torch.Tensor, st: LayerStats) -> torch.Tensor:
    s = fn(w, st)
    if not isinstance(s, torch.Tensor) or s.shape != (w.shape[0],):
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise NeurontuneError(f"scorer returned {got} for {name}; expected a tensor of shape ({w.shape[0]},)")
    s = s.detach().float().cpu()
    if not torch.isfinite(s).all():
        raise NeurontuneError(f"scorer produced non-finite scores for {name}")
    return s


def _release(st: LayerStats) -> None:
    """Drop a scored module's weight-sized statistics."""
    st.grad = st.grad_sq = st.zo_grad = st.weight_after = None


def score_model(
    model: nn.Module,
    scorer_fn: str | ScorerFn = "magnitude",
    batches: Sequence[dict[str, torch.Tensor]] | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    group_bytes: int | None = None,
    gradient_checkpointing: bool = True,
    weights: Callable[[str, nn.Module], torch.Tensor] | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Score every output row of every target module. Restores the model's weights and grad flags.

    ``batches``: calibration batches (dicts with ``input_ids``, ``attention_mask``, ``labels``), needed
    by every scorer except ``magnitude`` and ``random``. ``options`` go to the scorer factory
    (``p=2``, ``mode="frequency"``, ``probe_steps=100``, ``samples=8``, ``per_sample=True``).

    **Memory.** Each module is reduced to its row scores as soon as its statistics are complete, and
    its weight-sized statistics are dropped. Gradient statistics (``taylor``, ``fisher``) are gathered
    for consecutive groups of modules holding at most ``group_bytes`` of them (default
    :func:`default_group_bytes`), one pass over the calibration data per group, from the modules'
    inputs and output gradients: no weight requires grad and no weight-sized ``.grad`` exists, and
    backward stops at the group's first module; with ``gradient_checkpointing`` (the default, for
    models that support it) the decoder layers recompute their activations in backward, so a pass holds
    the activations of a checkpointed training step (or fewer) and the statistics on top; the scores
    are the same either way. ``zo-taylor`` perturbs each weight only for its own
    forward (never in place), and its estimates are rebuilt one module at a time. The scores do not
    depend on the grouping. NeFT's probe is a fine-tune of the targets: its memory is that of full
    fine-tuning plus one snapshot of the trained weights in their own dtype; with
    ``probe_mode="grouped"`` the targets are probed a group at a time (the others frozen at their
    weights), groups of at most ``group_bytes`` of gradient, AdamW moments and snapshot: the memory of a
    group's fine-tune, at ``probe_steps`` steps per group. That is an approximation of the joint probe
    (each group is tuned with the rest at the base's weights), not the same scores.

    ``weights(name, module)``: each target's weight as stored, read when the module is scored, for a
    model that does not hold its weights whole (:mod:`neurontune.sharded` reads them from the
    checkpoint one at a time): one built without them (scorers that need no data only), or one sharded
    by FSDP2 over the processes. A sharded model scores with every process running every calibration
    batch (each pass is collective), so each process gathers the whole statistics itself and nothing is
    summed over processes; additive statistics only.
    """
    fn = get_scorer(scorer_fn, **options)
    needs = fn.needs
    sharded = is_fsdp_sharded(model)
    if sharded and (weights is None or not needs <= ADDITIVE):
        raise NeurontuneError(
            f"scorer {getattr(fn, 'scorer_name', 'custom')!r} cannot score an FSDP2-sharded model "
            "(magnitude, random, taylor, fisher, wanda and activation can, given its weights' reader)"
        )
    if weights is not None and needs and not sharded:
        raise NeurontuneError(
            f"scorer {getattr(fn, 'scorer_name', 'custom')!r} runs the calibration data through the model, "
            "which does not hold its weights: shard it (FSDP2) and fill its shards first"
        )
    names = find_target_modules(model, target_modules, exclude_modules)
    modules = {n: model.get_submodule(n) for n in names}
    torch.manual_seed(seed)
    check_quantized(fn, modules)
    stats = {n: _new_stats(n, mod, needs, seed) for n, mod in modules.items()}
    if needs:
        batches = _check_batches(batches, getattr(fn, "scorer_name", "custom"))
    world = 1 if sharded else shardable_world(needs, batches)
    if world > 1:  # each process gathers over its share of the batches; the sums are added up below
        batches = batches[torch.distributed.get_rank() :: world]
    if needs & {"act_in", "act_out"}:
        _collect_activations(model, modules, stats, batches, needs, progress)
        if world > 1:
            _sum_over_processes(stats.values(), ("act_in_sq", "act_out_abs", "act_out_pos"), ("n_tokens",))
    record = None
    if "zo_grad" in needs:
        samples, eps = getattr(fn, "samples", 4), getattr(fn, "eps", 1e-3)
        record = _zo_record(model, modules, batches, samples, eps, seed, progress)
    scores: dict[str, torch.Tensor] = {}
    budget = group_bytes if group_bytes is not None else default_group_bytes(model)
    if "probe" in needs:
        steps, lr = getattr(fn, "probe_steps", 20), getattr(fn, "probe_lr", 1e-4)
        params = getattr(fn, "probe_params", "targets")
        grouped = getattr(fn, "probe_mode", "joint") == "grouped"
        world = probe_world(needs, batches)
        for group in plan_groups(modules, {"probe"}, budget) if grouped else [names]:
            part = {n: modules[n] for n in group}
            with _probed(model, part, batches, steps, lr, params, progress, world) as w0:
                for n, mod in part.items():  # one module's fp32 pair at a time
                    stats[n].weight_after = _weight_fp32(mod)
                    scores[n] = _score_one(fn, n, w0(n), stats[n])
                    _release(stats[n])
        return scores
    groups = plan_groups(modules, needs, budget) if needs & GRAD_STATS else [names]
    index = {n: i for i, n in enumerate(names)}  # zo-taylor's noise is drawn per module index
    for i, group in enumerate(groups):
        part = {n: modules[n] for n in group}
        if needs & GRAD_STATS:
            for n, mod in part.items():
                out_f, in_f = linear_shape(mod)
                for key in needs & GRAD_STATS:
                    setattr(stats[n], key, torch.zeros(out_f, in_f, device=mod.weight.device))
            if progress and len(groups) > 1:
                print(f"scoring group {i + 1}/{len(groups)} ({len(group)} modules)")
            per_sample = getattr(fn, "per_sample", False)
            _collect_grads(
                model, part, stats, batches, needs, per_sample, progress and len(groups) == 1,
                gradient_checkpointing,
            )  # fmt: skip
            if world > 1:
                _sum_over_processes([stats[n] for n in group], ("grad", "grad_sq"), ("n_grad",))
        for n, mod in part.items():
            st = stats[n]
            if record is not None:
                w = get_weight(mod)
                st.zo_grad, st.n_grad = _zo_estimate(w.shape, index[n], record).to(w.device), len(record)
            w = _weight_fp32(mod) if weights is None else as_out_in(weights(n, mod), mod).float()
            scores[n] = _score_one(fn, n, w, st)
            _release(st)
    return scores


__all__ = ["SCORERS", "LayerStats", "get_scorer", "register", "score_model", "scorer"]
