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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from neurontune.errors import NeurontuneError
from neurontune.targets import dense_weight, find_target_modules, get_weight, is_quantized, linear_shape
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
def _neft(probe_steps: int = 20, probe_lr: float = 1e-4, probe_params: str = "targets") -> ScorerFn:
    if probe_params not in ("targets", "all"):
        raise NeurontuneError(f"neft probe_params must be 'targets' or 'all', got {probe_params!r}")
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
    return neft


# ---- statistics collection ---------------------------------------------------------------------------
def _weight_fp32(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight in fp32: a quantized one dequantized (a copy, one module at a time)."""
    return dense_weight(module) if is_quantized(module) else get_weight(module).detach().float()


def _grad_oi(module: nn.Module) -> torch.Tensor:
    """The weight's gradient as (out, in)."""
    g = module.weight.grad
    return g.t().float() if get_weight(module) is not module.weight else g.float()


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
def _grads_from_hooks(model: nn.Module, modules: dict[str, nn.Module], grads: dict[str, torch.Tensor]):
    """``dL/dW = sum_t dy_t^T x_t`` per module from its input and its output's gradient, for weights that
    cannot hold a gradient (quantized ones). The input embeddings' output requires grad, so backward
    runs through every layer's own kernels; nothing of the model is made trainable."""
    handles = [
        model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.requires_grad_(True))
    ]

    def hook(name: str, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach()

        def on_grad(gy: torch.Tensor) -> None:
            g = gy.reshape(-1, gy.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
            grads[name] = g if name not in grads else grads[name] + g

        out.register_hook(on_grad)

    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _collect_grads(model, modules, stats, batches, needs, per_sample, progress) -> None:
    """Gradients of the target weights only; one accumulator per statistic, never per-sample copies.
    Quantized weights take theirs from hooks (:func:`_grads_from_hooks`)."""
    hooked: dict[str, torch.Tensor] = {}
    quantized = any(is_quantized(m) for m in modules.values())
    params = [] if quantized else [mod.weight for mod in modules.values()]
    with (
        _train_only(model, params),
        _grads_from_hooks(model, modules, hooked) if quantized else (contextlib.nullcontext()),
    ):
        micro = []
        for b in batches:
            if per_sample:
                micro += [{k: v[i : i + 1] for k, v in b.items()} for i in range(b["input_ids"].shape[0])]
            else:
                micro.append(b)
        for b in tqdm(micro, desc="gradients", disable=not progress):
            if int((b["labels"] != -100).sum()) == 0:
                continue
            _loss(model, b).backward()
            for name, mod in modules.items():
                g = hooked.pop(name) if quantized else _grad_oi(mod)
                st = stats[name]
                if "grad" in needs:
                    st.grad += g
                if "grad_sq" in needs:
                    st.grad_sq += g.pow(2)
                st.n_grad += 1
                mod.weight.grad = None


def _zo_noise(shape: torch.Size, seed: int, module_index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + module_index)
    return torch.randn(shape, generator=g)


@torch.no_grad()
def _collect_zo(model, modules, stats, batches, samples, eps, seed, progress) -> None:
    """SPSA (MeZO-style): perturb in place with regenerated noise, store only (seed, projected grad)."""
    names = list(modules)
    record: list[tuple[int, float]] = []
    rng = torch.Generator().manual_seed(seed)

    def perturb(s: int, scale: float) -> None:
        for i, n in enumerate(names):
            w = get_weight(modules[n])
            w.add_((scale * eps * _zo_noise(w.shape, s, i)).to(device=w.device, dtype=w.dtype))

    for b in tqdm(batches, desc="zo-spsa", disable=not progress):
        for _ in range(samples):
            s = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
            perturb(s, +1.0)
            lp = _loss(model, b).item()
            perturb(s, -2.0)
            lm = _loss(model, b).item()
            perturb(s, +1.0)
            record.append((s, (lp - lm) / (2 * eps)))
    for i, n in enumerate(names):  # rebuild each module's estimate, one module in memory at a time
        w = get_weight(modules[n])
        est = torch.zeros(w.shape)
        for s, c in record:
            est += c * _zo_noise(w.shape, s, i)
        stats[n].zo_grad = (est / len(record)).to(w.device)
        stats[n].n_grad = len(record)


def _collect_probe(model, modules, stats, batches, steps, lr, probe_params, progress, world=1) -> None:
    """Fine-tune (targets or all params) for ``steps`` steps, record target weights, restore everything.

    With ``world`` > 1 (every process calls this, each with the same batches) each step's batch is split
    by rows across the processes and the gradients are summed, each process's loss being its tokens'
    summed loss over the whole batch's token count: the step of one process, data-parallel."""
    params = dict(model.named_parameters())
    train_names = [
        n for n, p in params.items() if probe_params == "all" or any(p is m.weight for m in modules.values())
    ]
    snapshot = {n: params[n].detach().clone() for n in train_names}
    was_training = model.training
    opt_params = [params[n] for n in train_names]
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
            for name, mod in modules.items():
                stats[name].weight_after = _weight_fp32(mod).clone()
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


def _sum_over_processes(stats: Iterable[LayerStats]) -> None:
    dist = torch.distributed
    for st in stats:
        for key in ("act_in_sq", "act_out_abs", "act_out_pos", "grad", "grad_sq"):
            t = getattr(st, key)
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        counts = torch.tensor([st.n_tokens, st.n_grad], dtype=torch.float64, device=_device_of(st))
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        st.n_tokens, st.n_grad = int(counts[0]), int(counts[1])


def _device_of(st: LayerStats) -> torch.device:
    for key in ("act_in_sq", "act_out_abs", "grad", "grad_sq"):
        if (t := getattr(st, key)) is not None:
            return t.device
    return torch.device("cpu")


def score_model(
    model: nn.Module,
    scorer_fn: str | ScorerFn = "magnitude",
    batches: Sequence[dict[str, torch.Tensor]] | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Score every output row of every target module. Restores the model's weights and grad flags.

    ``batches``: calibration batches (dicts with ``input_ids``, ``attention_mask``, ``labels``), needed
    by every scorer except ``magnitude`` and ``random``. ``options`` go to the scorer factory
    (``p=2``, ``mode="frequency"``, ``probe_steps=100``, ``samples=8``, ``per_sample=True``).
    """
    fn = get_scorer(scorer_fn, **options)
    needs = fn.needs
    names = find_target_modules(model, target_modules, exclude_modules)
    modules = {n: model.get_submodule(n) for n in names}
    torch.manual_seed(seed)
    stats: dict[str, LayerStats] = {}
    check_quantized(fn, modules)
    for n, mod in modules.items():
        out_f, in_f = linear_shape(mod)
        dev = mod.weight.device
        st = LayerStats(n, generator=torch.Generator().manual_seed(module_seed(seed, n)))
        if "act_in" in needs:
            st.act_in_sq = torch.zeros(in_f, device=dev)
        if "act_out" in needs:
            st.act_out_abs, st.act_out_pos = torch.zeros(out_f, device=dev), torch.zeros(out_f, device=dev)
        if "grad" in needs:
            st.grad = torch.zeros(out_f, in_f, device=dev)
        if "grad_sq" in needs:
            st.grad_sq = torch.zeros(out_f, in_f, device=dev)
        stats[n] = st
    if needs:
        batches = _check_batches(batches, getattr(fn, "scorer_name", "custom"))
    world = shardable_world(needs, batches)
    if world > 1:  # each process gathers over its share of the batches; the sums are added up below
        batches = batches[torch.distributed.get_rank() :: world]
    if needs & {"act_in", "act_out"}:
        _collect_activations(model, modules, stats, batches, needs, progress)
    if needs & {"grad", "grad_sq"}:
        _collect_grads(model, modules, stats, batches, needs, getattr(fn, "per_sample", False), progress)
    if world > 1:
        _sum_over_processes(stats.values())
    if "zo_grad" in needs:
        _collect_zo(
            model,
            modules,
            stats,
            batches,
            getattr(fn, "samples", 4),
            getattr(fn, "eps", 1e-3),
            seed,
            progress,
        )
    if "probe" in needs:
        _collect_probe(
            model,
            modules,
            stats,
            batches,
            getattr(fn, "probe_steps", 20),
            getattr(fn, "probe_lr", 1e-4),
            getattr(fn, "probe_params", "targets"),
            progress,
            probe_world(needs, batches),
        )
    scores = {}
    for n, mod in modules.items():
        w = _weight_fp32(mod)
        s = fn(w, stats[n])
        if not isinstance(s, torch.Tensor) or s.shape != (w.shape[0],):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise NeurontuneError(
                f"scorer returned {got} for {n}; expected a tensor of shape ({w.shape[0]},)"
            )
        s = s.detach().float().cpu()
        if not torch.isfinite(s).all():
            raise NeurontuneError(f"scorer produced non-finite scores for {n}")
        scores[n] = s
    return scores


__all__ = ["SCORERS", "LayerStats", "get_scorer", "register", "score_model", "scorer"]
