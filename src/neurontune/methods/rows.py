"""``method=rows`` (row-sparse: rows chosen by any scorer) and ``method=neft`` (rows by the NeFT probe).

Also the selection job itself (:func:`select_neurons`), shared with ``neurontune select``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurontune.errors import NeurontuneError
from neurontune.fields import opt
from neurontune.methods.base import Method, register
from neurontune.rowtune.layer import IMPLS
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


# ---- the selection job -----------------------------------------------------------------------------
def select_neurons(
    cfg: Any, model: nn.Module, tok: Any, task: Any
) -> tuple[NeuronSpec, dict[str, torch.Tensor]]:
    """Score the target rows of ``model`` on ``cfg.calib_examples`` training examples and apply the budget.

    Returns the spec and the raw scores (module name -> one score per row).
    """
    from neurontune.scoring import score_model
    from neurontune.selection import select
    from neurontune.tasks import fixed_batches

    calib = fixed_batches(task.train[: cfg.calib_examples], tok, cfg.calib_batch_size, cfg.max_length)
    t0 = time.perf_counter()
    scores = score_model(
        model,
        cfg.scorer,
        batches=calib,
        target_modules=cfg.target_modules_value(),
        exclude_modules=cfg.exclude_modules_value(),
        seed=cfg.seed,
        progress=True,
        **cfg.scorer_kwargs(),
    )
    seconds = time.perf_counter() - t0
    spec = select(
        model,
        scores,
        per_layer=cfg.per_layer,
        order=cfg.order,
        min_per_module=cfg.min_per_module,
        seed=cfg.seed,
        provenance={
            "scorer": cfg.scorer,
            "scorer_options": cfg.scorer_kwargs(),
            "base_model": cfg.model,
            "seed": cfg.seed,
            "task": cfg.task,
            "calib_examples": min(cfg.calib_examples, len(task.train)),
            "score_seconds": seconds,
        },
        verbose=True,
        **cfg.budget_kwargs(),
    )
    s = spec.summary()
    print(
        f"selected {s['rows']:,} rows ({s['params']:,} params) in {s['modules']} modules with {cfg.scorer} "
        f"({seconds:.1f}s)\n  rows by module type: {s['rows_by_type']}\n  rows by layer: {s['rows_by_layer']}"
    )
    return spec, scores


def check_selection(cfg: Any, model: nn.Module) -> None:
    """Fail on a bad scorer, scorer option, target or budget now, before minutes of evaluation or scoring."""
    from neurontune.scoring import get_scorer
    from neurontune.selection import select
    from neurontune.targets import find_target_modules, linear_shape

    get_scorer(cfg.scorer, **cfg.scorer_kwargs())
    names = find_target_modules(model, cfg.target_modules_value(), cfg.exclude_modules_value())
    zeros = {n: torch.zeros(linear_shape(model.get_submodule(n))[0]) for n in names}
    select(model, zeros, per_layer=cfg.per_layer, order=cfg.order, min_per_module=cfg.min_per_module,
           **cfg.budget_kwargs())  # fmt: skip


def save_selection(spec: NeuronSpec, scores: dict[str, torch.Tensor], path: str | Path) -> None:
    """``path`` gets the spec (JSON); ``<stem>.scores.safetensors`` beside it the raw scores."""
    from neurontune.io import write_safetensors

    path = Path(path)
    spec.save(path)
    write_safetensors(
        path.with_suffix(".scores.safetensors"), scores, {"scorer": str(spec.provenance.get("scorer"))}
    )


# ---- the methods -----------------------------------------------------------------------------------
@register
class Rows(Method):
    name = "rows"
    help = "row-sparse: train only the rows chosen by --scorer within --budget (a compact adapter)"
    options = RowOptions
    selects_rows = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.given: NeuronSpec | None = None
        self.spec: NeuronSpec | None = None

    def _resuming(self, out: Path) -> bool:
        return bool(self.cfg.resume and (out / "neuron_spec.json").is_file())

    def check(self, model: nn.Module, out: Path) -> None:
        if self._resuming(out):
            return
        if self.cfg.spec:
            from neurontune.analysis import load_spec

            self.given = load_spec(self.cfg.spec).validate(model)
        else:
            check_selection(self.cfg, model)

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        from neurontune.rowtune import RowTuneConfig, get_rowtune_model

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
            spec, scores = select_neurons(cfg, model, tok, task)
            spec.provenance["config"] = dataclasses.asdict(cfg)
            save_selection(spec, scores, spec_path)
        self.spec = spec
        return get_rowtune_model(
            model, spec, RowTuneConfig(target_modules=cfg.target_modules_value(), impl=cfg.impl)
        )

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        from neurontune.io import save_pretrained_atomic

        model.save_pretrained(out / "adapter")
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
        from neurontune.rowtune.model import is_row_adapter

        return is_row_adapter(path)

    @classmethod
    def load(
        cls, path: Path, model_name: str | None, dtype: str, is_trainable: bool
    ) -> tuple[nn.Module, Any]:
        from neurontune.models import DEFAULT_MODEL, load_model
        from neurontune.pipeline import device
        from neurontune.rowtune.model import RowTuneModel, read_adapter

        cfg, _ = read_adapter(path)
        base, tok = load_model(
            model_name or cfg.get("base_model") or DEFAULT_MODEL, dtype=dtype, device=device()
        )
        return RowTuneModel.from_pretrained(base, path, is_trainable=is_trainable), tok


@register
class NeFT(Rows):
    name = "neft"
    help = "rows chosen by NeFT's probe (rows with scorer=neft)"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        default = next(f.default for f in dataclasses.fields(cfg) if f.name == "scorer")
        if cfg.scorer not in ("neft", default):
            raise NeurontuneError(
                f"method=neft always scores with the NeFT probe; use method=rows scorer={cfg.scorer} for {cfg.scorer}"
            )
        cfg.scorer = "neft"

    @classmethod
    def can_load(cls, path: Path, adapter_config: dict[str, Any] | None) -> bool:
        return False  # its adapters are row adapters, loaded by Rows
