"""Sharded from the start (FSDP2): a base model that no process ever holds whole.

A sharded ``finetune`` builds the model without its weights (:func:`empty_model`: every parameter a
zero-storage placeholder of its shape and dtype; buffers such as rotary tables are real), builds the
method on it (a PEFT adapter's own parameters are ordinary tensors, initialised as usual), and then
:func:`shard_and_fill`: the placeholders go to the meta device, ``fully_shard`` gives each process its
shard, ``to_empty`` allocates only those, and each is filled from the checkpoint's safetensors files
(:meth:`CheckpointReader.fill`): a process reads only the rows of each tensor that its shard holds.
Row selection with a scorer that needs no data (``magnitude``, ``random``) reads each target weight
from the file in turn (:func:`module_weights`); the data scorers run on a sharded copy.

The placeholders are ``torch.zeros(()).expand(shape)``: a real tensor of the right shape, dtype and
device whose storage is one element, so that PEFT (which places its adapters on the base layer's
device) builds on them unchanged.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurontune.errors import NeurontuneError

PEFT_PREFIX = "base_model.model."
_SOURCES: weakref.WeakKeyDictionary[nn.Module, CheckpointReader] = weakref.WeakKeyDictionary()


def checkpoint_key(name: str) -> str:
    """The checkpoint's key for a parameter of the (possibly PEFT-wrapped) model: PEFT's
    ``base_model.model.`` prefix and ``.base_layer`` segments dropped."""
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


class CheckpointReader:
    """The safetensors files of a model directory (``model.safetensors`` or an index of shards), read a
    slice at a time. Counts the bytes it read (``bytes_read``) so that a run can show each process read
    about 1/N of the weights."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.files = {k: self.path / "model.safetensors" for k in f.keys()}
        else:
            raise NeurontuneError(f"{self.path} has no model.safetensors (or its index) to load sharded")
        self.bytes_read = 0
        self.base_keys: set[str] = set()  # the parameters empty_model left to be read
        self.dtype: torch.dtype | None = None  # what empty_model built (another_empty_model builds it again)
        self.device: str | None = None
        self.filled: dict[str, int] | None = None  # zero3_fill's record, for the run's metrics
        self.largest_whole = 0  # zero3_partition: the largest module it held whole
        # split_embeddings: a piece's key -> (the stored tensor's key, first row, rows)
        self.pieces: dict[str, tuple[str, int, int]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files or key in self.pieces

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (rows ``start:stop`` of its first dimension if given)."""
        from safetensors import safe_open

        if key in self.pieces:  # rows of a stored tensor (split_embeddings)
            stored, first, n = self.pieces[key]
            return self.read(stored, first + (start or 0), first + (n if stop is None else stop))

        with safe_open(self.files[key], "pt") as f:
            if start is None:
                t = f.get_tensor(key)
            else:
                t = f.get_slice(key)[start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def missing(self, model: nn.Module) -> list[str]:
        """The base parameters of ``model`` whose tensors are not in the files under any of their names
        (a checkpoint saved under other names, which ``from_pretrained`` would rename on loading)."""
        return [
            ks[0]
            for _, ks in _keys_by_parameter(model)
            if any(k in self.base_keys for k in ks) and not any(k in self for k in ks)
        ]

    def fill(self, model: nn.Module) -> dict[str, int]:
        """Copy each placeholder parameter's data from the checkpoint: for an FSDP2 shard (a DTensor
        sharded on dim 0) only its own rows; a parameter the checkpoint lacks keeps its value (a PEFT
        adapter's). A placeholder the checkpoint lacks is an error. Returns ``{"tensors": n,
        "bytes_read": b, "largest_local_bytes": m}``: what this call read, and the largest parameter
        (its local shard) this process holds."""
        from torch.distributed.tensor import DTensor

        filled, largest, before = 0, 0, self.bytes_read
        with torch.no_grad():
            for p, keys in _keys_by_parameter(model):
                local = p.to_local() if isinstance(p, DTensor) else p
                largest = max(largest, local.numel() * local.element_size())
                key = next((k for k in keys if k in self), None)
                if key is None:
                    if any(k in self.base_keys for k in keys):  # the base's, yet not in the files
                        raise NeurontuneError(f"sharded load: {keys[0]} is not in {self.path}")
                    continue  # an adapter's own parameter
                if isinstance(p, DTensor):
                    start, rows = _row_range(p)
                    part = self.read(key, start, start + rows) if rows else None
                    if part is not None:
                        local[:rows].copy_(part.to(local.dtype))
                else:
                    local.data = self.read(key).to(local.dtype)
                filled += 1
        return {"tensors": filled, "bytes_read": self.bytes_read - before, "largest_local_bytes": largest}


def _keys_by_parameter(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Each parameter once, with the checkpoint keys of all its names (a tied weight has several, and
    a checkpoint may store it under any one of them)."""
    keys: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        keys.setdefault(id(p), (p, []))[1].append(checkpoint_key(name))
    return list(keys.values())


def shard_and_fill(
    model: nn.Module, shard: Callable[[nn.Module], nn.Module], piece_params: int | None = None
) -> tuple[nn.Module, dict]:
    """``shard(model)`` (``fully_shard``) with the base's placeholders on the meta device, so that
    sharding allocates nothing of them; then each process's shards are allocated (``to_empty``, FSDP2's
    way of materialising a meta-device model: only the local shards) and filled from the checkpoint.
    The adapter's own parameters and every buffer keep their values. Returns the model and
    :meth:`CheckpointReader.fill`'s record, with ``base_bytes_held_before_sharding``: what of the base
    was real (not a placeholder) when sharding began, 0 unless something materialised it. The input
    embedding and head are cut into pieces of at most ``piece_params`` parameters (default: a decoder
    layer's; a size-based wrap passes its ``fsdp_min_num_params``), one FSDP2 unit each."""
    from torch.distributed.tensor import DTensor

    source = weight_source(model)
    if source is None:
        raise NeurontuneError("not a model built without its weights")
    # FSDP2 gathers the embedding (and head) a piece at a time, no piece larger than the other units
    split_embeddings(model, piece_params or largest_block(model, source.base_keys))
    metas: dict[int, nn.Parameter] = {}
    held = 0  # bytes of the base's parameters held whole here before sharding: 0 unless something copied one
    for prefix, module in model.named_modules():  # the base's placeholders become meta tensors (tied: one)
        for name, p in list(module._parameters.items()):
            if p is None or checkpoint_key(f"{prefix}.{name}".lstrip(".")) not in source.base_keys:
                continue  # an adapter's own parameter
            if id(p) not in metas:
                if not (p.numel() <= 1 or 0 in p.stride()):
                    held += p.numel() * p.element_size()
                metas[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            module._parameters[name] = metas[id(p)]
    model = shard(model)
    from torch.distributed.fsdp import register_fsdp_forward_method

    # generate() reaches the layers without the root's forward: FSDP's hooks must run around it too
    register_fsdp_forward_method(model, "generate")
    device = torch.device(source.device or "cpu")
    kept = {  # the adapter's shards (small) and the buffers, which to_empty would leave uninitialised
        n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.device.type != "meta"
    }
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in kept:
                (p.to_local() if isinstance(p, DTensor) else p).copy_(kept[n])
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return model, {**source.fill(model), "base_bytes_held_before_sharding": held}


def _row_range(p: Any) -> tuple[int, int]:
    """``(first row, rows)`` of the global tensor that this process's shard of ``p`` holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(o for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
        raise NeurontuneError(
            "sharded load: only shards along the first dimension are read (FSDP2's Shard(0))"
        )
    return int(offset[0]), int(shape[0])


def placeholder(
    like: torch.Tensor, dtype: torch.dtype | None = None, device: str | None = None
) -> torch.Tensor:
    """A tensor of ``like``'s shape that stores one element (on ``device``, default CPU)."""
    return torch.zeros((), dtype=dtype or like.dtype, device=device).expand(like.shape)


def empty_model(path: str | Path, dtype: torch.dtype, device: str | None = None) -> nn.Module:
    """The causal LM of ``path``'s config with placeholder parameters (see the module docstring) in
    ``dtype`` on ``device`` (so that ``fully_shard`` moves nothing whole), buffers real, tied weights
    tied; :func:`weight_source` gives its checkpoint reader."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding, one tensor
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                seen[id(p)] = nn.Parameter(placeholder(p, dtype, device), requires_grad=p.requires_grad)
            module._parameters[name] = seen[id(p)]
    if device:  # the buffers; not model.to(), which copies a placeholder whole when "cpu:0" != "cpu"
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.to(device)
    reader = CheckpointReader(path)
    reader.dtype, reader.device = dtype, device
    reader.base_keys = {checkpoint_key(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    _SOURCES[model] = reader
    return model.eval()


def another_empty_model(model: nn.Module) -> nn.Module:
    """A new :func:`empty_model` of the checkpoint, dtype and device ``model`` (an empty model, or one
    built on it) was made from: a scoring pass shards one copy, and training builds on another."""
    source = weight_source(model)
    if source is None:
        raise NeurontuneError("not a model built without its weights")
    return empty_model(source.path, source.dtype, source.device)


def weight_source(model: nn.Module) -> CheckpointReader | None:
    """The checkpoint an :func:`empty_model` (or the PEFT model built on it) reads its weights from."""
    if model in _SOURCES:
        return _SOURCES[model]
    get_base = getattr(model, "get_base_model", None)  # a PeftModel: the transformers model it wraps
    return _SOURCES.get(get_base()) if get_base is not None else None


def module_weights(model: nn.Module) -> Callable[[str, nn.Module], torch.Tensor] | None:
    """For an :func:`empty_model`: ``fn(module_name, module)``, that module's weight as stored, read from
    the checkpoint (one tensor at a time, for scorers that need no data); ``None`` for a loaded model."""
    source = weight_source(model)
    if source is None:
        return None

    def read(name: str, module: nn.Module) -> torch.Tensor:
        return source.read(checkpoint_key(f"{name}.weight")).to(module.weight.dtype)

    return read


def gather_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter entries of a sharded PEFT model's ``state_dict`` (keys holding its tuner's prefix:
    ``lora_``, ``rowtune_``), each gathered whole (FSDP2 shards or ZeRO-3 partitions): a collective that
    every process calls, holding only the adapter whole, never the base. ``save_pretrained(state_dict=...)``
    writes it."""
    from torch.distributed.tensor import DTensor

    prefix = model.base_model.prefix
    adapter = {n: p for n, p in model.named_parameters() if prefix in n}
    zero3 = {n: p for n, p in adapter.items() if hasattr(p, "ds_id")}
    with _zero3_gathered(list(zero3.values())):  # ZeRO-3 partitions: whole here
        state = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()
            if prefix in k
        }
    if zero3:  # a trained parameter's fp32 master copy (the module's own is bf16/fp16 under mixed precision)
        from deepspeed.utils import safe_get_full_fp32_param

        for n, p in zero3.items():
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            if master is not None and n in state:
                state[n] = master.detach().cpu().reshape(state[n].shape)
    return state


def _whole(p: nn.Parameter) -> torch.Tensor:
    """A parameter whole, whatever holds it: an FSDP2 shard gathered, a ZeRO-3 partition gathered (a
    trained one's fp32 master copy: the module's own is bf16/fp16 under mixed precision), else itself.
    A collective for the sharded ones: every process calls it, parameter by parameter in one order."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.full_tensor().detach()
    if hasattr(p, "ds_id"):
        if p.requires_grad:
            from deepspeed.utils import safe_get_full_fp32_param

            master = safe_get_full_fp32_param(p)
            if master is not None:
                return master.detach().reshape(p.ds_shape)
        with _zero3_gathered([p]):
            return p.data.detach().clone()
    return p.detach()


def _stored(model: nn.Module, source: CheckpointReader) -> list[tuple[str, list[nn.Parameter]]]:
    """Each tensor of the checkpoint that a parameter of ``model`` holds, under the checkpoint's name,
    with the parameters that hold it in row order (one, or an embedding's pieces), in the model's order."""
    held: dict[str, list[tuple[int, nn.Parameter]]] = {}
    for p, keys in _keys_by_parameter(model):
        key = next((k for k in keys if k in source), keys[0])
        key, first = source.pieces[key][:2] if key in source.pieces else (key, 0)
        held.setdefault(key, []).append((first, p))
    return [(k, [p for _, p in sorted(v, key=lambda x: x[0])]) for k, v in held.items()]


def save_model_sharded(
    model: nn.Module, path: Path, tok: Any, write: bool, max_shard_bytes: int = 50 * 10**9
) -> dict[str, int]:
    """Save a model built without its weights and trained sharded (``method=full`` under FSDP2 or
    ZeRO-3) as ``save_pretrained`` would, without any process holding it whole: every process gathers
    one parameter at a time (an embedding a piece at a time), and the process with ``write`` streams
    each into its file (:class:`neurontune.io.StreamedWeights`: the checkpoint's names, the dtype it was
    built in) and drops it; tensors of the checkpoint that no parameter holds (a persistent buffer) are
    copied from it. That process writes into a temporary directory, with the config, the generation
    config and the tokenizer, and renames it to ``path`` once complete. A failure on any process raises
    on every process, and nothing is left half-written. Returns ``{"tensors": n,
    "largest_gathered_bytes": m}``."""
    import shutil
    import tempfile

    from neurontune.io import StreamedWeights, make_dir, swap_in
    from neurontune.runtime import every_outcome

    source = weight_source(model)
    if source is None:
        raise NeurontuneError("not a model built without its weights")
    stored = _stored(model, source)
    held = {checkpoint_key(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    held |= {k for k, _ in stored}
    extra = [k for k in source.files if k not in held]
    dtype = source.dtype or torch.float32

    def shape(p: nn.Parameter) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))

    def kind(p: nn.Parameter) -> torch.dtype:
        return dtype if p.is_floating_point() else p.dtype

    error, tmp, writer, largest, copied = None, None, None, 0, {}
    if write:
        try:
            make_dir(path.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            copied = {k: source.read(k) for k in extra}
            entries = [
                (k, kind(ps[0]), (sum(shape(p)[0] for p in ps), *shape(ps[0])[1:])) for k, ps in stored
            ]
            writer = StreamedWeights(tmp, entries + [(k, t.dtype, tuple(t.shape)) for k, t in copied.items()],
                                     max_shard_bytes)  # fmt: skip
            model.config.dtype = dtype
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
        except (OSError, NeurontuneError) as e:
            error = f"could not write {path}: {e}"
    with torch.no_grad():
        for _, params in stored:
            for p in params:
                t = _whole(p)  # a collective: gathered on every process, kept by none
                largest = max(largest, t.numel() * t.element_size())
                if writer is not None and error is None:
                    try:
                        writer.write(t.to(kind(p)))
                    except (OSError, NeurontuneError) as e:
                        error = f"could not write {path}: {e}"
                del t
    if writer is not None and error is None:
        try:
            for t in copied.values():
                writer.write(t)
            writer.close()
            swap_in(tmp, path)
        except (OSError, NeurontuneError) as e:
            error = f"could not write {path}: {e}"
    if writer is not None:
        writer.abandon()
    if tmp is not None and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    if error := every_outcome(error):  # every process learns of a failure on any
        raise NeurontuneError(error)
    return {"tensors": sum(len(ps) for _, ps in stored), "largest_gathered_bytes": largest}


def keep_zero3_release(module: nn.Module, engine: Any) -> None:
    """Remember, on the module a DeepSpeed ZeRO-3 ``engine`` trains, how to partition every parameter of it
    again (:func:`release_gathered`)."""
    module._zero3_release = engine.empty_partition_cache


def release_gathered(module: nn.Module) -> None:
    """After a forward-only pass of a sharded model (an evaluation), shard again what it left gathered.
    ZeRO-3: wait for the parameters DeepSpeed prefetched along the training steps' trace, which that pass
    never reached, and partition every gathered parameter again. Otherwise they stay gathered (measured at
    the Llama-3.2-1B shape on 4 processes: 370 MiB more held after the evaluation) or in flight, and
    gathering the adapter next fails ("Cannot partition a param in flight"). FSDP2: the root unit keeps
    its parameters (the embedding, the final norm, an untied head) gathered after its forward, for the
    backward that a forward-only pass never runs; until resharded they are plain tensors in the module,
    not its shards, so that the optimizer built next (or a checkpoint) would see those, whose storage
    FSDP frees at its next reshard. Nothing to do for any other module, nor once it was gathered whole
    for good (a run that loaded the whole base)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    release = getattr(module, "_zero3_release", None)
    if release is not None and any(hasattr(p, "ds_id") for p in module.parameters()):
        release()


def _zero3_gathered(params: list[nn.Parameter]) -> Any:
    """``deepspeed.zero.GatheredParameters(params)`` (read only), or nothing to do without them."""
    import contextlib

    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def fsdp2_shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` each block the model keeps whole (transformers' ``_no_split_modules``: its decoder
    layers), then the model: FSDP2 without accelerate's plugin, for a scoring copy under a launch that
    trains with something else (DeepSpeed ZeRO-3)."""
    from torch.distributed.fsdp import fully_shard

    blocks = _block_names(model) | {EmbeddingPiece.__name__}
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def _block_names(model: nn.Module) -> set[str]:
    """The class names of the blocks transformers keeps whole (``_no_split_modules``), PEFT-wrapped or not."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if get_base is not None else model
    return set(getattr(base, "_no_split_modules", None) or [])


def largest_block(model: nn.Module, keys: set[str] | None = None) -> int:
    """The parameters of the model's largest block (a decoder layer), only those whose checkpoint key
    is in ``keys`` if given (the base's: an adapter's left out); 0 for a model that names no block."""
    names = _block_names(model)
    sizes = [
        sum(
            p.numel()
            for n, p in m.named_parameters(prefix=prefix)
            if keys is None or checkpoint_key(n) in keys
        )
        for prefix, m in model.named_modules()
        if type(m).__name__ in names
    ]
    return max(sizes, default=0)


def largest_block_module(model: nn.Module, keys: set[str] | None = None) -> int:
    """The parameters of the largest single module inside the model's blocks (a decoder layer's MLP
    projection), counting a module's own parameters only (those whose checkpoint key is in ``keys`` if
    given): what ZeRO-3 gathers whole at once, as it gathers module by module; 0 for a model that names
    no block."""
    names = _block_names(model)
    sizes = [
        sum(
            p.numel()
            for n, p in m.named_parameters(prefix=f"{prefix}.{sub}".rstrip("."), recurse=False)
            if keys is None or checkpoint_key(n) in keys
        )
        for prefix, block in model.named_modules()
        if type(block).__name__ in names
        for sub, m in block.named_modules()
    ]
    return max(sizes, default=0)


def embedding_pieces(model: nn.Module) -> list[EmbeddingPiece]:
    """The :class:`EmbeddingPiece` s of a model (:func:`split_embeddings`), each once."""
    return [m for m in model.modules() if isinstance(m, EmbeddingPiece)]


def _drop_auto(conf: Any) -> Any:
    """A DeepSpeed config without its ``"auto"`` entries (accelerate fills those from the model when
    it initialises the engine; ``zero.Init`` needs only the ZeRO section and the precision)."""
    if isinstance(conf, dict):
        return {k: _drop_auto(v) for k, v in conf.items() if v != "auto"}
    return conf


def zero3_partition(model: nn.Module, ds_config: dict) -> int:
    """Partition a model built without its weights under DeepSpeed ZeRO-3, one module at a time, before
    ``deepspeed.initialize``: each module's placeholders become zeros (in the config's bf16/fp16 if it
    asks for one, the dtype DeepSpeed would cast to) and ``deepspeed.zero.Init(module=...)`` partitions
    them at once, so a process holds at most one module's parameters whole, briefly. The adapter's own
    parameters are cast alike and left for the engine to partition. Each process then fills its
    partitions from the checkpoint (:func:`zero3_fill`). Returns the bytes of the largest module held
    whole (kept for :func:`zero3_fill`'s record)."""
    import deepspeed

    source = weight_source(model)
    if source is None:
        raise NeurontuneError("not a model built without its weights")
    conf = _drop_auto(ds_config)
    for k in ("train_batch_size", "gradient_accumulation_steps"):  # the micro-batch alone is consistent
        conf.pop(k, None)  # with any world size (DeepSpeed's own comm may not know it yet)
    dtype = (
        torch.bfloat16
        if conf.get("bf16", {}).get("enabled")
        else torch.float16
        if conf.get("fp16", {}).get("enabled")
        else None
    )
    largest = 0
    for prefix, module in model.named_modules():
        own = [
            (name, p)
            for name, p in module._parameters.items()
            if p is not None and not hasattr(p, "ds_id")
            and checkpoint_key(f"{prefix}.{name}".lstrip(".")) in source.base_keys
        ]  # fmt: skip
        if not own:
            continue
        with torch.no_grad():
            for _, p in own:
                p.data = torch.zeros(p.shape, dtype=dtype or p.dtype, device=p.device)
        largest = max(largest, sum(p.numel() * p.element_size() for _, p in own))
        holder = nn.Module()  # only these parameters: a tied one already partitioned is skipped
        for i, (_, p) in enumerate(own):
            holder.register_parameter(f"p{i}", p)
        deepspeed.zero.Init(module=holder, config_dict_or_path=conf)
    source.largest_whole = largest
    if dtype is not None:  # the adapter, as DeepSpeed casts a model it partitions itself
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
    return largest


def zero3_fill(model: nn.Module) -> dict[str, int]:
    """Fill each ZeRO-3 partition of a model's base parameters from the checkpoint: a process's
    partition of a parameter is a range of its flattened elements, so only the rows spanning that range
    are read. Returns :meth:`CheckpointReader.fill`'s record."""
    import torch.distributed as dist

    source = weight_source(model)
    if source is None:
        raise NeurontuneError("not a model built without its weights")
    filled, largest, before = 0, 0, source.bytes_read
    with torch.no_grad():
        for p, keys in _keys_by_parameter(model):
            part = p.ds_tensor
            largest = max(largest, part.numel() * part.element_size())
            key = next((k for k in keys if k in source), None)
            if key is None:
                if any(k in source.base_keys for k in keys):
                    raise NeurontuneError(f"sharded load: {keys[0]} is not in {source.path}")
                continue
            size = part.ds_numel
            start = size * dist.get_rank(group=p.ds_process_group)
            stop = min(start + size, p.ds_numel)
            if start < stop:
                if len(p.ds_shape):  # the rows spanning [start, stop)
                    row = p.ds_numel // p.ds_shape[0]
                    first = start // row
                    flat = source.read(key, first, -(-stop // row)).reshape(-1)
                else:
                    row, first, flat = 1, 0, source.read(key).reshape(-1)
                values = flat[start - first * row : stop - first * row]
                part.narrow(0, 0, stop - start).copy_(values)
                if p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
                    # a trained parameter (method=full): DeepSpeed's fp32 master copy of the partition was
                    # taken from the placeholder's zeros; it gets the checkpoint's values, not the rounded
                    # ones of a bf16/fp16 partition
                    from deepspeed.utils import safe_set_local_fp32_param

                    master = torch.zeros(part.numel(), dtype=torch.float32, device=part.device)
                    master[: stop - start] = values
                    safe_set_local_fp32_param(p, master)
            filled += 1
    source.filled = {
        "tensors": filled,
        "bytes_read": source.bytes_read - before,
        "largest_local_bytes": largest,
        "largest_whole_module_bytes": source.largest_whole,  # zero3_partition's, the most held whole at once
    }
    return source.filled


class EmbeddingPiece(nn.Module):
    """Rows ``[start, start + n)`` of an embedding matrix (or of an untied head's weight), its own FSDP2
    unit (under ZeRO-3, a module DeepSpeed gathers on its own): :class:`PiecewiseEmbedding` looks tokens
    up in it, :class:`PiecewiseHead` projects onto it, both through ``forward`` (token ids: the lookup;
    hidden states: the projection), so that FSDP's and DeepSpeed's hooks gather the piece either way. A
    sharded run thus gathers one piece at a time, where FSDP2 would gather a tied embedding whole and
    keep it from the forward's start to the backward's end (accelerate's tail unit), and ZeRO-3 would
    gather the whole matrix for the lookup and again for the head."""

    def __init__(self, weight: torch.Tensor, start: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():  # hidden states: this piece's logits
            return nn.functional.linear(x, self.weight)
        ids, n = x, self.weight.shape[0]
        local = ids - self.start
        inside = (local >= 0) & (local < n)
        out = nn.functional.embedding(local.clamp(0, n - 1), self.weight)
        return out * inside.unsqueeze(-1).to(out.dtype)


class PiecewiseEmbedding(nn.Module):
    """An ``nn.Embedding`` as :class:`EmbeddingPiece` s: the same lookup, one piece at a time."""

    def __init__(self, pieces: list[EmbeddingPiece], padding_idx: int | None) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.num_embeddings = sum(p.weight.shape[0] for p in pieces)
        self.embedding_dim = pieces[0].weight.shape[1]
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.pieces[0](ids)
        for piece in self.pieces[1:]:
            out = out + piece(ids)  # each token is in exactly one piece, the others add zeros
        return out


class PiecewiseHead(nn.Module):
    """A bias-free output projection (``lm_head``) onto :class:`EmbeddingPiece` s: logits piece by
    piece, concatenated. A tied head projects onto the embedding's pieces, which it does not register
    (they are the embedding's parameters, in the embedding's FSDP units)."""

    def __init__(self, pieces: list[EmbeddingPiece], own: bool) -> None:
        super().__init__()
        if own:
            self.pieces = nn.ModuleList(pieces)
        # what forward projects onto, not registered: a tied head's pieces are the embedding's
        object.__setattr__(self, "_projected", list(pieces))
        self.in_features = pieces[0].weight.shape[1]
        self.out_features = sum(p.weight.shape[0] for p in pieces)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(hidden) for p in self._projected], dim=-1)


def split_embeddings(model: nn.Module, piece_params: int) -> list[EmbeddingPiece]:
    """Replace a model built without its weights' input embedding (an ``nn.Embedding``) and its
    bias-free ``nn.Linear`` head (tied or not) by pieces of at most ``piece_params`` parameters each
    (see :class:`EmbeddingPiece`), and teach its checkpoint reader where each piece's rows are stored.
    Returns the pieces (none where a matrix fits in one piece or the model has other layers there)."""
    source = weight_source(model)
    if source is None:
        raise NeurontuneError("not a model built without its weights")
    if piece_params <= 0:
        return []
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if get_base is not None else model
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    made: list[EmbeddingPiece] = []

    def cut(module: nn.Module) -> list[EmbeddingPiece] | None:
        rows, width = module.weight.shape
        per = max(1, piece_params // width)
        if rows <= per:
            return None
        key = checkpoint_key(f"{names[id(module)]}.weight")
        pieces = []
        for i, start in enumerate(range(0, rows, per)):
            n = min(per, rows - start)
            piece = EmbeddingPiece(placeholder(module.weight[:n], device=module.weight.device), start)
            piece.weight.requires_grad_(module.weight.requires_grad)  # method=full trains them
            pieces.append(piece)
            source.pieces[checkpoint_key(f"{names[id(module)]}.pieces.{i}.weight")] = (key, start, n)
        source.base_keys |= {k for k, v in source.pieces.items() if v[0] == key}
        made.extend(pieces)
        return pieces

    if type(embed) is nn.Embedding and (pieces := cut(embed)):
        emb = PiecewiseEmbedding(pieces, embed.padding_idx)
        base.set_input_embeddings(emb)
        if tied:
            base.set_output_embeddings(PiecewiseHead(pieces, own=False))
    if not tied and type(head) is nn.Linear and head.bias is None and (pieces := cut(head)):
        base.set_output_embeddings(PiecewiseHead(pieces, own=True))
    return made
