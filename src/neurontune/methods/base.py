"""What a fine-tuning method is to ``neurontune finetune``: one small class per method.

The pipeline runs every method the same way (load, check, evaluate, build, train, finish, save,
report); a method only says what is its own::

    @register
    class MyMethod(Method):
        name = "mine"
        help = "one line for --help"
        options = MyOptions          # optional dataclass: its fields become finetune options
        def build(self, model, tok, task, out): ...   # freeze / wrap the model, return it
        def save(self, model, tok, out): ...          # write the output, return its path

Everything else has a default that fits a method training the parameters ``build`` left trainable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the registry is read by --help and the config, before torch is imported
    import torch
    from torch import nn


class Method:
    """One way of fine-tuning. ``cfg`` is the run's :class:`~neurontune.config.FinetuneConfig`."""

    name: ClassVar[str]
    help: ClassVar[str]
    options: ClassVar[type | None] = None  # a dataclass of this method's own options
    selects_rows: ClassVar[bool] = False  # uses the scorer / budget options to choose rows
    trains: ClassVar[bool] = True  # False: evaluation only
    outputs: ClassVar[tuple[str, ...]] = ()  # what it writes in output_dir (removed by --overwrite)
    supports_quantization: ClassVar[bool] = False  # trains (or evaluates) on a bitsandbytes-quantized base
    # finetune's lr when the run sets none. 3e-4 is the rate the quality suite's validation sweep chose
    # most often for rows (benchmarks/results/quality_suite.md); LoRA/DoRA and full override it from the
    # same sweep; the other methods were not swept and keep 3e-4
    default_lr: ClassVar[float] = 3e-4
    # early_stopping_patience ends this method's training at its best validation step; False: the method
    # trains to the end (keeping the best of the steps :meth:`best_candidates` allows, if any) and uses the
    # held-out examples (:attr:`validation`) itself
    stops_early: ClassVar[bool] = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        # after a run loaded sharded (neurontune.sharded): the adapter's state, gathered whole from the
        # processes' shards, for save() (the model itself stays sharded)
        self.sharded_state: dict[str, torch.Tensor] | None = None
        # with early_stopping_patience: the examples held out of training to measure the validation loss on
        self.validation: list[Any] = []

    def sharded_load_refused(self) -> str | None:
        """Why this run cannot build its model on a base loaded shard by shard under FSDP2 or ZeRO-3
        (then every process loads the whole base before it is sharded); ``None``: it can. Only methods
        whose trainable state starts without reading the base's weights can: a PEFT adapter initialised
        so (rows, LoRA), or the base's own shards (full)."""
        return f"method={self.name} needs the whole base to build its model"

    def gather_sharded(self, model: nn.Module, tok: Any, out: Path) -> None:
        """After a run loaded sharded, every process calls this with the others (collectives): gather what
        :meth:`save` writes on the main process, the adapter's state whole (:attr:`sharded_state`), never
        the base."""
        from neurontune.sharded import gather_adapter_state

        self.sharded_state = gather_adapter_state(model)

    def save_peft_adapter(self, model: nn.Module, path: Path) -> None:
        """``model.save_pretrained(path)`` of a PEFT model (only linears are adapted; no Hub lookup),
        from :attr:`sharded_state` after a sharded run."""
        state = {"state_dict": self.sharded_state} if self.sharded_state is not None else {}
        model.save_pretrained(path, save_embedding_layers=False, **state)

    @classmethod
    def written_outputs(cls, cfg: Any) -> tuple[str, ...]:
        """Which of :attr:`outputs` a run with ``cfg`` writes (what its manifest claims)."""
        return tuple(n for n in cls.outputs if n != "merged" or getattr(cfg, "save_merged", False))

    # ---- before the run writes anything ------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Validate this method's options (and refuse options of other methods that it would ignore)."""

    def check(self, model: nn.Module, out: Path) -> None:
        """Check what the method needs of ``model`` (a bad spec, an unsupported layout) before the run
        writes anything or spends minutes evaluating."""

    # ---- training ----------------------------------------------------------------------------------
    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        """The model to train, with only the method's parameters trainable."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups; ``None``: all trainable parameters in one group at ``lr``."""
        return None

    def regularization(self, model: nn.Module) -> Callable[[int], torch.Tensor] | None:
        """A penalty added to the loss once per optimizer step (called with the step, from 0), if the
        method has one."""
        return None

    def best_candidates(self, model: nn.Module) -> Callable[[int], bool] | None:
        """For a method that trains all its steps (``stops_early = False``) under early_stopping_patience:
        which steps may give the result (measured every ``eval_steps``, the best by the validation loss
        kept, training never stopped); ``None``: the last step's weights are the result."""
        return None

    def training_examples(self, task: Any) -> list[Any]:
        """What the run trains on (by default the task's training examples)."""
        return list(task.train)

    def training_loss(self, model: nn.Module) -> dict[str, Callable[..., Any]]:
        """``loss_fn`` / ``count_fn`` for :func:`neurontune.train.train` when the method's loss is not the
        task's token loss (``{}``: it is)."""
        return {}

    def step_stats(self, model: nn.Module) -> Callable[[], dict[str, float]] | None:
        """Extra numbers logged with every step (e.g. gate sparsity)."""
        return None

    # ---- after training ----------------------------------------------------------------------------
    def finish(
        self, model: nn.Module, tok: Any, out: Path, evaluate: Callable[[nn.Module], dict[str, Any]],
        after: dict[str, Any] | None,
    ) -> tuple[nn.Module, dict[str, Any] | None]:  # fmt: skip
        """Turn the trained model into the one that is saved and reported (gates: the pruned export);
        returns it and its metrics (``after`` unchanged by default)."""
        return model, after

    def finishes_on_every_process(self) -> bool:
        """Whether :meth:`finish` runs on every process of a multi-process run (it trains again, which
        takes them all); then it writes and evaluates on the main process only (``evaluate`` gives
        ``{}`` elsewhere). By default it runs on the main process alone."""
        return False

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path | None:
        """Write the run's model output under ``out`` and return its path (``None``: nothing to save)."""
        return None

    def metrics(self) -> dict[str, Any]:
        """Method-specific entries for ``metrics.json``."""
        return {}

    def report_rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """Extra ``(name, value)`` rows for the run table of ``report.md``."""
        return []

    # ---- loading saved outputs ---------------------------------------------------------------------
    @classmethod
    def can_load(cls, path: Path, adapter_config: dict[str, Any] | None) -> bool:
        """Whether ``path`` (an output of this method) is loaded by :meth:`load`."""
        return False

    @classmethod
    def load(
        cls,
        path: Path,
        model_name: str | None,
        dtype: str,
        is_trainable: bool,
        quantization: str | None = None,
    ) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)`` for an output of this method; ``quantization``: how to load its base
        (``None``: as it was trained, where the output records it)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=<cls.name>``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    return dict(_REGISTRY)
