"""``method=gates``: stochastic gates that adapt and prune at once; saves the pruned model
(``output_dir/pruned``, a plain transformers model). The gates themselves: :mod:`neurontune.gates`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurontune.choices import SCHEDULERS, check_warmup
from neurontune.errors import NeurontuneError
from neurontune.fields import is_set, opt
from neurontune.methods.base import Method, register

if TYPE_CHECKING:
    import torch
    from torch import nn

G = "gates"


@dataclass
class GateOptions:
    gate_sparsity: float = opt(
        0.3,
        "target fraction of the MLP+attention parameters to remove (MLP channels, and query heads with "
        "prune_heads; linear granularity: of every row and column gate group)",
        group=G,
    )
    gate_lambda: float = opt(1000.0, "weight of the sparsity penalty", group=G)
    gate_lr: float | None = opt(
        None, "learning rate of the gates (default: lr; low-rank terms use lr)", group=G
    )
    gate_lr_scheduler: str | None = opt(
        None,
        "constant: the gates keep gate_lr from the first step while lr_scheduler and warmup_steps schedule "
        "the low-rank terms or weights (CoFi's masks have their own optimizer at a constant rate); default: "
        "the gates follow lr_scheduler too",
        ("constant",),
        G,
    )
    gate_sigma: float = opt(0.1, "noise std in training", group=G)
    gate_tau: float = opt(0.5, "width of the open-probability surrogate in the ranked penalty", group=G)
    gate_penalty: str = opt("ranked", "ranked (shut the lowest gates) or mean (FineGates' formula)",
                            ("ranked", "mean"), G)  # fmt: skip
    gate_granularity: str = opt("structured", "structured (MLP channels/heads, real speed-up) or linear",
                                ("structured", "linear"), G)  # fmt: skip
    prune_heads: bool = opt(False, "also gate and remove attention heads", group=G)
    gate_low_rank: int = opt(0, "rank of a trainable low-rank term inside the gates (0: none)", group=G)
    gate_width_multiple: int = opt(
        64, "round the kept MLP width to a multiple of this (when the width is at least 4x it)", group=G
    )
    gate_tolerance: float = opt(
        0.02,
        "share of the removed channels/heads that may still be open at the end without an error",
        group=G,
    )
    gate_force: bool = opt(
        False, "export even when more than gate_tolerance must be cut open (reported)", group=G
    )
    gate_ramp: float = opt(
        0.0,
        "fraction of the steps over which the share of gates pushed shut ramps from 0 to gate_sparsity",
        group=G,
    )
    gate_train_weights: bool = opt(
        False,
        "also train the target modules' weights during gate training, at lr (CoFi, Sheared-LLaMA): what "
        "stays adapts to what is removed; with gate_distill the teacher is then a frozen copy of the model",
        group=G,
    )
    gate_distill: bool = opt(
        False,
        "train the gates on recover's KL to the teacher (distill_teacher, default the ungated model itself, "
        "no second copy; distill_temperature, distill_alpha) over the task data plus distill_general news "
        "articles, instead of the task loss",
        group=G,
    )
    recover: str = opt("none", "after the export: distil the unpruned model into the pruned one",
                       ("none", "distill"), G)  # fmt: skip
    recover_steps: int = opt(100, "recover=distill: optimizer steps", group=G)
    recover_lr: float | None = opt(None, "recover=distill: learning rate (default: lr)", group=G)
    recover_lr_scheduler: str | None = opt(
        None, "recover=distill: learning-rate schedule of the recovery (default: lr_scheduler)", SCHEDULERS, G
    )
    recover_warmup_steps: int | None = opt(
        None,
        "recover=distill: warm-up steps of the recovery (default: warmup_steps); AdamW's first steps move "
        "every weight by about the learning rate",
        group=G,
    )
    recover_params: str = opt("rows", "recover=distill: train rows of the pruned model (at --budget) or all of it",
                              ("rows", "full"), G)  # fmt: skip
    distill_teacher: str | None = opt(
        None, "recover=distill: the teacher (default: the unpruned --model)", group=G
    )
    distill_general_teacher: str | None = opt(
        None,
        "the teacher on the distill_general news articles (default: the teacher's own), e.g. the model before "
        "task tuning: its distribution on general text is the language model to keep (a second frozen copy)",
        group=G,
    )
    distill_hidden: float = opt(
        0.0,
        "weight of a layer-wise term beside the KL (CoFi): every layer's hidden states pulled towards the "
        "teacher's, cosine distance per token averaged over layers (0: logits only)",
        group=G,
    )
    distill_answer: float = opt(
        0.0,
        "weight of a KL term at the task's answer tokens, averaged per example like the task loss: the "
        "teacher's decision and its calibration, which the per-token KL counts as one position of many (0: off)",
        group=G,
    )
    distill_temperature: float = opt(2.0, "recover=distill: softmax temperature of the KL term", group=G)
    distill_alpha: float = opt(0.0, "recover=distill: weight of the task loss next to the KL (0..1)", group=G)
    distill_general: int = opt(
        0,
        "recover=distill: news articles added to the task data (limits forgetting), whole, in windows of "
        "max_length tokens",
        group=G,
    )


def gate_config(cfg: Any) -> Any:
    from neurontune.gate_config import GateConfig

    if not 0.0 <= cfg.gate_ramp < 1.0:
        raise NeurontuneError(
            f"gate_ramp must be in [0, 1) (the target is reached before the end), got {cfg.gate_ramp}"
        )
    return GateConfig(
        granularity=cfg.gate_granularity, target_sparsity=cfg.gate_sparsity, lam=cfg.gate_lambda,
        sigma=cfg.gate_sigma, tau=cfg.gate_tau, penalty=cfg.gate_penalty, prune_heads=cfg.prune_heads,
        low_rank=cfg.gate_low_rank, target_modules=cfg.target_modules_value(), lr=cfg.gate_lr,
        lr_scheduler=cfg.gate_lr_scheduler,
        train_weights=cfg.gate_train_weights,
        width_multiple=cfg.gate_width_multiple, tolerance=cfg.gate_tolerance, force=cfg.gate_force,
        ramp_steps=round(cfg.gate_ramp * (cfg.steps or 0)),  # steps: None while only checked (set by the data)
    )  # fmt: skip


@register
class Gates(Method):
    name = "gates"
    help = "stochastic gates that adapt and prune at once; writes output_dir/pruned"
    options = GateOptions
    outputs = ("pruned", "gates.safetensors", "recovered", "recover")
    # the gates train all their steps, to their target; with early_stopping_patience the gate training
    # keeps its best step among those at the target (best_candidates) and recover=distill stops early
    stops_early = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.info: dict[str, Any] | None = None
        self.task: Any = None
        self.tok: Any = None
        self.saved: str = "pruned"

    @classmethod
    def written_outputs(cls, cfg: Any) -> tuple[str, ...]:
        distill = ("recovered", "recover")
        return tuple(n for n in super().written_outputs(cfg) if n not in distill or cfg.recover == "distill")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        import dataclasses

        gate_config(cfg)  # validates the gate options
        recover_opts = [
            f for f in dataclasses.fields(GateOptions) if f.name.startswith(("recover_", "distill_"))
        ]
        distills = cfg.recover == "distill" or cfg.gate_distill
        for f in recover_opts:
            if is_set(cfg, f.name) and not (
                cfg.recover == "distill" or (distills and f.name.startswith("distill_"))
            ):
                what = "recover=distill" + ("" if f.name.startswith("recover_") else " or gate_distill=true")
                raise NeurontuneError(f"{f.name} is for {what}; add it or drop {f.name}")
        if cfg.recover == "distill" and (
            cfg.recover_steps <= 0
            or (cfg.recover_lr is not None and cfg.recover_lr <= 0)
            or (cfg.recover_warmup_steps or 0) < 0
        ):
            raise NeurontuneError(
                "recover=distill needs recover_steps > 0, a positive recover_lr and recover_warmup_steps >= 0"
            )
        if cfg.recover == "distill":
            schedule = _recover_schedule(cfg)
            check_warmup(
                schedule["lr_scheduler"],
                schedule["warmup_steps"],
                "recover_lr_scheduler" if cfg.recover_lr_scheduler else "lr_scheduler",
                "warmup_steps" if cfg.recover_warmup_steps is None else "recover_warmup_steps",
            )
        if distills and (
            cfg.distill_temperature <= 0
            or not 0.0 <= cfg.distill_alpha <= 1.0
            or cfg.distill_general < 0
            or cfg.distill_hidden < 0
            or cfg.distill_answer < 0
        ):
            raise NeurontuneError("distillation needs distill_temperature > 0, distill_alpha in [0, 1], "
                                  "distill_general >= 0, distill_hidden >= 0 and distill_answer >= 0")  # fmt: skip
        if cfg.gate_lr_scheduler and cfg.lr_scheduler == "constant" and not cfg.warmup_steps:
            raise NeurontuneError(
                f"gate_lr_scheduler={cfg.gate_lr_scheduler} does nothing with lr_scheduler=constant and no "
                "warmup_steps (every rate is constant already); set a schedule or drop gate_lr_scheduler"
            )
        if cfg.distill_general_teacher and not cfg.distill_general:
            raise NeurontuneError("distill_general_teacher teaches the distill_general news articles: "
                                  "set distill_general > 0 or drop distill_general_teacher")  # fmt: skip

    def check(self, model: nn.Module, out: Path) -> None:
        if self.cfg.gate_granularity == "structured":
            from neurontune.gates import check_structured

            check_structured(model)

    def build(self, model: nn.Module, tok: Any, task: Any, out: Path) -> nn.Module:
        from neurontune.gates import GatedModel

        self.task, self.tok = task, tok  # the recovery trains on the task

        gated = GatedModel(model, gate_config(self.cfg))
        if gated.plan is not None:  # what the penalty trains towards is what the export will write
            print(f"gates: the export will keep {gated.plan.describe(self.cfg.gate_sparsity)}")
        return gated

    def best_candidates(self, model: nn.Module) -> Callable[[int], bool] | None:
        """With early_stopping_patience the gate training ends at its best measured step among those at the
        target: after ``gate_ramp``'s steps, with at most ``gate_tolerance`` of what the export removes still
        open (the gated model then scores what the export will). Linear gates: after the ramp."""
        ramp, tolerance = gate_config(self.cfg).ramp_steps, self.cfg.gate_tolerance
        if self.cfg.gate_granularity != "structured":
            return lambda step: step >= ramp
        return lambda step: step >= ramp and model.open_share_of_removed() <= tolerance

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return model.param_groups(lr)  # gates at their own lr, no weight decay

    def training_examples(self, task: Any) -> list[Any]:
        """With ``gate_distill``: the task's examples plus ``distill_general`` news articles (the KL to
        the unpruned model on general text is what keeps the language model)."""
        return list(task.train) + (self._general_examples() if self.cfg.gate_distill else [])

    def training_loss(self, model: nn.Module) -> dict[str, Callable[..., Any]]:
        """With ``gate_distill``: recover's KL loss, to ``distill_teacher`` or to the ungated model
        (:meth:`~neurontune.gates.GatedModel.dense`: the same weights, gates open, low-rank terms off;
        with ``gate_train_weights`` a frozen copy of ``model``, as the weights move)."""
        if not self.cfg.gate_distill:
            return {}
        from neurontune.distill import attended_tokens
        from neurontune.runtime import process_state

        cfg = self.cfg
        frozen = cfg.distill_teacher or (cfg.model if cfg.gate_train_weights else None)  # what _teacher loads
        teacher = _teacher(cfg) if frozen else model.dense_forward
        say = print if process_state().is_main_process else _quiet
        say(f"gates: distilling {frozen or 'the ungated model'} during gate training "
              f"(T={cfg.distill_temperature:g}, task loss weight {cfg.distill_alpha:g}, "
              f"{cfg.distill_general} news articles{_teachers_note(cfg)})")  # fmt: skip
        loss = _loss(teacher, cfg)
        return {"loss_fn": loss, "count_fn": attended_tokens}

    def regularization(self, model: nn.Module) -> Callable[[int], torch.Tensor]:
        return model.regularization

    def step_stats(self, model: nn.Module) -> Callable[[], dict[str, float]]:
        return model.sparsity

    def finishes_on_every_process(self) -> bool:
        return self.cfg.recover == "distill"  # the distillation trains on every process

    def finish(self, model, tok, out, evaluate, after):
        """Save the trained gates, make the export shape uniform, remove what is shut, write
        ``output_dir/pruned`` (a plain transformers model), report the parameters removed, and
        evaluate the export. With ``recover=distill`` on several processes every process prunes the
        same way (the trained gates are the same on all) and distils; the main one alone writes."""
        from neurontune.gates import count_prunable, export_pruned, fold_linear_gates
        from neurontune.io import save_pretrained_atomic, write_safetensors
        from neurontune.runtime import count_parameters, process_state

        cfg = self.cfg
        main = process_state().is_main_process
        say = print if main else _quiet
        model.eval()
        info: dict[str, Any] = {"gated": after, "achieved_sparsity": model.sparsity()}
        gates = {k: v.contiguous() for k, v in model.state_dict_gates().items()}
        if main:
            write_safetensors(out / "gates.safetensors", gates, {"config": json.dumps(model.config_dict())})
        total_before = count_parameters(model.base_model)[1] - sum(v.numel() for v in gates.values())
        if cfg.gate_granularity == "structured":
            prunable_before = count_prunable(model.base_model)
            info["shape"] = shape = model.finalize()
            forced = shape["forced_fraction"]
            what = f"{shape['forced_channels']} of the {shape['removed_channels']} MLP channels" + (
                f" and {shape['forced_heads']} of the {shape['removed_heads']} heads"
                if "forced_heads" in shape
                else ""
            )
            if forced > cfg.gate_tolerance and not cfg.gate_force:
                raise NeurontuneError(
                    f"the gates did not reach the target: {what} that the export removes are still open "
                    f"(achieved {info['achieved_sparsity']}, target {cfg.gate_sparsity}). The trained gates are "
                    f"in {out / 'gates.safetensors'}. Train longer (steps), raise gate_lambda or gate_lr, or pass "
                    "gate_force=true to cut them anyway (reported in metrics.json)"
                )
            if forced:
                say(f"warning: the export cuts {what} although their gates were open ({forced:.1%} forced)")
            plain = export_pruned(model, out / "pruned" if main else None, tok)
            info["prunable_params"] = [prunable_before, count_prunable(plain)]
            info["removed_fraction_of_prunable"] = 1 - info["prunable_params"][1] / prunable_before
        else:  # linear gates: folded, same shapes (shut rows/columns become zeros)
            plain = fold_linear_gates(model)
            if main:
                save_pretrained_atomic(out / "pruned", plain, tok)
        info["total_params"] = [total_before, count_parameters(plain)[1]]
        say(
            f"pruned: {info['total_params'][0]:,} -> {info['total_params'][1]:,} parameters "
            f"({1 - info['total_params'][1] / info['total_params'][0]:.1%} removed); wrote {out / 'pruned'}/"
        )
        self.info = info
        exported = info["exported"] = evaluate(plain)
        if cfg.recover == "distill":
            plain, info["recovered"] = self._distill(plain, tok, out, evaluate, exported)
            self.saved = "recovered"
            return plain, info["recovered"]
        return plain, exported

    def _distill(
        self, pruned: nn.Module, tok: Any, out: Path, evaluate: Callable[..., Any], exported: dict[str, Any]
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Recover the pruned model by logit distillation from the unpruned one (neurontune.distill);
        writes ``output_dir/recovered`` (a plain transformers model) and records the KL before/after.
        Returns the recovered model and its evaluation (``evaluate``'s, on every process). With
        ``eval_steps`` the recovering model is evaluated every ``eval_steps`` like the gate phase (task
        score and news perplexity), in ``output_dir/recover/eval_log.json`` from the export (step 0) to
        the result."""
        from neurontune.distill import attended_tokens, kl_to_teacher
        from neurontune.errors import MainProcessError
        from neurontune.evaluation import EvalCurve, primary_metric
        from neurontune.io import save_pretrained_atomic
        from neurontune.runtime import process_state, share_outcome
        from neurontune.tasks import StepBatches, fixed_batches
        from neurontune.train import EarlyStopping, train, train_args

        cfg = self.cfg
        state = process_state()
        main = state.is_main_process
        say = print if main else _quiet
        # every process arrives here; the main one only once the evaluation and the pruned export are
        # written: its failure there reaches the others now, not as a hang in the training's collectives
        if error := share_outcome(state, None):
            raise MainProcessError(f"the main process failed before distillation: {error}")
        teacher = _teacher(cfg)
        examples = list(self.task.train) + self._general_examples()
        held_out = fixed_batches(self.task.eval[:16], tok, cfg.eval_batch_size, cfg.max_length)
        pruned.eval()
        kl_before = kl_to_teacher(pruned, teacher, held_out) if main else float("nan")
        if cfg.recover_params == "rows":
            from neurontune.rowtune import get_rowtune_model
            from neurontune.scoring import score_model
            from neurontune.selection import select

            scores = score_model(pruned, "magnitude", target_modules=cfg.target_modules_value())
            student = get_rowtune_model(pruned, select(pruned, scores, **cfg.budget_kwargs()))
        else:
            student = pruned.requires_grad_(True)
        say(f"recover: distilling {cfg.distill_teacher or cfg.model} into the pruned model for "
            f"{cfg.recover_steps} steps (KL to the teacher {kl_before:.4f}{_teachers_note(cfg)})")  # fmt: skip
        args = train_args(
            cfg, steps=cfg.recover_steps, lr=cfg.recover_lr or cfg.lr,
            **_recover_schedule(cfg),
        )  # fmt: skip
        data = StepBatches(examples, tok, cfg.batch_size, cfg.max_length, cfg.seed)
        # early_stopping_patience: the task's validation loss (or metric_for_best_model) on its held-out
        # examples before the recovery and every eval_steps; the recovery ends at its best step's weights
        # (the export's, when no step improves on it)
        stopper = (
            EarlyStopping(cfg, student, out / "recover" / "checkpoints" / "best.safetensors", self.validation,
                          tok, what="recover: early stopping", task=self.task)
            if self.validation
            else None
        )  # fmt: skip

        if stopper and main:
            stopper.start(cfg.resume)  # the export itself is a candidate (step 0)
        curve = (
            EvalCurve(out / "recover" / "eval_log.json", primary_metric(self.task))
            if cfg.eval_steps and main
            else None
        )
        if curve is not None and not cfg.resume:
            curve.add(0, exported)

        def on_step(row: dict[str, float]) -> dict[str, float] | None:  # the main process, after each step
            step = int(row["step"])
            if curve is not None and step % cfg.eval_steps == 0 and step < cfg.recover_steps:
                curve.add(step, evaluate(student))
                student.train()
            return stopper.on_step(row) if stopper else None

        log = train(student, data, args, out / "recover", resume=cfg.resume,
                    loss_fn=_loss(teacher, cfg),
                    count_fn=attended_tokens, on_step=on_step if stopper or curve else None,
                    stop_when=stopper.watch if stopper else None)  # fmt: skip
        last_kept = True  # the curve's last point: the last step's weights, when they are the result
        if stopper:
            stopper.restore_best(log, cfg.recover_steps, state)
            if main:
                self.info["recover_early_stopping"] = summary = stopper.summary(log)
                last_kept = summary["best_step"] in (None, len(log))
        recovered = student.merge_and_unload() if cfg.recover_params == "rows" else student
        recovered.requires_grad_(False).eval()
        if not main:
            return recovered, evaluate(recovered)
        kl_after = kl_to_teacher(recovered, teacher, held_out)
        self.info["distill_kl"] = [kl_before, kl_after]
        print(f"recover: KL to the teacher {kl_before:.4f} -> {kl_after:.4f}; wrote {out / 'recovered'}/")
        save_pretrained_atomic(out / "recovered", recovered, tok)
        results = evaluate(recovered)
        if curve is not None and last_kept:  # the result is the last step's weights: the curve's end
            curve.add(len(log), results)
        return recovered, results

    def _general_examples(self) -> list[Any]:
        """``distill_general`` news articles, every token of them, as prompt-less examples of at most
        ``max_length`` tokens (:func:`~neurontune.tasks.text_windows`)."""
        from neurontune.tasks import general_train_text, text_windows

        n = self.cfg.distill_general
        return text_windows(general_train_text(n, max_chars=None), self.tok, self.cfg.max_length) if n else []

    def save(self, model: nn.Module, tok: Any, out: Path) -> Path:
        return out / self.saved  # written by finish()

    def metrics(self) -> dict[str, Any]:
        return {"gates": self.info}

    def report_rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        g, key = self.info, metrics["primary_metric"]
        before, after = g["total_params"]
        sparsity = ", ".join(f"{k} {v:.3f}" for k, v in g["achieved_sparsity"].items())
        return [
            ("parameters after pruning", f"{before:,} -> {after:,} ({1 - after / before:.1%} removed)"),
            ("gate sparsity at the end of training", sparsity),
            (f"{key} of the gated model", f"{g['gated'][key]:.4g} (after: the pruned export)"),
            ("open gates cut by the export", f"{g.get('shape', {}).get('forced_fraction', 0.0):.1%}"),
        ] + ([(f"{key} of the export before recovery", f"{g['exported'][key]:.4g}"),
              ("KL to the teacher, before -> after distillation", "{:.4f} -> {:.4f}".format(*g["distill_kl"]))]
             if "recovered" in g else [])  # fmt: skip


def _teacher(cfg: Any, name: str | None = None) -> nn.Module:
    """The distillation teacher: ``name``, else ``distill_teacher``, else the unpruned ``model``; frozen, in
    eval mode."""
    from neurontune.models import load_model
    from neurontune.runtime import device

    teacher = load_model(name or cfg.distill_teacher or cfg.model, dtype=cfg.dtype, device=device())[0]
    return teacher.requires_grad_(False).eval()


def _general_teacher(cfg: Any) -> nn.Module | None:
    """``distill_general_teacher``, loaded (``None``: the news articles have the task's teacher)."""
    return _teacher(cfg, cfg.distill_general_teacher) if cfg.distill_general_teacher else None


def _loss(teacher: Callable[..., Any], cfg: Any) -> Callable[..., torch.Tensor]:
    """The distillation's loss (gate phase and recovery alike)."""
    from neurontune.distill import distill_loss

    return distill_loss(
        teacher, cfg.distill_temperature, cfg.distill_alpha, _general_teacher(cfg), cfg.distill_hidden,
        cfg.distill_answer,
    )  # fmt: skip


def _recover_schedule(cfg: Any) -> dict[str, Any]:
    """The recovery's ``lr_scheduler`` and ``warmup_steps`` (its own, else the run's), as
    :func:`~neurontune.train.train_args` overrides."""
    return {
        "lr_scheduler": cfg.recover_lr_scheduler or cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps if cfg.recover_warmup_steps is None else cfg.recover_warmup_steps,
    }


def _teachers_note(cfg: Any) -> str:
    return (
        (f", taught by {cfg.distill_general_teacher}" if cfg.distill_general_teacher else "")
        + (f"; hidden states weight {cfg.distill_hidden:g}" if cfg.distill_hidden else "")
        + (f"; answers weight {cfg.distill_answer:g}" if cfg.distill_answer else "")
    )


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` on the processes that are not the main one."""
