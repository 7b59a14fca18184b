"""What every layer needs of the run's process and model: this process's device and distributed state
(accelerate's ``PartialState``) and parameter counts. Below :mod:`neurontune.methods` and
:mod:`neurontune.pipeline`, so that methods never import the orchestrator."""

from __future__ import annotations

import os
from typing import Any

import torch

from neurontune.errors import NeurontuneError


def device() -> str:
    """This process's device: its own GPU under torchrun / accelerate launch, else cuda or cpu."""
    return str(process_state().device)


def process_state() -> Any:
    """accelerate's ``PartialState``: this process's rank and device, the process group if launched
    with several (torchrun, accelerate launch), and a barrier. One process: rank 0 of 1."""
    from accelerate import PartialState

    # cpu=True is what makes accelerate start a gloo process group for CPU-only processes
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:  # N copies that would all act as rank 0
        raise NeurontuneError(
            f"launched as one of {launched} processes, but no process group of {launched} started "
            f"(accelerate sees {state.num_processes}); launch with torchrun or accelerate launch --multi_gpu"
        )
    return state


def share_outcome(state: Any, error: str | None) -> str | None:
    """The main process's ``error`` (or ``None``), on every process: a collective that replaces a barrier,
    so that a failure only the main process sees (the run lock, a full disk while saving, an evaluation
    error) stops the others at once instead of leaving them in a barrier until the launcher's timeout."""
    if state.num_processes > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    return error


def every_outcome(error: str | None) -> str | None:
    """The first process's ``error`` (in rank order) on every process, else ``None``: a collective in
    which every process reports its own outcome (where :func:`share_outcome` takes the main process's);
    with one process (or none started), ``error`` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def is_fsdp_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) has been applied to ``model`` or any module in it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def fsdp_units(model: torch.nn.Module) -> dict[str, int]:
    """The FSDP2 units of ``model`` (the modules ``fully_shard`` was applied to), each with the number of
    parameters it gathers (its own, not those of the units inside it), by module name."""
    from torch.distributed.fsdp import FSDPModule

    units: dict[str, int] = {}
    seen: set[int] = set()
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    for name, module in reversed(modules):  # innermost first: a unit's parameters are not its parents'
        own = [p for p in module.parameters() if id(p) not in seen]
        seen |= {id(p) for p in own}
        units[name] = sum(p.numel() for p in own)
    return units


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; an adapter's own parameters count in the total, as PEFT does."""
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if counter is not None:
        return counter()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(
        p.numel() for p in model.parameters()
    )


def describe_parameters(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
