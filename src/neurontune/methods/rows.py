"""``method=rows`` (row-sparse: rows chosen by any scorer) and ``method=neft`` (rows by the NeFT probe)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurontune.choices import IMPLS
from neurontune.errors import NeurontuneError
from neurontune.fields import is_set, opt
from neurontune.methods.base import Method, register

if TYPE_CHECKING:
    from torch import nn

    from neurontune.spec import NeuronSpec


@dataclass
class RowOptions:
    spec: str | None = opt(
        None,
        "train the rows of this NeuronSpec (spec file, adapter or run dir) instead of scoring",
        group="rows, neft",
    )
    impl: str = opt(
        "auto", "row-delta formulation (auto: the fastest for the device and precision)", IMPLS, "rows, neft"
    )


# ---- the methods -----------------------------------------------------------------------------------
@register
class Rows(Method):
    name = "rows"
    help = "row-sparse: train only the rows chosen by --scorer within --budget (a compact adapter)"
    options = RowOptions
    selects_rows = True
    supports_quantization = True
    outputs = ("adapter", "merged", "neuron_spec.json", "neuron_spec.scores.safetensors")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.given: NeuronSpec | None = None
        self.spec: NeuronSpec | None = None
        self.scoring_processes = 1  # how many processes shared the scoring pass

    @classmethod
    def written_outputs(cls, cfg: Any) -> tuple[str, ...]:
        scores = "neuron_spec.scores.safetensors"  # only a scored selection has them
        return tuple(n for n in super().written_outputs(cfg) if n != scores or not cfg.spec)

    def _resuming(self, out: Path) -> bool:
        return bool(self.cfg.resume and (out / "neuron_spec.json").is_file())

    def check(self, model: nn.Module, out: Path) -> None:
        from neurontune.rowtune.layer import check_impl
        from neurontune.selection import check_selection
        from neurontune.targets import find_target_modules

        # the layer's own check, before anything is written (a dense impl on a quantized base)
        if self.cfg.impl in ("merged", "fused"):
            cfg = self.cfg
            for name in find_target_modules(model, cfg.target_modules_value(), cfg.exclude_modules_value()):
                try:
                    check_impl(model.get_submodule(name), cfg.impl)
                except ValueError as e:
                    raise NeurontuneError(f"{name}: {e}") from None
        if self._resuming(out):
            return
        if self.cfg.spec:
            from neurontune.spec import load_spec

            self.given = load_spec(self.cfg.spec).validate(model)
        else:
            check_selection(self.cfg, model)

    def sharded_load_refused(self) -> str | None:
        from neurontune.scoring import ADDITIVE, get_scorer

        if self.cfg.spec or get_scorer(self.cfg.scorer, **self.cfg.scorer_kwargs()).needs <= ADDITIVE:
            return None
        return f"scorer={self.cfg.scorer} changes the weights to score them (zo-taylor perturbs, NeFT fine-tunes)"

    def _score_sharded(
        self, model: nn.Module, tok: Any, task: Any, out: Path, write: bool
    ) -> tuple[nn.Module, NeuronSpec]:
        """A data scorer on a base built without its weights (a sharded load): this copy is sharded and its
        shards filled, every process runs the calibration passes through it (each reads the target
        weights from the checkpoint to reduce them to row scores), and training builds on a new copy."""
        import gc

        from neurontune.sharded import another_empty_model, fsdp2_shard, shard_and_fill
        from neurontune.train import launched_min_num_params, launched_with, shard_model, train_args

        model.requires_grad_(False)
        # in the model's own dtype, as a 1-process run scores before training's mixed precision starts;
        # FSDP2 under a DeepSpeed launch too (a scoring copy needs no optimizer)
        fp32 = train_args(self.cfg, precision="fp32")
        shard = (lambda m: shard_model(m, fp32)) if launched_with("FSDP") else fsdp2_shard
        scoring, _ = shard_and_fill(model, shard, launched_min_num_params())
        spec = self._select(scoring, tok, task, out, write=write)
        fresh = another_empty_model(scoring)
        del scoring, model
        gc.collect()
        return fresh, spec

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        from peft import get_peft_model

        from neurontune.rowtune import RowTuneConfig
        from neurontune.runtime import process_state

        state = process_state()
        if state.num_processes > 1:
            # scorers whose statistics add up over batches score on every process, each over its share of
            # the calibration data (neurontune.scoring sums them), and NeFT's probe trains data-parallel;
            # the others (zeroth-order) score on the main process alone.
            # The main process writes the selection, and every process trains exactly the main's.
            from accelerate.utils import broadcast_object_list

            from neurontune.scoring import DATA_PARALLEL, get_scorer
            from neurontune.sharded import weight_source
            from neurontune.spec import NeuronSpec

            needs = get_scorer(self.cfg.scorer, **self.cfg.scorer_kwargs()).needs
            everyone = not self._resuming(out) and self.given is None and needs and needs <= DATA_PARALLEL
            self.scoring_processes = state.num_processes if everyone else 1
            if everyone and weight_source(model) is not None:  # loaded sharded: score on a sharded copy
                model, spec = self._score_sharded(model, tok, task, out, write=state.is_main_process)
            else:
                spec = self._select(model, tok, task, out, write=state.is_main_process) if (
                    everyone or state.is_main_process) else None  # fmt: skip
            shared = broadcast_object_list([spec.to_dict() if state.is_main_process else None])
            spec = NeuronSpec.from_dict(shared[0])
        else:
            spec = self._select(model, tok, task, out)
        self.spec = spec
        # the registered PEFT method: the run trains, checkpoints and saves a PEFT model
        config = RowTuneConfig(
            task_type="CAUSAL_LM", rows=spec, target_modules=self.cfg.target_modules_value(),
            exclude_modules=self.cfg.exclude_modules_value(), impl=self.cfg.impl, seed=self.cfg.seed,
        )  # fmt: skip
        return get_peft_model(model, config)

    def _select(self, model: nn.Module, tok: Any, task: Any, out: Path, write: bool = True) -> NeuronSpec:
        from neurontune.selection import save_selection, select_neurons
        from neurontune.spec import NeuronSpec

        cfg, spec_path = self.cfg, out / "neuron_spec.json"
        if self._resuming(out):
            spec = NeuronSpec.load(spec_path)
            print(f"using the selection of the run being resumed ({spec.num_rows():,} rows)")
        elif self.given is not None:
            spec = self.given
            spec.provenance["transferred_from"] = cfg.spec
            spec.save(spec_path)
            print(f"training the {spec.num_rows():,} rows of {cfg.spec}")
        else:
            spec, scores = select_neurons(cfg, model, tok, task, verbose=write)
            spec.provenance["config"] = dataclasses.asdict(cfg)
            spec.provenance["scoring_processes"] = self.scoring_processes
            if write:
                save_selection(spec, scores, spec_path)
        return spec

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        from neurontune.io import atomic_dir, save_pretrained_atomic

        model.peft_config["default"].base_model_name_or_path = self.cfg.model  # what load() reloads
        with atomic_dir(out / "adapter") as tmp:
            self.save_peft_adapter(model, tmp)  # deltas and indices
        if self.cfg.save_merged:
            save_pretrained_atomic(out / "merged", model.merge_and_unload(), tok)
        return out / "adapter"

    def metrics(self) -> dict[str, Any]:
        return {
            "scorer": self.cfg.scorer,
            "rows": self.spec.num_rows() if self.spec is not None else None,
            "spec": self.cfg.spec,
        }

    @classmethod
    def can_load(cls, path: Path, adapter_config: dict[str, Any] | None) -> bool:
        from neurontune.spec import is_row_adapter

        return is_row_adapter(path)

    @classmethod
    def load(
        cls,
        path: Path,
        model_name: str | None,
        dtype: str,
        is_trainable: bool,
        quantization: str | None = None,
    ) -> tuple[nn.Module, Any]:
        from neurontune.models import DEFAULT_MODEL, load_model
        from neurontune.rowtune.model import RowTuneModel
        from neurontune.runtime import device
        from neurontune.spec import adapter_spec, read_adapter

        cfg, tensors = read_adapter(path)  # either format, checked before the base is loaded
        adapter_spec(cfg, tensors, path)  # integer indices, finite deltas
        base_name = model_name or cfg.get("base_model") or DEFAULT_MODEL
        base, tok = load_model(
            base_name, dtype=dtype, device=device(), quantization=quantization or cfg.get("base_quantization", "none")
        )  # fmt: skip
        if cfg.get("peft"):
            import neurontune.rowtune  # noqa: F401  (registers the PEFT method)
            from neurontune.methods.peft_methods import load_peft_adapter

            return load_peft_adapter(base, path, is_trainable, base_name), tok
        return RowTuneModel.from_pretrained(base, path, is_trainable=is_trainable), tok


@register
class NeFT(Rows):
    name = "neft"
    help = "rows chosen by NeFT's probe (rows with scorer=neft)"
    supports_quantization = False  # the probe fine-tunes the weights themselves

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.scorer != "neft" and is_set(cfg, "scorer"):
            raise NeurontuneError(
                f"method=neft always scores with the NeFT probe; use method=rows scorer={cfg.scorer} for {cfg.scorer}"
            )
        cfg.scorer = "neft"

    @classmethod
    def can_load(cls, path: Path, adapter_config: dict[str, Any] | None) -> bool:
        return False  # its adapters are row adapters, loaded by Rows
