"""Training on top of :mod:`accelerate`, with safe, resumable checkpoints.

``accelerate`` places the model, handles mixed precision (bf16/fp16 autocast, loss scaling) and
gradient sync across processes. What we add:

- **Token-normalised accumulation.** The loss of one optimizer step is the mean over the completion
  tokens of all its micro-batches (not a mean of per-micro-batch means).
- **Deterministic data by step index** (:class:`~neurontune.tasks.StepBatches`), so resuming needs
  no replay of the data stream.
- **Checkpoints with nothing to unpickle.** ``checkpoints/step-NNNNNN/`` holds ``state.safetensors``
  (trainable tensors, AdamW moments, RNG state) and ``state.json`` (step, scheduler, optimizer
  hyper-parameters, log so far), written to a temporary directory and renamed in one step, so a
  kill at any moment leaves the previous checkpoint intact. Only trainable state is saved: a
  row-sparse checkpoint is the size of the adapter plus its two AdamW moments.

``resume=True`` continues from the newest checkpoint; on one process the result is bit-identical to
an uninterrupted run (tested by killing a run).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neurontune.errors import NeurontuneError
from neurontune.io import atomic_dir, atomic_path, read_json, read_safetensors, write_json, write_safetensors
from neurontune.runtime import every_outcome, fsdp_units, is_fsdp_sharded
from neurontune.tasks import IGNORE_INDEX, StepBatches, fixed_batches

CHECKPOINT_FORMAT = "neurontune.checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainArgs:
    steps: int = 40
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_accum: int = 1
    lr_scheduler: str = "constant"  # any transformers.get_scheduler name: constant, linear, cosine, ...
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16
    save_steps: int = 20  # 0: no intermediate checkpoints
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # accelerate compiles the model (TorchDynamoPlugin)
    torch_compile_backend: str = "inductor"
    ema_decay: float = 0.0  # 0: off; else the trainable parameters' exponential moving average (ParamEMA)


def mixed_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for ``precision``. ``auto``: bf16 or fp16 when the accelerate config
    asks for it (``mixed_precision:``, exported by ``accelerate launch`` as ``ACCELERATE_MIXED_PRECISION``;
    its ``no`` is also what a launch without a config exports, so it is not taken as a request), else
    bf16 on a GPU that has it and fp32 otherwise."""
    import os

    choices = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    if precision == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if launched in ("bf16", "fp16"):
            precision = launched
        else:
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision not in choices:
        raise NeurontuneError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise NeurontuneError("precision=fp16 needs a CUDA GPU (use bf16 or fp32 on CPU)")
    return choices[precision]


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Next-token targets that carry a label (what :func:`token_loss` sums over)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch``'s labelled tokens, divided by ``n_tokens``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            batch["labels"][:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        / n_tokens
    )


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over every labelled token of ``batches`` (eval mode, no gradient):
    what early stopping watches."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        total, n = 0.0, 0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            total += token_loss(model, b, 1).item()
            n += labelled_tokens(b)
    finally:
        model.train(was_training)
    return total / max(1, n)


def early_stop(
    log: Sequence[dict[str, float]],
    patience: int,
    threshold: float = 0.0,
    key: str = "val_loss",
    greater: bool = False,
) -> tuple[bool, int | None]:
    """Early stopping as a function of the log (so a resumed run decides as the run it continues did), as
    transformers' ``EarlyStoppingCallback`` counts: a measurement of ``key`` improves when it beats the best
    so far by more than ``threshold`` (below it, or above it with ``greater``: ``greater_is_better``);
    ``(stop, best step)``, ``stop`` once ``patience`` measurements in a row have not improved."""
    best, best_step, waited = math.nan, None, 0
    for row in log:
        v = row.get(key)
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            continue
        v = float(v)
        if best_step is None or (v > best + threshold if greater else v < best - threshold):
            best, best_step, waited = v, int(row["step"]), 0
        else:
            waited += 1
    return bool(patience) and waited >= patience, best_step


def best_metric(cfg: Any) -> tuple[str, bool]:
    """``(metric, greater is better)`` of early stopping (transformers' ``metric_for_best_model`` and
    ``greater_is_better``): the validation loss, or a metric of the task's evaluation; unless given,
    higher is better for every metric but a loss or a perplexity."""
    metric, greater = cfg.metric_for_best_model, cfg.greater_is_better
    return metric, (metric not in ("loss", "perplexity")) if greater is None else greater


class EarlyStopping:
    """The validation loss every ``eval_steps`` on the held-out examples, or with ``metric_for_best_model``
    a metric of the task's evaluation on them (:func:`best_metric`); the weights of its best step in
    ``path`` (trainable parameters only, rewritten atomically at each new best, so a resumed run has
    them); after training, those weights are the result (transformers' ``load_best_model_at_end``)."""

    def __init__(
        self,
        cfg: Any,
        model: torch.nn.Module,
        path: Path,
        examples: list,
        tok: Any,
        what: str = "early stopping",
        candidates: Callable[[int], bool] | None = None,
        task: Any = None,
    ) -> None:
        # cfg: early_stopping_patience / _threshold, metric_for_best_model, greater_is_better,
        # eval_batch_size, max_length (a FinetuneConfig). candidates: only the steps it allows are measured,
        # and training is never stopped (the best of them is kept: a method that trains to a target, e.g.
        # gates from the end of their ramp). task: the Task whose evaluation a metric comes from
        self.cfg, self.model, self.path, self.what = cfg, model, path, what
        self.candidates = candidates
        self.patience = 0 if candidates else cfg.early_stopping_patience
        self.metric, self.greater = best_metric(cfg)
        self.key = "val_loss" if self.metric == "loss" else f"val_{self.metric}"  # its train_log.csv column
        self.examples = len(examples)
        if self.metric == "loss":
            self.batches = (
                fixed_batches(examples, tok, cfg.eval_batch_size, cfg.max_length) if examples else []
            )
        elif task is None:
            raise ValueError(f"metric_for_best_model={self.metric}: the task to evaluate is needed")
        else:  # the task's own evaluation, on the held-out examples
            self.task, self.tok = dataclasses.replace(task, eval=list(examples)), tok
        self.initial: list[dict[str, float]] = []  # with start(): step 0, the weights before training

    def start(self, resume: bool) -> None:
        """On the main process before training: the weights it starts from become a candidate, measured as
        step 0 and kept as the first best (the result is never worse than the start by the validation
        loss). Resuming, the start's measurement is read back from the best weights' file while it holds
        step 0 (a later best makes it irrelevant: the count goes on from there as it did)."""
        if resume and self.path.is_file():
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("step") == "0" and self.key in meta:
                self.initial = [{"step": 0, self.key: float(meta[self.key])}]
            return
        self.initial = [{"step": 0, self.key: self.measure()}]
        self.watch([])

    def measure(self) -> float:
        if self.metric == "loss":
            return validation_loss(self.model, self.batches)
        from neurontune.evaluation import evaluate

        was_training = self.model.training
        try:
            results = evaluate(
                self.model, self.tok, self.task, max_length=self.cfg.max_length,
                batch_size=self.cfg.eval_batch_size,
            )  # fmt: skip
        finally:
            self.model.train(was_training)
        return float(results[self.metric])

    def on_step(self, row: dict[str, float]) -> dict[str, float] | None:
        """``train``'s ``on_step`` (main process): ``{key: value}`` every ``eval_steps`` (``val_loss``, or
        ``val_<metric>``), else None."""
        step = int(row["step"])
        if step % self.cfg.eval_steps or (self.candidates and not self.candidates(step)):
            return None
        return {self.key: self.measure()}

    def _decide(self, log: list[dict[str, float]]) -> tuple[bool, int | None]:
        return early_stop(log, self.patience, self.cfg.early_stopping_threshold, self.key, self.greater)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def watch(self, log: list[dict[str, float]]) -> bool:
        """On the main process after every step: keep a new best's weights; whether to stop."""
        log = [*self.initial, *log]
        stop, best = self._decide(log)
        if log and best is not None and best == log[-1]["step"] and self.key in log[-1]:
            tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self._trainable().items()}
            write_safetensors(self.path, tensors, {"step": str(best), self.key: repr(log[-1][self.key])})
        return stop

    @torch.no_grad()
    def restore_best(self, log: list[dict[str, float]], steps: int, state: Any) -> None:
        """Every process: the trainable parameters take the best measured step's values. The main process
        reads them and sends them to the others, which need not see its files (several machines without
        a shared disk)."""
        main, params, saved, error = state.is_main_process, self._trainable(), {}, None
        if main and self.path.is_file():
            try:
                saved = read_safetensors(self.path, "best weights of early stopping")
                if set(saved) != set(params):
                    error = f"{self.path}: its tensors are not this run's trainable parameters"
            except NeurontuneError as e:
                error = str(e)
        found = [bool(saved), error]
        if state.num_processes > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(found, src=0)
        if found[1]:
            raise NeurontuneError(found[1])
        if not found[0]:
            return
        for n, p in params.items():
            if main:
                p.copy_(saved[n].to(p.device, p.dtype))
            if state.num_processes > 1:
                dist.broadcast(p.data, src=0)
        if main:
            s = self.summary(log)
            ran = f"stopped at step {len(log)} of {steps}" if s["stopped"] else f"ran all {steps} steps"
            print(
                f"{self.what}: {ran}; the result is step {s['best_step']}'s weights "
                f"(validation {self.metric} {s['best_' + self.key]:.4f} on {self.examples} held-out examples)"
            )

    def summary(self, log: list[dict[str, float]]) -> dict[str, Any]:
        log = [*self.initial, *log]
        stop, best = self._decide(log)
        values = {int(r["step"]): float(r[self.key]) for r in log if r.get(self.key) not in (None, "")}
        return {  # best_val_loss and val_loss, or best_val_<metric> and val_<metric>
            "stopped": stop,
            "best_step": best,
            f"best_{self.key}": values.get(best) if best is not None else None,
            self.key: values,
        }


# ---- checkpoints -----------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one never has its final name)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete what a kill during a checkpoint write left behind (its temporary directory, or the old
    copy being swapped out); complete checkpoints are never touched. Returns what was removed."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.name.startswith(".step-") and p.name.endswith((".tmp", ".old"))]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def save_checkpoint(
    path: Path,
    named: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    log: list[dict[str, float]],
    rng_states: list[dict[str, torch.Tensor]] | None = None,
    num_processes: int = 1,
    write: bool = True,
    layout: Layout | None = None,
    ema: ParamEMA | None = None,
) -> None:
    """Write a checkpoint (atomically). ``rng_states``: every process's RNG state, in rank order
    (default: this process's). Under FSDP or DeepSpeed (``layout``) every process calls this (the
    shards are gathered whole, a collective) and one of them has ``write``. ``ema``: its average too
    (``ema.<name>``; unsharded runs only)."""
    layout = layout or Layout()
    index = {id(p): i for i, p in enumerate(named.values())}
    if layout.sharded:
        return _save_sharded(path, named, optimizer, scheduler, step, log, num_processes, layout, index)
    tensors = {}
    for n, p in named.items():  # in parameter order, the same on every process (the gathers pair up)
        param, moments = layout.param(p), layout.optim_state(optimizer, p)
        if write:  # a process that only takes part in the gathers keeps none of it
            tensors[f"param.{n}"] = param
            tensors.update({f"optim.{index[id(p)]}.{k}": v for k, v in moments.items()})
        del param, moments
    if not write:
        return
    for rank, rng in enumerate(rng_states or [rng_state()]):
        for k, v in rng.items():
            tensors[f"rng.{k}" if rank == 0 else f"rng.{k}.{rank}"] = v
    if ema is not None:
        tensors.update(ema.tensors(list(named)))
    groups = layout.groups(optimizer, index)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "param_names": list(named),
        "param_groups": groups,
        "scheduler": scheduler.state_dict(),
        "log": log,
        "num_processes": num_processes,
    }
    with atomic_dir(path) as tmp:
        write_safetensors(tmp / "state.safetensors", tensors, {"format": CHECKPOINT_FORMAT})
        write_json(tmp / "state.json", state)


def _shard_file(rank: int, world: int) -> str:
    return f"state.rank{rank:05d}-of-{world:05d}.safetensors"


def _save_sharded(
    path: Path, named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
    step: int, log: list[dict[str, float]], world: int, layout: Layout, index: dict[int, int],
) -> None:  # fmt: skip
    """A checkpoint as shards: every process writes its own part of each trainable tensor and its AdamW
    moments, and its RNG state, to ``state.rankRRRRR-of-NNNNN.safetensors``; nothing is gathered. FSDP2
    (accelerate's ``fsdp_state_dict_type: SHARDED_STATE_DICT``): its rows (``shard_kind`` "rows");
    ZeRO-3 on a model loaded sharded: its partition of the flattened fp32 master copy ("flat", with
    the tensors' shapes in ``state.json`` to join them). All write into one temporary
    directory, which the main process renames into place once every process has written (a failure on
    any process stops them all, and the previous checkpoint stays)."""
    import torch.distributed as dist

    from neurontune.io import make_dir, remove, swap_in

    rank, tmp = dist.get_rank(), path.with_name(f".{path.name}.tmp")
    error = None
    if rank == 0:
        try:
            remove(tmp)
            make_dir(tmp)
        except OSError as e:
            error = f"could not write {path}: {e}"
    if error := every_outcome(error):
        raise NeurontuneError(error)
    tensors = {}
    for n, p in named.items():
        tensors[f"param.{n}"] = layout.local_param(p)
        for k, v in layout.local_optim_state(optimizer, p).items():
            tensors[f"optim.{index[id(p)]}.{k}"] = v
    tensors.update({f"rng.{k}": v for k, v in rng_state().items()})
    try:
        write_safetensors(tmp / _shard_file(rank, world), tensors, {"format": CHECKPOINT_FORMAT})
    except (OSError, NeurontuneError) as e:
        error = str(e)
    if rank == 0 and not error:
        state = {
            "format": CHECKPOINT_FORMAT, "step": step, "param_names": list(named),
            "param_groups": layout.groups(optimizer, index), "scheduler": scheduler.state_dict(), "log": log,
            "num_processes": world, "shards": world, "shard_kind": layout.shard_kind,
            **({"shapes": {n: list(layout.shape(p)) for n, p in named.items()}} if layout.shard_kind == "flat" else {}),
        }  # fmt: skip
        try:
            write_json(tmp / "state.json", state)
        except OSError as e:
            error = f"could not write {path}: {e}"
    if error := every_outcome(error):
        if rank == 0:
            remove(tmp)
        raise NeurontuneError(error)
    if rank == 0:
        try:
            swap_in(tmp, path)
        except OSError as e:
            error = f"could not write {path}: {e}"
    if error := every_outcome(error):
        raise NeurontuneError(error)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, whole, as a 1-process checkpoint holds them (``param.<name>``,
    ``optim.<i>.<moment>``, ``rng.<kind>[.<rank>]``), whether it was written whole or as FSDP2 shards
    (each process's rows, joined in rank order)."""
    path = Path(path)
    state = read_json(path / "state.json", "checkpoint state")
    world = state.get("shards") if isinstance(state, dict) else None
    if not world:
        return read_safetensors(path / "state.safetensors", "checkpoint tensors")
    parts = [read_safetensors(path / _shard_file(r, world), "checkpoint shard") for r in range(world)]
    shapes = state.get("shapes") if state.get("shard_kind") == "flat" else None
    names = state.get("param_names", []) if shapes is not None else []
    out = {}
    for k, t in parts[0].items():
        if k.startswith("rng."):
            out.update({k if r == 0 else f"{k}.{r}": part[k] for r, part in enumerate(parts)})
        elif t.dim() == 0:  # AdamW's step: the same on every process
            out[k] = t
        else:
            out[k] = torch.cat([part[k] for part in parts])
            if shapes is not None:  # ZeRO-3's partitions of the flattened tensor, the last one padded
                shape = (
                    shapes[k.removeprefix("param.")]
                    if k.startswith("param.")
                    else shapes[names[int(k.split(".")[1])]]
                )
                out[k] = out[k][: math.prod(shape)].reshape(shape)
    return out


def rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def load_checkpoint(
    path: Path,
    named: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    num_processes: int = 1,
    layout: Layout | None = None,
    ema: ParamEMA | None = None,
) -> tuple[int, list[dict[str, float]]]:
    layout = layout or Layout()
    state = read_json(path / "state.json", "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NeurontuneError(f"{path}: not a neurontune checkpoint")
    if (saved_n := state.get("num_processes", 1)) != num_processes:
        raise NeurontuneError(
            f"{path} was written by a run on {saved_n} process(es); resume it on {saved_n}, not "
            f"{num_processes}: each step's examples are split by process count, so another count would "
            "change the data of every step from here on"
        )
    if state["param_names"] != list(named):
        diff = sorted(set(state["param_names"]) ^ set(named))[:3]
        raise NeurontuneError(f"{path}: trainable parameters differ from this run's (e.g. {diff})")
    # FSDP2 shards: this process's own rows under the same launch; joined whole under another layout
    sharded = (
        bool(state.get("shards")) and layout.sharded and state.get("shard_kind", "rows") == layout.shard_kind
    )
    shape = layout.local_shape if sharded else layout.shape
    if sharded:
        tensors = read_safetensors(path / _shard_file(rank, num_processes), "checkpoint shard")
    else:
        tensors = read_checkpoint(path)
    for n, p in named.items():
        if f"param.{n}" not in tensors:
            raise NeurontuneError(f"{path}: the checkpoint holds no value for {n}")
        t = tensors[f"param.{n}"]
        if t.shape != shape(p):
            raise NeurontuneError(f"{path}: {n} has shape {tuple(t.shape)}, expected {tuple(shape(p))}")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = t
    params = list(named.items())
    for i, st in opt_state.items():  # a moment of the wrong shape would fail deep inside AdamW's step
        if not 0 <= i < len(params):
            raise NeurontuneError(f"{path}: optimizer state for parameter {i}; the run has {len(params)}")
        n, p = params[i]
        for k, t in st.items():
            if k != "step" and t.shape != shape(p):
                raise NeurontuneError(
                    f"{path}: the optimizer's {k} of {n} has shape {tuple(t.shape)}, expected "
                    f"{tuple(shape(p))}"
                )
    load = layout.load_local if sharded else layout.load
    load(named, {n: tensors[f"param.{n}"] for n in named}, optimizer, opt_state, state["param_groups"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load(tensors, list(named), path)
    suffix = "" if rank == 0 or sharded else f".{rank}"
    torch.set_rng_state(tensors[f"rng.cpu{suffix}"])
    if f"rng.cuda{suffix}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])
    return int(state["step"]), list(state["log"])


def write_log_csv(path: Path, log: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    if log:  # every column any row has (val_loss only on the steps it was measured), in first-seen order
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in log for k in row)), restval="")
        w.writeheader()
        w.writerows(log)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _accelerator(mixed: str, compile_backend: str | None = None) -> Any:
    """An ``Accelerator`` (compiling the model with ``compile_backend`` if given); its process-wide state
    is reset when an earlier run in this process used another precision or compile setting (accelerate
    refuses to change them otherwise; the HF Trainer resets it the same way)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    dynamo = TorchDynamoPlugin(backend=compile_backend or "no")
    if AcceleratorState._shared_state and (
        AcceleratorState().mixed_precision != mixed
        or str(AcceleratorState().dynamo_plugin.backend) != str(dynamo.backend)
    ):
        AcceleratorState._reset_state()  # keeps PartialState: the process/distributed setup stays
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), dynamo_plugin=dynamo)
    _sharding_on_cpu(accelerator, mixed)
    return accelerator


def _sharding_on_cpu(accelerator: Any, mixed: str) -> None:
    """FSDP2 and DeepSpeed on CPU processes too. ``accelerate launch`` with an FSDP or DeepSpeed
    config selects them for GPU processes only and falls back to DDP on CPUs, although
    ``fully_shard`` runs on a gloo process group and DeepSpeed has a CPU accelerator; here
    accelerate's own FSDP2 / DeepSpeed path is switched on for them, with the plugin accelerate builds
    from its launch variables, so a CPU run shards (and is tested) as a GPU run does."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if launched_with("FSDP"):
        plugin = FullyShardedDataParallelPlugin()  # from accelerate launch's FSDP_* variables
        if plugin.fsdp_version != 2:
            raise NeurontuneError("FSDP on CPU processes needs fsdp_version: 2 (FSDP2, fully_shard)")
        state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    elif launched_with("DEEPSPEED"):
        ds = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables
        ds.set_mixed_precision(mixed)
        ds.select(_from_accelerator_state=True)
        state.deepspeed_plugins, state.distributed_type = ds, DistributedType.DEEPSPEED
        state._mixed_precision = "no"  # DeepSpeed's config carries the precision, as accelerate does
        accelerator.deepspeed_engine_wrapped = None


def train_args(cfg: Any, **overrides: Any) -> TrainArgs:
    """The run's :class:`TrainArgs` (``overrides`` for a second training, e.g. gates' recovery)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{**fields, **overrides})


def asked_processes_not_started() -> int | None:
    """``accelerate launch --cpu --num_processes N`` starts one process whatever N is (its simple launcher):
    the N asked for, read from the launcher's command line, when this process is alone; else ``None``."""
    import os

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, a in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = (
                a.split("=", 1)[1]
                if a.startswith(flag + "=")
                else argv[i + 1]
                if a == flag and i + 1 < len(argv)
                else None
            )
            if value is not None and value.isdigit() and int(value) > 1:
                return int(value)
    return None


def launched_with(kind: str) -> bool:
    """Whether ``accelerate launch`` was given an FSDP or DeepSpeed config (``kind``: ``"FSDP"`` or
    ``"DEEPSPEED"``), read as accelerate reads it: ``ACCELERATE_USE_<kind>=true``."""
    import os

    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def launched_zero_stage() -> int | None:
    """The ZeRO stage of an ``accelerate launch`` with a DeepSpeed config (its config file's, else the
    one accelerate exports; accelerate's default is 2); ``None`` without DeepSpeed."""
    import json
    import os

    if not launched_with("DEEPSPEED"):
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path.lower() != "none":
        try:
            stage = (
                json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage")
            )
        except (OSError, ValueError) as e:
            raise NeurontuneError(f"DeepSpeed config {path}: {e}") from None
        return int(stage) if isinstance(stage, int) else None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def _sharded_state_dict(accelerator: Any) -> bool:
    """Whether the FSDP launch asks for sharded checkpoints (``fsdp_state_dict_type: SHARDED_STATE_DICT``,
    accelerate's default for FSDP2), not whole ones (``FULL_STATE_DICT``)."""
    kind = accelerator.state.fsdp_plugin.state_dict_type
    return getattr(kind, "name", str(kind)).upper().endswith("SHARDED_STATE_DICT")


def _is_fsdp(accelerator: Any) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def launched_min_num_params() -> int | None:
    """``fsdp_min_num_params`` of an ``accelerate launch`` with an FSDP config whose
    ``fsdp_auto_wrap_policy`` is ``SIZE_BASED_WRAP`` (as accelerate exports them); ``None`` otherwise."""
    import os

    if not launched_with("FSDP") or os.environ.get("FSDP_AUTO_WRAP_POLICY", "") != "SIZE_BASED_WRAP":
        return None
    try:
        return int(os.environ.get("FSDP_MIN_NUM_PARAMS", "0")) or None
    except ValueError:
        raise NeurontuneError(
            f"fsdp_min_num_params {os.environ['FSDP_MIN_NUM_PARAMS']!r} is not an integer"
        ) from None


def _fsdp2_kwargs(accelerator: Any) -> dict:
    """The options accelerate's ``fsdp2_prepare_model`` gives ``fully_shard`` for each unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    return {
        "reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }  # fmt: skip


def wrap_by_size(model: torch.nn.Module, accelerator: Any) -> bool:
    """accelerate's ``SIZE_BASED_WRAP`` for FSDP2, done here: bottom-up, every module of more than
    ``fsdp_min_num_params`` parameters (its children's included) that holds some not yet in a unit
    becomes one, so that FSDP2 gathers at most about one large linear layer at a time rather than a
    decoder layer. Unlike accelerate's walk, a PEFT layer and its base layer are one unit: the row
    layers' ``fused``/``merged`` forms compute with the base weight directly, outside the base
    layer's forward, where FSDP would not have gathered it. Returns whether the launch asked for this
    policy (then ``fsdp2_prepare_model`` must wrap only the embedding, the head and the root)."""
    from accelerate.utils.other import get_module_children_bottom_up
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not size_based_auto_wrap_policy or not plugin.min_num_params:
        return False
    if accelerator.mixed_precision != "no":  # fp32 trainable parameters, as fsdp2_prepare_model makes them
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
    layers = [
        m for m in model.modules()
        if isinstance(m, BaseTunerLayer) or isinstance(getattr(m, "base_layer", None), torch.nn.Module)
    ]  # fmt: skip
    inside = {id(c) for m in layers for c in m.modules() if c is not m}
    managed = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    # what fsdp2_prepare_model makes units of itself afterwards (the embedding, the final norm and the
    # head) must not be swallowed by a unit made here: sharded twice, fully_shard fails ("value was None").
    # So a module holding one of them whose parameters are not in a unit yet is left to the root (under
    # method=full the decoder stack, whose own parameters are the embedding and final norm besides its layers)
    try:
        from accelerate.utils.fsdp_utils import _find_final_norm
    except ImportError:  # an accelerate that carves no tail leaves the norm to the root unit
        _find_final_norm = None
    carved = [
        getattr(model, "get_input_embeddings", lambda: None)(),
        getattr(model, "get_output_embeddings", lambda: None)(),
        _find_final_norm(model) if _find_final_norm is not None else None,
    ]
    names = {id(m): n for n, m in model.named_modules()}
    carved_names = [names[id(m)] for m in carved if isinstance(m, torch.nn.Module) and id(m) in names]
    kwargs = _fsdp2_kwargs(accelerator)
    for module in get_module_children_bottom_up(model)[:-1]:
        if id(module) in inside or isinstance(module, FSDPModule):
            continue
        prefix = names[id(module)] + "."
        if any(
            c.startswith(prefix) and any(id(p) not in managed for p in model.get_submodule(c).parameters())
            for c in carved_names
        ):  # holds some of what accelerate carves, not in a unit yet
            continue
        params = list(module.parameters())
        if sum(p.numel() for p in params) <= plugin.min_num_params or all(id(p) in managed for p in params):
            continue
        fully_shard(module, **kwargs)
        managed |= {id(p) for p in module.parameters()}  # fully_shard replaced them by their shards
    return True


@contextlib.contextmanager
def _no_auto_wrap(accelerator: Any):
    """``accelerator.prepare`` with the FSDP plugin's auto-wrap policy off: the units are made already."""
    plugin = accelerator.state.fsdp_plugin
    policy, plugin.auto_wrap_policy = plugin.auto_wrap_policy, None
    try:
        yield
    finally:
        plugin.auto_wrap_policy = policy


def shard_model(model: torch.nn.Module, args: TrainArgs) -> torch.nn.Module:
    """``fully_shard`` ``model`` now, as :func:`train`'s ``accelerate.prepare`` would (accelerate's FSDP2
    plugin from the launch config, the run's precision), for a model loaded without its weights
    (:mod:`neurontune.sharded`): each process then fills its own shards from the checkpoint. A model
    sharded before :func:`train` stays sharded after it (its caller evaluates and saves it sharded)."""
    from accelerate.utils import fsdp2_prepare_model

    accelerator = _accelerator(
        mixed_precision(args.precision), args.torch_compile_backend if args.torch_compile else None
    )
    if not _is_fsdp(accelerator):
        raise NeurontuneError(
            "a sharded load needs an FSDP2 launch (accelerate launch --config_file fsdp2.yaml)"
        )
    # accelerate's own low-memory load broadcasts rank 0's whole copy; the checkpoint is read per shard instead
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
    from torch.distributed.fsdp import fully_shard

    from neurontune.sharded import embedding_pieces

    for piece in embedding_pieces(model):  # a unit each, with the options accelerate gives the others
        fully_shard(piece, **_fsdp2_kwargs(accelerator))
    if not wrap_by_size(model, accelerator):
        return fsdp2_prepare_model(accelerator, model)
    with _no_auto_wrap(accelerator):
        return fsdp2_prepare_model(accelerator, model)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a whole tensor, the same on every process) laid out as ``like``: its shard if ``like`` is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return t


def _unshard_for_good(model: torch.nn.Module) -> None:
    """After FSDP2 training, make ``model`` a plain module again: every process gathers each shard
    whole (a collective), the parameters become ordinary ones and FSDP's hooks come off, so evaluation
    and saving (``state_dict``, ``save_pretrained``) on the main process alone need no collective.
    Costs the whole model's memory per process, as loading it did. torch has no public inverse of
    ``fully_shard``: the class swap and the hooks it added (recognised by their module) are undone."""
    from torch.distributed.fsdp import FSDPModule

    every = list(model.named_parameters(remove_duplicate=False))  # tied weights: one shard, several names
    whole: dict[int, torch.nn.Parameter] = {}
    for _, p in every:
        if id(p) not in whole:
            whole[id(p)] = torch.nn.Parameter(_full(p.detach()), requires_grad=p.requires_grad)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
        for hooks in (m._forward_pre_hooks, m._forward_hooks, m._state_dict_pre_hooks, m._state_dict_hooks,
                      m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks):  # fmt: skip
            for key in [k for k, fn in hooks.items() if _from_fsdp(fn)]:
                del hooks[key]
    _put_parameters(model, every, whole)


def _put_parameters(
    model: torch.nn.Module, every: list[tuple[str, torch.nn.Parameter]], whole: dict[int, torch.nn.Parameter]
) -> None:
    """Register ``whole[id(p)]`` under every name ``p`` had (tied weights stay tied)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, p in every:
        owner, _, attr = name.rpartition(".")
        modules[owner]._parameters[attr] = whole[id(p)]


def _from_fsdp(fn: Any) -> bool:
    fn = getattr(fn, "hook", fn)  # load_state_dict pre-hooks are wrapped
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__module__", "").startswith("torch.distributed.fsdp")


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _configure_deepspeed(
    accelerator: Any, batch_size: int, args: TrainArgs, block: int = 0, hidden: int = 0, module: int = 0
) -> int:
    """Our loop's batch, accumulation and clipping in the DeepSpeed config (its "auto" values are
    filled from a dataloader, which we do not hand to accelerate). Unless the config sets them: the
    buckets sized from the model's ``hidden`` size as accelerate fills their "auto" (reduce bucket
    hidden², ZeRO-3 prefetch bucket 0.9 hidden², parameters of under 10 hidden kept whole), where
    DeepSpeed's own defaults (5e8, 5e7, 1e5) prefetch 50M parameters ahead; under ZeRO-3 the gathered
    parameters kept for reuse are capped at one of the model's blocks (``block``: a decoder layer's
    parameters), enough to keep a layer gathered from its recomputation (gradient checkpointing) to its
    backward without gathering it again, and those kept live (which bounds the prefetch) at what the
    reuse keeps or, where that is less, two of the largest modules (``module``: the one computing and
    the next; one, with ``stage3_prefetch_bucket_size: 0``). A config with ``stage3_max_reuse_distance: 0``
    gathers every layer again for its backward, as FSDP2 units of one projection do, and with no prefetch
    too it holds one projection gathered at a time, for the most capacity
    (``examples/deepspeed/zero3_capacity.json``). DeepSpeed's default, 1e9 each, keeps most
    of a 1B model gathered on every process (measured: 2 processes at the Llama-3.2-1B shape peaked at
    8,753 MiB each, above one process's 6,077 MiB); two blocks held about three once the trace was
    recorded (the prefetch overshoots by a parameter). Measured at that shape on 4 processes, the
    training peak: 2,774 MiB with two blocks, 2,742 with one, 2,293 with one and the embedding in
    pieces of one projection (``train``). Returns the ZeRO stage."""
    conf = accelerator.state.deepspeed_plugin.deepspeed_config
    conf.update(
        train_micro_batch_size_per_gpu=batch_size,
        gradient_accumulation_steps=args.grad_accum,
        train_batch_size=batch_size * args.grad_accum * accelerator.num_processes,
        gradient_clipping=args.max_grad_norm,
        zero_allow_untested_optimizer=True,  # torch's AdamW, as with every other backend
    )
    zero = conf.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise NeurontuneError(f"DeepSpeed ZeRO stage {stage}: use stage 2 or 3")
    sizes = {"reduce_bucket_size": hidden * hidden} if hidden else {}
    if stage == 3:
        if hidden:
            sizes.update(
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                stage3_param_persistence_threshold=10 * hidden,
            )
        if block:
            sizes.update(stage3_max_reuse_distance=block)
    for key, value in sizes.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    if stage == 3 and block and zero.get("stage3_max_live_parameters", "auto") == "auto":
        try:
            reuse = int(zero["stage3_max_reuse_distance"])
        except (TypeError, ValueError):
            raise NeurontuneError(
                f"DeepSpeed config: stage3_max_reuse_distance {zero['stage3_max_reuse_distance']!r} is not a number"
            ) from None
        try:  # with no prefetch (a bucket of 0) only the module computing is gathered beyond the reuse
            prefetch = zero.get("stage3_prefetch_bucket_size", "auto")
            ahead = 2 if prefetch == "auto" or float(prefetch) > 0 else 1
        except (TypeError, ValueError):
            raise NeurontuneError(
                f"DeepSpeed config: stage3_prefetch_bucket_size {zero['stage3_prefetch_bucket_size']!r} is not a number"
            ) from None
        zero["stage3_max_live_parameters"] = max(reuse, ahead * module)
    return stage


def _register_base_weights(model: torch.nn.Module) -> None:
    """Under ZeRO-3, tell DeepSpeed that each PEFT layer reads its base layer's parameters itself (the
    row layers' ``fused``/``merged`` forms compute with the base weight without calling the base
    layer), so it gathers them for the layer's forward and backward."""
    import deepspeed

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Module) and module is not base:
            for p in base.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(module, p)


def _gather_deepspeed_for_good(engine: Any) -> None:
    """After ZeRO-3 training, give the module whole parameters and take DeepSpeed's hooks off, so the
    main process alone can evaluate and save it (ZeRO-2 keeps whole parameters already)."""
    module = engine.module
    every = list(module.named_parameters(remove_duplicate=False))
    if not any(hasattr(p, "ds_id") for _, p in every):
        return
    import deepspeed

    whole: dict[int, torch.nn.Parameter] = {}
    params = list({id(p): p for _, p in every}.values())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            whole[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    engine.destroy()  # removes ZeRO-3's module hooks
    _put_parameters(module, every, whole)


class Layout:
    """Where the trainable state lives, for checkpoints: whole on every process (one process, DDP) or
    as FSDP2 shards (DTensors; gathered whole to save, split again to load)."""

    collective = False  # whether saving gathers across processes (then every process saves, rank 0 writes)
    sharded = False  # whether every process writes its own shards instead (FSDP2, SHARDED_STATE_DICT)
    shard_kind = "rows"  # what a shard holds: its rows of each tensor (FSDP2), or a flat partition (ZeRO-3)

    def shape(self, p: torch.Tensor) -> torch.Size:
        return p.shape

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This process's part of ``t`` (its FSDP2 shard), else ``t``."""
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    def local_shape(self, p: torch.Tensor) -> torch.Size:
        return self.local(p).shape

    def local_param(self, p: torch.Tensor) -> torch.Tensor:
        """This process's part of ``p`` for a sharded checkpoint, on the CPU."""
        return self.local(p).detach().cpu().contiguous()

    def local_optim_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            k: self.local(torch.as_tensor(v)).detach().cpu().contiguous()
            for k, v in optimizer.state.get(p, {}).items()
        }

    def param(self, p: torch.Tensor) -> torch.Tensor:
        return _full(p.detach())

    def optim_state(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: _full(torch.as_tensor(v)) for k, v in optimizer.state.get(p, {}).items()}

    def groups(self, optimizer: torch.optim.Optimizer, index: dict[int, int]) -> list[dict[str, Any]]:
        """AdamW's groups: hyper-parameters, and their parameters as indices into the trainable ones."""
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]

    def load(
        self, named: dict[str, torch.nn.Parameter], params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
        opt_state: dict[int, dict[str, torch.Tensor]], groups: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(_shard_like(params[n], p))
        like = list(named.values())
        for i, st in opt_state.items():
            for k, t in st.items():
                st[k] = _shard_like(t, like[i]) if t.shape == like[i].shape else t
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


class FSDPLayout(Layout):
    collective = True

    def __init__(self, sharded: bool = False) -> None:
        self.sharded = sharded

    def load_local(
        self, named: dict[str, torch.nn.Parameter], params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
        opt_state: dict[int, dict[str, torch.Tensor]], groups: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        """Load this process's own shards (:func:`_save_sharded`): no collective."""
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            for n, p in named.items():
                self.local(p).copy_(params[n])
        like = list(named.values())
        for i, st in opt_state.items():
            p = like[i]
            for k, t in st.items():
                if isinstance(p, DTensor) and t.dim():
                    st[k] = DTensor.from_local(
                        t.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


class DeepSpeedLayout(Layout):
    """ZeRO-2/3 (DeepSpeed): the fp32 parameters and Adam moments live in DeepSpeed's flat partitions;
    its ``safe_get/set_full_*`` functions read and write them per parameter (collectives)."""

    collective = True
    MOMENTS = ("exp_avg", "exp_avg_sq")

    shard_kind = "flat"

    def __init__(self, optimizer: Any, members: list[list[int]], sharded: bool = False) -> None:
        self.base = optimizer  # DeepSpeed's ZeRO optimizer; .optimizer is ours, over the flat partitions
        self.members = members  # each group's parameters (indices), from before DeepSpeed flattened them
        # ZeRO-3 on a model loaded sharded: every process writes its partition of the fp32 master copy and
        # of the moments (method=full: gathered, they would be three times the model, whole, everywhere)
        self.sharded = sharded

    def local_shape(self, p: torch.Tensor) -> torch.Size:
        return torch.Size([p.ds_tensor.numel()])  # the partition, flattened (the last one padded)

    def local_param(self, p: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p).detach().cpu().clone()

    def local_optim_state(self, optimizer: Any, p: torch.Tensor) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_local_optimizer_state

        out = {k: safe_get_local_optimizer_state(p, k) for k in self.MOMENTS} if self._has_state() else {}
        out = {k: v.detach().cpu().clone() for k, v in out.items() if v is not None}
        return {**out, "step": torch.tensor(self._step())} if out else {}

    def _has_state(self) -> bool:
        return any(self.base.optimizer.state.get(f) for f in self._flats())

    def _flats(self) -> list[torch.Tensor]:
        flats = getattr(self.base, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        return flats or getattr(self.base, "single_partition_of_fp32_groups", [])  # ZeRO-2

    def _create_state(self) -> None:
        """ZeRO-3 leaves AdamW's state to its first step: create it, to fill it."""
        inner = self.base.optimizer
        for flat in self._flats():
            if not inner.state[flat]:
                inner.state[flat].update(
                    step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat)
                )
        if hasattr(self.base, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2 links it after a first step
            self.base._lazy_init_hp_params_optimizer_state()

    def _set_steps(self, opt_state: dict[int, dict[str, torch.Tensor]], groups: list[dict[str, Any]]) -> None:
        steps = [float(st["step"]) for st in opt_state.values() if "step" in st]
        for st in self.base.optimizer.state.values():
            if "step" in st and steps:
                st["step"] = torch.tensor(max(steps))  # every parameter has taken the same steps
        for group, saved in zip(self.base.optimizer.param_groups, groups, strict=False):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def load_local(self, named, params, optimizer, opt_state, groups) -> None:  # type: ignore[no-untyped-def]
        """Load this process's own partitions (:func:`_save_sharded`): no collective."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        self._create_state()
        with torch.no_grad():
            for i, (n, p) in enumerate(named.items()):
                value = params[n].to(p.ds_tensor.device)
                safe_set_local_fp32_param(p, value)  # the fp32 master copy
                p.ds_tensor.copy_(value.to(p.ds_tensor.dtype))  # and the module's own, until the next step
                for k in self.MOMENTS:
                    if k in opt_state.get(i, {}):
                        safe_set_local_optimizer_state(p, opt_state[i][k].to(p.ds_tensor.device), k)
        self._set_steps(opt_state, groups)

    def groups(self, optimizer: Any, index: dict[int, int]) -> list[dict[str, Any]]:
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "params": m}
            for g, m in zip(self.base.optimizer.param_groups, self.members, strict=True)
        ]

    def shape(self, p: torch.Tensor) -> torch.Size:
        return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps an empty placeholder in the module

    def param(self, p: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().cpu().reshape(self.shape(p))

    def _step(self) -> float:
        states = [st for st in self.base.optimizer.state.values() if "step" in st]
        return float(states[0]["step"]) if states else 0.0

    def optim_state(self, optimizer: Any, p: torch.Tensor) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {k: safe_get_full_optimizer_state(p, k) for k in self.MOMENTS}
        out = {k: v.detach().cpu().reshape(self.shape(p)) for k, v in out.items() if v is not None}
        return {**out, "step": torch.tensor(self._step())} if out else {}

    def load(self, named, params, optimizer, opt_state, groups) -> None:  # type: ignore[no-untyped-def]
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._create_state()
        import deepspeed

        for i, (n, p) in enumerate(named.items()):
            safe_set_full_fp32_param(p, params[n].to(p.device))  # the fp32 master copy
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(params[n].reshape(p.data.shape))  # and the module's own, until the next step
            for k in self.MOMENTS:
                if k in opt_state.get(i, {}):
                    safe_set_full_optimizer_state(p, opt_state[i][k].to(p.device), k)
        self._set_steps(opt_state, groups)


EMA_SHARDED = (
    "ema_decay: not under FSDP or DeepSpeed (the average would have to be sharded like the parameters); "
    "train without it, or on one process or DDP"
)


class ParamEMA:
    """An exponential moving average of the trainable parameters (Polyak averaging; what timm's ModelEmaV3
    and TensorFlow's ``ExponentialMovingAverage`` keep): after each optimizer step ``t`` (from 1) the
    average moves towards the parameters by ``1 - d``, ``d = min(decay, (1 + t) / (10 + t))`` (the warm-up of
    both: an average of the first steps does not stay near the start). :meth:`applied` swaps it into the
    parameters (evaluation, early stopping's best weights); :meth:`copy_to` makes it the result."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {
            f"ema.{n}": s.detach().to("cpu", copy=True).contiguous()
            for n, s in zip(names, self.shadow, strict=True)
        }
        return out | {"ema_updates": torch.tensor(self.updates)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], names: list[str], where: Path) -> None:
        missing = [n for n in names if f"ema.{n}" not in tensors]
        if missing or "ema_updates" not in tensors:
            raise NeurontuneError(
                f"{where}: the checkpoint holds no moving average (ema_decay) of {missing[:1] or 'the steps'}; "
                "resume with the ema_decay it was written with"
            )
        for n, s in zip(names, self.shadow, strict=True):
            t = tensors[f"ema.{n}"]
            if t.shape != s.shape:
                raise NeurontuneError(
                    f"{where}: the average of {n} has shape {tuple(t.shape)}, not {tuple(s.shape)}"
                )
            s.copy_(t.to(s.device, s.dtype))
        self.updates = int(tensors["ema_updates"])


class TrainingDiverged(NeurontuneError):
    """The loss or the gradients stopped being finite."""


def _diverged(
    step: int, loss: float, grad_norm: float, lr: float, out: Path | None, updated: bool = False
) -> None:
    ckpts = list_checkpoints(out) if out is not None else []
    kept = f"the last good checkpoint, {ckpts[-1]}, is kept" if ckpts else "no checkpoint was written"
    when = "after DeepSpeed's update" if updated else "before the update"
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g} (lr {lr:g}); "
        f"stopped {when}, nothing from this step was saved and {kept}. Lower lr (or set "
        "max_grad_norm) and start again with --overwrite"
    )


def _sum_over_processes(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def _gather_rng_states(accelerator: Any) -> list[dict[str, torch.Tensor]]:
    if accelerator.num_processes == 1:
        return [rng_state()]
    from accelerate.utils import gather_object

    return gather_object([rng_state()])


# ---- the loop --------------------------------------------------------------------------------------
def make_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs) -> torch.optim.lr_scheduler.LambdaLR:
    """``args.lr_scheduler`` (a transformers.get_scheduler name) over ``args.steps`` after ``args.warmup_steps``,
    for every parameter group but those marked ``"lr_scheduler": "constant"``, which keep their rate from the
    first step (gates: CoFi trains its masks with an optimizer of their own, at a constant rate, while the
    model's rate decays)."""
    from transformers import get_scheduler

    try:
        scheduler = get_scheduler(
            args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps
        )
    except ValueError as e:
        raise NeurontuneError(f"lr_scheduler {args.lr_scheduler!r}: {e}") from None
    constant = [g.get("lr_scheduler") == "constant" for g in optimizer.param_groups]
    if not any(constant):
        return scheduler
    # LambdaLR takes a function per group: the schedule's, or a constant rate (from each group's initial_lr,
    # which the first scheduler recorded)
    lambdas = [_constant_rate if c else scheduler.lr_lambdas[i] for i, c in enumerate(constant)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _constant_rate(step: int) -> float:
    return 1.0


def train(
    model: torch.nn.Module,
    data: StepBatches,
    args: TrainArgs,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    param_groups: list[dict[str, Any]] | None = None,
    regularization: Callable[[int], torch.Tensor] | None = None,
    step_stats: Callable[[], dict[str, float]] | None = None,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor], int], torch.Tensor] | None = None,
    count_fn: Callable[[dict[str, torch.Tensor]], int] | None = None,
    on_step: Callable[[dict[str, float]], dict[str, float] | None] | None = None,
    on_prepared: Callable[[torch.nn.Module], None] | None = None,
    stop_when: Callable[[list[dict[str, float]]], bool] | None = None,
) -> list[dict[str, float]]:
    """Run ``args.steps`` optimizer steps over the trainable parameters; returns one log row per step.

    With ``output_dir``, checkpoints go to ``output_dir/checkpoints`` every ``save_steps`` steps and
    ``train_log.csv`` is kept up to date; ``resume`` continues from the newest checkpoint there.
    ``param_groups`` (default: every trainable parameter at ``args.lr``) are AdamW's groups;
    ``regularization(step)`` (``step``: the optimizer step, from 0) is added to the loss once per step; ``step_stats()`` adds numbers to each log row.
    ``on_prepared(model)`` runs on every process once the model is sharded (and, built without its
    weights, filled), before the first step: a sharded load evaluates it there.
    ``loss_fn(model, batch, n)`` (default :func:`token_loss`) is a micro-batch's summed loss divided by
    ``n``, the step's count of ``count_fn(batch)`` (default: labelled next tokens) over all its
    micro-batches and processes. ``on_step(row)`` sees every log row on the main process (trackers);
    numbers it returns join the row (a validation loss). ``stop_when(log)``, asked on the main process
    after every step (and once on resuming), ends training early on every process, after a checkpoint.
    """
    loss_fn = loss_fn or token_loss
    count_fn = count_fn or labelled_tokens
    from neurontune.sharded import (
        keep_zero3_release,
        largest_block,
        largest_block_module,
        split_embeddings,
        weight_source,
        zero3_fill,
        zero3_partition,
    )

    accelerator = _accelerator(
        mixed_precision(args.precision), args.torch_compile_backend if args.torch_compile else None
    )
    fsdp, ds = _is_fsdp(accelerator), _is_deepspeed(accelerator)
    if args.ema_decay and (fsdp or ds):
        raise NeurontuneError(EMA_SHARDED)
    sharded_before = fsdp and is_fsdp_sharded(model)  # by shard_model: the caller keeps it sharded
    # built without its weights (neurontune.sharded): ZeRO-3 partitions it, each process fills its own
    # partitions, and it stays partitioned after training (its caller evaluates and saves it so)
    empty = weight_source(model) is not None and not sharded_before
    block_module = largest_block_module(model, weight_source(model).base_keys) if empty else 0
    if empty and ds:  # DeepSpeed gathers module by module: the embedding and head a piece at a time, none
        # larger than the largest module of a layer (an MLP projection). Pieces of a whole layer's size
        # cost about twice that while they are gathered: with 4 of Llama-3.2-1B's layers on 2 processes
        # the first step's peak was a piece's all-gather, 2,073 MiB, and 1,887 with pieces of a projection.
        # Cut before the trainable parameters are listed: method=full trains the pieces
        split_embeddings(model, block_module)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise NeurontuneError("the model has no trainable parameters")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups if param_groups is not None else [{"params": list(named.values())}]
    if (fsdp or ds) and getattr(model, "hf_quantizer", None) is not None:
        raise NeurontuneError(
            "FSDP and DeepSpeed do not shard a quantized (bitsandbytes) base here; use DDP (no FSDP or "
            "DeepSpeed config)"
        )
    units_made = sharded_before
    if fsdp and not sharded_before:
        names = {id(p): n for n, p in model.named_parameters()}
        if units_made := wrap_by_size(model, accelerator):  # the optimizer gets the shards
            now = dict(model.named_parameters())
            named = {n: now[n] for n in named}
            groups = [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args)
    # the rate logged: the first group's that follows the schedule
    logged = next((i for i, g in enumerate(optimizer.param_groups) if g.get("lr_scheduler") != "constant"), 0)
    # the scheduler is stepped here, once per optimizer step: accelerate's wrapper would step it once
    # per process, as it assumes a dataloader it sharded itself
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
    stage = (
        _configure_deepspeed(
            accelerator, data.batch_size, args, largest_block(model), hidden, largest_block_module(model)
        )
        if ds
        else 0
    )
    ds_zero = dict(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]) if ds else {}

    if empty and stage != 3:
        raise NeurontuneError("a model built without its weights trains under FSDP2 or DeepSpeed ZeRO-3 only")
    if stage == 3:
        _register_base_weights(model)
    if empty:
        zero3_partition(model, accelerator.state.deepspeed_plugin.deepspeed_config)
    index = {id(p): i for i, p in enumerate(named.values())}
    members = [[index[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    # prepare() leaves an FSDP module as it is, but would look for the layers to wrap
    with _no_auto_wrap(accelerator) if units_made else contextlib.nullcontext():
        model, optimizer = accelerator.prepare(model, optimizer)
    layout: Layout = (
        FSDPLayout(_sharded_state_dict(accelerator))
        if fsdp
        else DeepSpeedLayout(optimizer.optimizer, members, sharded=empty)
        if ds
        else Layout()
    )
    if stage == 3:
        keep_zero3_release(accelerator.unwrap_model(model), model)
    if empty:
        zero3_fill(accelerator.unwrap_model(model))
    if on_prepared is not None:
        on_prepared(accelerator.unwrap_model(model))
    if fsdp:  # fully_shard replaced each parameter by its shard (a DTensor), the optimizer's too
        from accelerate.utils import fsdp2_canonicalize_names

        sharded = fsdp2_canonicalize_names(dict(accelerator.unwrap_model(model).named_parameters()))
        named = {n: sharded[n] for n in named}
    out = Path(output_dir) if output_dir is not None else None
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if fsdp and main:
        units = fsdp_units(accelerator.unwrap_model(model))
        print(
            f"FSDP2: parameters and optimizer state sharded over {world} processes, in {len(units)} units "
            f"of at most {max(units.values(), default=0):,} parameters"
        )
    if ds and main:
        zero = ds_zero
        kept = (
            f", at most {int(zero['stage3_max_live_parameters']):,} parameters gathered "
            f"({int(zero['stage3_max_reuse_distance']):,} kept for reuse)"
            if stage == 3 and "stage3_max_live_parameters" in zero
            else ""
        )
        print(f"DeepSpeed ZeRO-{stage}: sharded over {world} processes{kept}")

    start, log = 0, []
    if out is not None and main:
        remove_partial_checkpoints(out)
    accelerator.wait_for_everyone()
    ema = ParamEMA(list(named.values()), args.ema_decay) if args.ema_decay else None
    if resume and out is not None and (ckpts := list_checkpoints(out)):
        start, log = load_checkpoint(
            ckpts[-1], named, optimizer.optimizer, scheduler, rank, world, layout, ema
        )
        if main:
            print(f"resumed from {ckpts[-1]} (step {start}/{args.steps})")

    def stopping() -> bool:  # the main process decides (it holds the validation losses), all follow
        if stop_when is None:
            return False
        return _sum_over_processes(accelerator, float(main and stop_when(log))) > 0

    # with ema_decay the moving average is what is measured and kept: on_step's evaluations, early
    # stopping's best weights (stop_when) and, after the last step, the result
    averaged = ema.applied if ema is not None else contextlib.nullcontext

    model.train()
    with averaged():
        resumed_done = bool(start) and stopping()
    todo = range(0) if resumed_done else range(start, args.steps)  # continued: had it stopped early?
    bar = tqdm(todo, desc="train", disable=not (progress and main), initial=start, total=args.steps)
    for step in bar:
        t0 = time.perf_counter()
        # data parallel: the step's grad_accum x world micro-batches, each process its own share, so
        # N processes step exactly as one process with grad_accum x N (the same examples, the same loss)
        first = (step * world + rank) * args.grad_accum
        micro = [data[first + j] for j in range(args.grad_accum)]
        n_tokens = sum(count_fn(b) for b in micro)
        n_tokens = max(1, int(_sum_over_processes(accelerator, n_tokens)))
        total, reg = 0.0, 0.0
        for j, b in enumerate(micro):
            b = {k: v.to(accelerator.device) for k, v in b.items()}
            last = j == len(micro) - 1
            with contextlib.nullcontext() if last or ds else accelerator.no_sync(model):
                loss = loss_fn(model, b, n_tokens)
                total += loss.item()
                # the gradient sync averages over processes; the loss is a sum over all of them
                loss = loss * world
                if last and regularization is not None:
                    penalty = regularization(step)  # the same on every process, so the average is itself
                    reg = penalty.item()
                    loss = loss + penalty
                if ds:  # DeepSpeed divides by its accumulation steps; the loss is already normalised
                    model.backward(loss * args.grad_accum)
                    if not last:
                        # DeepSpeed owns the accumulation: a step() after every micro-batch, which updates
                        # only at its boundary (every grad_accum-th call; it counts the calls itself)
                        model.step()
                else:
                    accelerator.backward(loss)
        total = _sum_over_processes(accelerator, total)
        # the norm is computed either way (max_norm=inf clips nothing), to catch a diverging run
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        lr = scheduler.get_last_lr()[logged]
        if ds:  # DeepSpeed clips (gradient_clipping) and updates in one call; its norm comes after
            if not model.is_gradient_accumulation_boundary():
                raise RuntimeError("DeepSpeed's accumulation boundary is not the step's last micro-batch")
            model.step()
            grad_norm = float(model.get_global_grad_norm() or 0.0)
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                _diverged(step + 1, total, grad_norm, lr, out, updated=True)
        else:
            grad_norm = accelerator.clip_grad_norm_(list(named.values()), max_norm).item()
            # fp16's loss scaler expects (and skips) steps with inf gradients; a non-finite loss is fatal
            if not math.isfinite(total) or (
                not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16"
            ):
                _diverged(step + 1, total, grad_norm, lr, out)
            optimizer.step()
        if ema is not None:
            ema.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens}
        if regularization is not None:
            row["penalty"] = reg
        with averaged():
            if step_stats is not None:
                row.update(step_stats())
            log.append({**row, "seconds": time.perf_counter() - t0})
            if on_step is not None and main:
                log[-1].update(on_step(log[-1]) or {})
            stop = stopping()
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        if out is not None and (
            (args.save_steps and done % args.save_steps == 0) or done == args.steps or stop
        ):
            rngs = _gather_rng_states(accelerator)
            if main or layout.collective:  # sharded: every process takes part in gathering
                save_checkpoint(
                    out / "checkpoints" / f"step-{done:06d}", named, optimizer.optimizer, scheduler, done, log,
                    rngs, world, write=main, layout=layout, ema=ema,
                )  # fmt: skip
            if main:
                for old in list_checkpoints(out)[: -max(1, args.save_total_limit)]:
                    shutil.rmtree(old, ignore_errors=True)
                write_log_csv(out / "train_log.csv", log)
            accelerator.wait_for_everyone()
        if stop:
            break
    if out is not None and main:
        write_log_csv(out / "train_log.csv", log)
    if ema is not None:
        ema.copy_to()
    if fsdp and not sharded_before:
        _unshard_for_good(accelerator.unwrap_model(model))
    if ds and not empty:
        _gather_deepspeed_for_good(model)
    # prepare() wrapped the model's forward in autocast (bf16/fp16 training); take that off again, so that
    # an evaluation after training runs in the precision of the one before it (the model's own dtype)
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    plain.eval()
    if args.gradient_checkpointing:
        plain.gradient_checkpointing_disable()
    return log
