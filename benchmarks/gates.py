"""Stochastic gates on the embedded default: prune ~30 %, recover by distillation, measure quality and
CPU speed against the unpruned row-sparse run of the same training budget, in one run.

    python benchmarks/gates.py                      # SmolLM2-135M, Rotten Tomatoes + E2E NLG, 3 seeds
    python benchmarks/gates.py --model tiny-llama --gate-steps 3 --recover-steps 2 --seeds 0 \\
        --eval-examples 8 --forgetting-examples 2 --speed-repeats 2 --out /tmp/g     # smoke run
    python benchmarks/gates.py --render             # rebuild the markdown and the curve from the JSON

Every training run is ``neurontune finetune`` in a fresh subprocess, with the same data and
evaluation as benchmarks/quality.py. Per task and seed:

- ``rows (unpruned)``: row-sparse tuning of the whole model (magnitude rows at the LoRA r=8 budget,
  lr 3e-4) for ``--gate-steps + --recover-steps`` steps (plus ``--teacher-steps``): the quality to hold,
  at the same budget; with ``--early-stopping`` and a teacher that stopped before its cap, the teacher's
  run itself (the same run up to that step, which then stops at the same step);
- ``gates S + distill``: ``method=gates`` at target S (MLP channels and query heads, or with
  ``--no-prune-heads`` MLP channels only; the export shape printed and trained for), ``--gate-steps``
  steps, then ``recover=distill`` (none with ``--recover-steps 0``): the pruned export (all its weights,
  ``recover_params=full``, or with ``--recover-params rows`` its rows at the LoRA r=8 budget) distilled
  from the unpruned base for ``--recover-steps`` steps (KL at temperature 2 plus the task loss, weight
  ``--distill-alpha``; ``--distill-general`` news articles mixed into the data against forgetting). One
  run gives three numbers: the gated model in eval mode (*gated*), the uniform export (*exported*), the
  export after distillation (*recovered*).

``--jobs N`` runs N training runs at once, each with CPUs/N threads (the wall times depend on it, and
the gates runs' scores too, through the floating-point order that this gate training amplifies: up to
3.6 points on one seed between one and two threads, README); the teachers start first, every other run
of a seed once its teacher has finished, the 30 % runs before the rest of the curve. The speed
measurement runs alone afterwards.

``gate_force=true``: a run whose gates fall short of the target is exported anyway and the forced
fraction is reported (the CLI default stops instead).

Speed (CPU, fp32, this process, all threads): prefill latency (1 x 128 tokens), batched forward
throughput (8 x 128) and greedy decoding throughput (1 x 32 new tokens), median of
``--speed-repeats`` rounds, every round timing each model in turn. The models: the original, each
recovered export of the first seed, and random-init models of the original's shape with only the
MLP width changed (the export's rounded width, the unrounded width it came from, and its nearest
multiples of 64), to measure whether rounding to a multiple of 64 changes speed (shape alone sets
the cost). Writes ``results/gates.{json,md}`` and ``results/gates_summary.json`` (means at the
30 % target).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from neurontune.bench import (
    add_run_args,
    code_commit,
    command_line,
    finetune_run,
    machine,
    render_only,
    write_results,
)

RESULTS = Path(__file__).parent / "results"
SUMMARY_TARGET = 0.3  # the target: the summary's means are over the seeds at it
TASKS = {"rotten_tomatoes": "accuracy", "e2e_nlg": "rougeL", "hyperbaton": "accuracy"}


def common(args: argparse.Namespace, task: str, seed: int) -> list[str]:
    return [
        f"task={task}", f"seed={seed}", f"batch_size={args.batch_size}",
        f"train_examples={args.train_examples}", f"eval_examples={args.eval_examples}",
        f"forgetting_examples={args.forgetting_examples}", "eval_before=false", "save_steps=0",
        "budget=lora:8",
    ] + ([f"eval_steps={args.eval_steps}", f"early_stopping_patience={args.early_stopping}"]
         if args.early_stopping else []) + (
        # the default's command text stays as it was (--reuse)
        [f"metric_for_best_model={args.metric_for_best_model}"] if args.metric_for_best_model != "loss" else []
    )  # fmt: skip


def total_steps(args: argparse.Namespace) -> int:
    """Every training step of a gates pipeline (the teacher's included): the unpruned reference's."""
    return args.gate_steps + args.recover_steps + (args.teacher_steps if args.recipe == "teacher" else 0)


def rows(args: argparse.Namespace, steps: int) -> list[str]:
    return [f"model={args.model}", "method=rows", "scorer=magnitude", "lr=3e-4", f"steps={steps}"]


def gates(args: argparse.Namespace, sparsity: float, teacher: Path | None) -> list[str]:
    run = [
        "method=gates", f"gate_sparsity={sparsity}", f"prune_heads={str(args.prune_heads).lower()}",
        f"gate_lr={args.gate_lr:g}", f"gate_lambda={args.gate_lambda}", f"steps={args.gate_steps}", "gate_force=true",
    ]  # fmt: skip
    if args.lr_scheduler != "constant":  # the default's command text stays as it was (--reuse)
        run.append(f"lr_scheduler={args.lr_scheduler}")
    if args.warmup_steps:
        run.append(f"warmup_steps={args.warmup_steps}")
    if args.gate_lr_scheduler:
        run.append(f"gate_lr_scheduler={args.gate_lr_scheduler}")
    if args.ema_decay:  # the default's command text stays as it was (--reuse)
        run.append(f"ema_decay={args.ema_decay:g}")
    if args.recover_steps:  # 0: the export is the result
        run += ["recover=distill", f"recover_steps={args.recover_steps}", f"recover_params={args.recover_params}",
                f"recover_lr={args.recover_lr}"]  # fmt: skip
        if args.recover_lr_scheduler:
            run.append(f"recover_lr_scheduler={args.recover_lr_scheduler}")
        if args.recover_warmup_steps is not None:
            run.append(f"recover_warmup_steps={args.recover_warmup_steps}")
    if args.recover_steps or teacher is not None:  # a distillation to configure
        run += [f"distill_alpha={args.distill_alpha}", f"distill_general={args.distill_general}"]
        if args.distill_hidden:  # the default's command text stays as it was (--reuse)
            run.append(f"distill_hidden={args.distill_hidden}")
        if args.distill_answer:
            run.append(f"distill_answer={args.distill_answer}")
    if teacher is None:
        return [f"model={args.model}", "lr=3e-4", *run]
    # the task-tuned dense model is both the model gated and the teacher of both distillations
    adapt = (
        [f"lr={args.gate_weights_lr}", "gate_train_weights=true"]
        if args.gate_weights_lr
        else [f"lr={args.low_rank_lr}", f"gate_low_rank={args.gate_low_rank}"]
    )
    if args.general_teacher == "base":  # the news articles distilled from the model before task tuning
        adapt.append(f"distill_general_teacher={args.model}")
    return [f"model={teacher}", *run, f"gate_ramp={args.gate_ramp}", "gate_distill=true", *adapt]


def planned_jobs(args: argparse.Namespace) -> list[dict]:
    """Every training run, in report order: per seed and task the teacher, the unpruned reference and the
    gates runs; ``after`` is the index of the teacher a run needs (its model, or for the reference its
    early stop), ``None`` for none."""
    everything = [(t, s) for t, ss in (("rotten_tomatoes", args.sparsities), ("e2e_nlg", args.gen_sparsities),
                                        ("hyperbaton", args.mc_sparsities)) for s in ss]  # fmt: skip
    jobs: list[dict] = []
    for seed in args.seeds:
        curve = args.curve_seeds is None or seed in args.curve_seeds
        plan = [(t, s) for t, s in everything if curve or s == SUMMARY_TARGET]
        for task in dict.fromkeys(t for t, _ in plan):
            base, out = common(args, task, seed), args.runs / args.recipe / task / f"seed{seed}"
            here = [("rows (unpruned)", 0.0, rows(args, total_steps(args)), "rows")]
            teacher = None
            if args.recipe == "teacher":
                teacher = out / "teacher" / "merged"
                here.insert(0, ("teacher (rows)", 0.0, [*rows(args, args.teacher_steps), "save_merged=true"],
                                "teacher"))  # fmt: skip
            then = " + distill" if args.recover_steps else ""
            here += [
                (f"gates {s:.0%}{then}", s, gates(args, s, teacher), f"gates-{s}")
                for t, s in plan
                if t == task
            ]
            first = len(jobs)
            for name, sparsity, overrides, folder in here:
                jobs.append({
                    "task": task, "seed": seed, "name": name, "sparsity": sparsity, "folder": out / folder,
                    "overrides": [*base, *overrides],
                    "after": first if teacher is not None and folder != "teacher" else None,
                })  # fmt: skip
    return jobs


def priority(job: dict) -> tuple:
    """Which ready run starts first with ``--jobs`` > 1: teachers (everything waits on them), then the
    30 % runs (the summary), then the references, then the rest of the curve."""
    rank = 0 if job["after"] is None and job["name"].startswith("teacher") else 1
    if job["name"] == "rows (unpruned)":
        rank = 2
    elif job["sparsity"] and job["sparsity"] != SUMMARY_TARGET:
        rank = 3
    return rank, job["seed"]


def training_runs(args: argparse.Namespace) -> list[dict]:
    """Every planned run, ``args.jobs`` at a time (each with CPUs/jobs threads: wall times depend on it, and
    the gates runs' scores through the floating-point order), a run starting once the teacher it needs has
    finished; results in plan order."""
    import os
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    plan = planned_jobs(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    done: dict[int, dict] = {}

    def run(i: int) -> dict:
        job = plan[i]
        teacher_run = done.get(job["after"]) if job["after"] is not None else None
        if job["name"] == "rows (unpruned)" and (same := reference_from_teacher(teacher_run)):
            m = same
        else:
            m = finetune_run(job["overrides"], job["folder"], reuse=args.reuse, threads=threads)
        m.update(name=job["name"], target_sparsity=job["sparsity"], seed=job["seed"])
        metric, g = TASKS[job["task"]], m.get("gates") or {}
        extra = (
            f" (gated {g['gated'][metric]:.3f}, exported {g['exported'][metric]:.3f}, "
            f"{g['removed_fraction_of_prunable']:.1%} removed, forced {_forced(g['shape'])})"
            if g else ""
        )  # fmt: skip
        line = f"{job['task']} seed {job['seed']} {job['name']}: {metric} {m['after'][metric]:.3f}{extra} wall {wall(m)}"
        # one write, so the lines of two runs that end at once do not interleave
        print(line + "\n", end="", flush=True)
        m["loss_curves"] = {
            phase: curve
            for phase, log in (("train", job["folder"] / "train_log.csv"),
                               ("recover", job["folder"] / "recover" / "train_log.csv"))
            if (curve := loss_curve(log))
        }  # fmt: skip
        if m["method"] == "gates" and (points := gate_eval_curve(job["folder"])):
            m["gate_eval_curve"] = points
        if (log := job["folder"] / "recover" / "eval_log.json").is_file():  # the recovery's, from the export
            m["recover_eval_curve"] = json.loads(log.read_text())["points"]
        return m

    waiting = sorted(range(len(plan)), key=lambda i: priority(plan[i]))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running: dict = {}
        while waiting or running:
            for i in [i for i in waiting if plan[i]["after"] is None or plan[i]["after"] in done]:
                if len(running) < args.jobs:
                    waiting.remove(i)
                    running[pool.submit(run, i)] = i
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    done[running.pop(f)] = f.result()
                except BaseException:  # a failed run: start no other; the finished ones stay in --runs
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return [done[i] for i in range(len(plan))]


def reference_from_teacher(teacher: dict | None) -> dict | None:
    """The unpruned reference's result when it is the teacher's: both are the same rows run (same seed,
    data order and constant learning rate; only the step cap differs, ``--teacher-steps`` against every
    step of the pipeline), so when the teacher's early stopping ended it before its cap the reference
    takes the same steps and stops at the same one. ``None``: the reference must run (no early stop)."""
    if teacher is None or not (teacher.get("early_stopping") or {}).get("stopped"):
        return None
    return {**teacher, "same_as": "teacher (rows)", "wall_seconds": None}


def gate_eval_curve(run: Path) -> list[dict] | None:
    """The gated model's evaluations along the gate training (``eval_steps``: ``eval_log.json``), each
    with the share of gates shut at that step (``train_log.csv``): what the pruning costs as it goes."""
    import csv
    import json

    if not (run / "eval_log.json").is_file() or not (run / "train_log.csv").is_file():
        return None
    with open(run / "train_log.csv") as f:
        shut = {
            int(r["step"]): float(r["gate_sparsity"]) for r in csv.DictReader(f) if r.get("gate_sparsity")
        }
    points = json.loads((run / "eval_log.json").read_text())["points"]
    return [{**p, "gate_sparsity": shut.get(int(p["step"]))} for p in points]


def loss_curve(path: Path, windows: int = 10) -> list[float] | None:
    """A training log's loss as ``windows`` means over equal spans of its steps (when it flattens)."""
    import csv

    if not path.is_file():
        return None
    with open(path) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    if not losses:
        return None
    n = max(1, len(losses) // windows)
    return [statistics.mean(losses[i : i + n]) for i in range(0, len(losses) - n + 1, n)][:windows]


# ---- speed ----------------------------------------------------------------------------------------
def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def with_width(config, intermediate: int) -> torch.nn.Module:
    """A random-init model of ``config`` with only the MLP width changed (the cost depends on the shapes
    alone)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.intermediate_size = intermediate
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def speeds(models: dict[str, torch.nn.Module], repeats: int) -> list[dict]:
    """Time every model in turn, round after round (so drifts in CPU speed hit all of them alike):
    prefill 1 x 128, forward 8 x 128, greedy decoding of 32 tokens; medians over ``repeats`` rounds."""
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    one = torch.randint(0, vocab, (1, 128), generator=g)
    batch = torch.randint(0, vocab, (8, 128), generator=g)
    prompt = torch.randint(0, vocab, (1, 32), generator=g)
    new = 32

    def jobs(m):
        return {
            "prefill": lambda: m(input_ids=one),
            "batched": lambda: m(input_ids=batch),
            "decode": lambda: m.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            ),
        }  # fmt: skip

    times = {label: {k: [] for k in ("prefill", "batched", "decode")} for label in models}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for label, m in models.items():
            for k, fn in jobs(m).items():
                t = _seconds(fn)
                if r:
                    times[label][k].append(t)
    out = []
    for label, m in models.items():
        med = {k: statistics.median(v) for k, v in times[label].items()}
        out.append({
            "label": label, "params": sum(p.numel() for p in m.parameters()),
            "intermediate_size": m.config.intermediate_size, "num_attention_heads": m.config.num_attention_heads,
            "prefill_ms": 1000 * med["prefill"], "batch_tokens_per_s": batch.numel() / med["batched"],
            "decode_tokens_per_s": new / med["decode"],
        })  # fmt: skip
    return out


def speed_models(args: argparse.Namespace, runs: list[dict]) -> dict[str, torch.nn.Module]:
    from neurontune.models import load_model

    models = {"original": load_model(args.model)[0].eval()}
    first = [m for m in runs if m["method"] == "gates" and m["seed"] == args.seeds[0]]
    for m in first:
        if m["task"] == "rotten_tomatoes":
            models[f"{m['name']} (seed {m['seed']})"] = load_model(m["saved"])[0].eval()
    ref = next((m for m in first if m["target_sparsity"] == SUMMARY_TARGET), first[0] if first else None)
    if ref is not None and (kept := ref["gates"].get("shape", {}).get("intermediate_size")):
        from neurontune.gate_config import GateConfig
        from neurontune.gates import export_plan

        config = models["original"].config  # the export's width before rounding to a multiple of 64
        unrounded = GateConfig(
            target_sparsity=ref["target_sparsity"], prune_heads=args.prune_heads, width_multiple=1
        )
        raw = export_plan(config, config.intermediate_size, unrounded).mlp_keep
        widths = sorted({kept, raw, raw // 64 * 64, -(-raw // 64) * 64} - {0})
        for w in widths:
            label = f"width {w}" + (" (export)" if w == kept else " (unrounded)" if w == raw else "")
            models[label] = with_width(models["original"].config, w)
    return models


# ---- summary and report ---------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def summary(runs: list[dict], speed: list[dict], target: float = SUMMARY_TARGET) -> dict:
    """Per task, means over seeds at ``target``: what the issue asks to be machine-readable."""
    base = speed[0] if speed else None
    out: dict[str, dict] = {}
    for task, metric in TASKS.items():
        g = [
            m for m in runs if m["task"] == task and m["method"] == "gates" and m["target_sparsity"] == target
        ]
        u = [m for m in runs if m["task"] == task and m["name"] == "rows (unpruned)"]
        if not g:
            continue
        sp = next((r for r in speed if r["label"].startswith(g[0]["name"])), None)
        out[task] = {
            "metric": metric,
            "target_sparsity": target,
            "seeds": sorted(m["seed"] for m in g),
            "removed_fraction": _mean([m["gates"]["removed_fraction_of_prunable"] for m in g]),
            "forced_fraction": _mean([m["gates"]["shape"]["forced_fraction"] for m in g]),
            "unpruned": _mean([m["after"][metric] for m in u]),
            "gated": _mean([m["gates"]["gated"][metric] for m in g]),
            "exported": _mean([m["gates"]["exported"][metric] for m in g]),
            "recovered": _mean([m["after"][metric] for m in g]),
            "per_seed": {
                "unpruned": [m["after"][metric] for m in u],
                "gated": [m["gates"]["gated"][metric] for m in g],
                "exported": [m["gates"]["exported"][metric] for m in g],
                "recovered": [m["after"][metric] for m in g],
            },
            "decode_speedup": sp["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if sp and base
            else None,
            "forgetting_ppl": _mean([m["after"]["forgetting_ppl"] for m in g]),
            "forgetting_ppl_unpruned": _mean([m["after"]["forgetting_ppl"] for m in u]),
        }
    return out


def curve(result: dict, path: Path) -> None:
    """Score against the share of MLP+attention parameters removed, per task (mean over the seeds that ran
    every target; the unpruned reference at 0), one panel per task: ``gates_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    tasks = [t for t in TASKS if any(m["task"] == t and m["method"] == "gates" for m in runs)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = TASKS[task]
        gated = [m for m in runs if m["task"] == task and m["method"] == "gates"]
        targets = {m["target_sparsity"] for m in gated}
        # the seeds that ran every target (--curve-seeds): each point a mean over the same seeds
        seeds = [s for s in dict.fromkeys(m["seed"] for m in gated)
                 if {m["target_sparsity"] for m in gated if m["seed"] == s} == targets]  # fmt: skip
        ref = [
            m["after"][metric]
            for m in runs
            if m["task"] == task and m["name"] == "rows (unpruned)" and m["seed"] in seeds
        ]
        points = {}
        for m in gated:
            if m["seed"] in seeds:
                points.setdefault(m["target_sparsity"], []).append(m)
        xs = [0.0] + [
            statistics.mean(m["gates"]["removed_fraction_of_prunable"] for m in ms) for ms in points.values()
        ]
        ys = [statistics.mean(ref)] + [
            statistics.mean(m["after"][metric] for m in ms) for ms in points.values()
        ]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([100 * xs[i] for i in order], [ys[i] for i in order], marker="o", label="gates + distill")
        ax.axhline(statistics.mean(ref), color="grey", linestyle="--", linewidth=1, label="unpruned")
        seeds_text = ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
        ax.set(title=f"{task} ({seeds_text})", xlabel="MLP+attention parameters removed (%)", ylabel=metric)
        handles = ax.get_legend_handles_labels()
        # the news perplexity beside the score: the language model the pruning keeps
        unpruned_ppl = [m["after"].get("forgetting_ppl") for m in runs
                        if m["task"] == task and m["name"] == "rows (unpruned)" and m["seed"] in seeds]  # fmt: skip
        ppl = [unpruned_ppl] + [[m["after"].get("forgetting_ppl") for m in ms] for ms in points.values()]
        if all(v is not None for vs in ppl for v in vs):
            twin = ax.twinx()
            twin.plot([100 * xs[i] for i in order], [statistics.mean(ppl[i]) for i in order], marker="s",
                      color="tab:red", linestyle=":", label="news perplexity")  # fmt: skip
            twin.set_ylabel("news perplexity", color="tab:red")
            more = twin.get_legend_handles_labels()
            handles = (handles[0] + more[0], handles[1] + more[1])
        ax.legend(*handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recipe_text(s: dict) -> str:
    """The settings of a result, in words."""
    teacher = s.get("recipe", "base") == "teacher"
    total = s["gate_steps"] + s["recover_steps"] + (s["teacher_steps"] if teacher else 0)
    text = (
        f"Teacher: rows (magnitude, LoRA r=8 budget, lr 3e-4) for {s['teacher_steps']} steps, merged; it is the "
        "model gated and the teacher of both distillations. "
        if teacher
        else ""
    )
    text += (
        f"Gates: {s['gate_steps']} steps (gate lr {s.get('gate_lr', 0.05):g}, ranked penalty, lambda {s['gate_lambda']:g}"
        + (
            f", target ramped over the first {s['gate_ramp']:.0%} of the steps, "
            + (
                f"the weights of every linear module trained with the gates at lr {s['gate_weights_lr']:g}"
                if s.get("gate_weights_lr")
                else f"low-rank terms r={s['gate_low_rank']} at lr {s['low_rank_lr']:g}"
            )
            + f", loss: KL to the ungated teacher at T=2 + {s['distill_alpha']:g} x task loss "
            f"on the task data and {s['distill_general']} news articles"
            + (
                " (the news distilled from the base model before task tuning, here and in the recovery)"
                if s.get("general_teacher") == "base"
                else ""
            )
            + _hidden_text(s)
            if teacher
            else ""
        )
        + "), MLP channels"
        + (" and query heads" if s.get("prune_heads", True) else " only (no heads)")
        + ", export widths rounded to multiples of 64. "
    )
    text += (
        f"Distillation: {s['recover_steps']} steps, "
        + (
            "rows of the export (magnitude, LoRA r=8 budget)"
            if s.get("recover_params") == "rows"
            else "all weights of the export"
        )
        + f", lr {s['recover_lr']:g}, KL at T=2 + "
        f"{s['distill_alpha']:g} x task loss{_hidden_text(s)}, {s['distill_general']} news articles mixed in. "
        if s["recover_steps"]
        else "No recovery: the export is the result. "
    )
    if s.get("lr_scheduler", "constant") != "constant" or s.get("warmup_steps"):
        text += (
            f"Learning rates of the gates runs: {s.get('lr_scheduler', 'constant')} schedule"
            + (f" with warmup_steps={s['warmup_steps']}" if s.get("warmup_steps") else "")
            + " over the gate phase's steps, again over the recovery's (the teacher and the reference: constant)"
            + (
                f"; the gates keep their rate, only the {'weights' if s.get('gate_weights_lr') else 'low-rank terms'} "
                "follow it. "
                if s.get("gate_lr_scheduler")
                else ". "
            )
        )
    if s.get("ema_decay"):
        text += (
            f"The gates runs keep a moving average of what they train (ema_decay={s['ema_decay']:g}, Polyak): it "
            "is what is evaluated along them, what their best step keeps and what is exported and recovered. "
        )
    if s.get("recover_lr_scheduler") or s.get("recover_warmup_steps") is not None:
        sched = s.get("recover_lr_scheduler") or s.get("lr_scheduler", "constant")
        warm = (
            s.get("warmup_steps", 0) if s.get("recover_warmup_steps") is None else s["recover_warmup_steps"]
        )
        text += (
            f"The recovery's learning rate: {sched} schedule"
            + (f" with {warm} warm-up steps" if warm else "")
            + ". "
        )
    text += (
        f"Unpruned reference: rows (magnitude, LoRA r=8 budget, lr 3e-4) for {total} steps (every step of the "
        "gates pipeline)."
    )
    if s.get("early_stopping"):
        text += (
            f" Early stopping: the teacher, the reference and the recovery end at their best step by the validation "
            f"{_best_metric_text(s)} on the last 10 % of the training examples (held out of every phase), measured every "
            f"{s['eval_steps']} steps, patience {s['early_stopping']}; the gate phase runs all its steps and ends "
            "at its best measured step among those at the target (after the ramp, what the export removes shut); "
            "the step counts above are maxima. A teacher that stopped before its cap is also the reference (the same "
            "rows run with a constant learning rate and the same seed and data takes the same steps to the same "
            "stop), which is then not run twice."
        )
    return text


def _forced(shape: dict) -> str:
    """The share of what the export removes that was still open, with the count when there is any (a
    channel or two round to 0.0 % but change the function: the export then differs from the gated model)."""
    n = shape.get("forced_channels", 0) + shape.get("forced_heads", 0)
    if not n:
        return "0"
    what = [
        f"{shape[k]} {w}"
        for k, w in (("forced_channels", "channels"), ("forced_heads", "heads"))
        if shape.get(k)
    ]
    return f"{shape['forced_fraction']:.2%} ({', '.join(what)})"


def _hidden_text(s: dict) -> str:
    """The distillation's extra terms, in words."""
    return (
        f" + {s['distill_hidden']:g} x the layers' hidden-state error (cosine distance per token)"
        if s.get("distill_hidden")
        else ""
    ) + (
        f" + {s['distill_answer']:g} x the KL at the task's answers, per example"
        if s.get("distill_answer")
        else ""
    )


def _curve_point(p: dict, metric: str, shut: bool = True) -> str:
    """``step: shut, score [first label's share], ppl`` (``shut=False``: without the share of gates shut;
    the share of the examples answered with the first label word, where the evaluation counted it)."""
    gates = ("-" if p.get("gate_sparsity") is None else f"{p['gate_sparsity']:.0%}") + ", " if shut else ""
    score = f"{p[metric]:.3f}" if metric == "accuracy" else f"{p[metric]:.1f}"
    if p.get("label_shares"):
        word, share = next(iter(p["label_shares"].items()))
        score += f" [{word} {share:.0%}]"
    ppl = f", {p['forgetting_ppl']:.0f}" if "forgetting_ppl" in p else ""
    return f"{p['step']}: {gates}{score}{ppl}"


def wall(m: dict) -> str:
    if m.get("same_as"):
        return "same run as the teacher"
    return "reused (--reuse)" if m.get("wall_seconds") is None else f"{m['wall_seconds']:.0f}"


def _best_metric_text(s: dict) -> str:
    metric = s.get("metric_for_best_model", "loss")
    return "loss" if metric == "loss" else f"{metric} (metric_for_best_model)"


def best_step(m: dict) -> str:
    """Early stopping's choice, ``best of last measured``: the run's, or for a gates run the gate phase's
    (its best step at the target) and the recovery's; ``-`` without it."""

    def one(es: dict | None) -> str:
        if not es or es.get("best_step") is None:
            return "-"
        measured = next(v for k, v in es.items() if k.startswith("val_"))  # val_loss or val_<metric>
        return f"{es['best_step']} of {max(measured, key=int)}" + (" (stopped)" if es["stopped"] else "")

    if m["method"] != "gates":
        return one(m.get("early_stopping"))
    return f"gates {one(m.get('early_stopping'))}, recovery {one(m['gates'].get('recover_early_stopping'))}"


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Stochastic gates: parameters removed, quality, and CPU speed of the pruned model",
        "",
        f"`{result['command']}` on {result['machine']}; {result['date']}"
        + (
            f"; code {result['commit']}"
            if result.get("commit")
            else "; each run's code commit is its `source`"
        )
        + f". Model `{s['model']}`, batch "
        f"{s['batch_size']} from the first {s['train_examples']} training examples, seeds {s['seeds']}, eval on "
        f"{s['eval_examples']} held-out examples, forgetting = perplexity on {s['forgetting_examples']} news "
        f"articles. {recipe_text(s)}",
        "",
        "| task | seed | run | MLP+attn params removed | forced open | gated | exported | after distill / score "
        "| forgetting ppl | wall s | best step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["runs"]:
        metric = TASKS[m["task"]]
        g = m.get("gates") or {}
        fmt = (lambda v: f"{v:.3f}") if metric == "accuracy" else (lambda v: f"{v:.1f}")
        removed = f"{g['removed_fraction_of_prunable']:.1%}" if g else "-"
        forced = _forced(g["shape"]) if g else "-"
        lines.append(
            f"| {m['task']} | {m['seed']} | {m['name']} | {removed} | {forced} | "
            f"{fmt(g['gated'][metric]) if g else '-'} | {fmt(g['exported'][metric]) if g else '-'} | "
            f"{metric} {fmt(m['after'][metric])} | {m['after']['forgetting_ppl']:.2f} | {wall(m)} | "
            f"{best_step(m)} |"
        )
    curves = [m for m in result["runs"] if m.get("loss_curves") and m["method"] == "gates"]
    if curves:
        lines += ["", "Loss by tenths of each phase, to see where it flattens (gate training: with `--recipe teacher` "
                  "the distillation loss, T^2 KL to the teacher + alpha x task loss, else the task loss; recovery: "
                  "the distillation loss after the export):", "",
                  "| task | seed | run | phase | loss, mean of each tenth of the steps |", "|---|---|---|---|---|"]  # fmt: skip
        for m in curves:
            for phase, c in m["loss_curves"].items():
                lines.append(
                    f"| {m['task']} | {m['seed']} | {m['name']} | {phase} | {' '.join(f'{v:.3g}' for v in c)} |"
                )
    along = [m for m in result["runs"] if m.get("gate_eval_curve")]
    if along:
        lines += ["", "The gated model along the gate training (evaluated every `--eval-steps`; share of the gates "
                  "shut at that step, score [share of the examples answered with the first label, where counted], "
                  "news perplexity):", "",
                  "| task | seed | run | step: shut, score, ppl |", "|---|---|---|---|"]  # fmt: skip
        for m in along:
            metric = TASKS[m["task"]]
            lines.append(
                f"| {m['task']} | {m['seed']} | {m['name']} | "
                + "; ".join(_curve_point(p, metric) for p in m["gate_eval_curve"])
                + " |"
            )
    recovering = [m for m in result["runs"] if m.get("recover_eval_curve")]
    if recovering:
        lines += ["", "The pruned model along the recovery (the export at step 0, then every `--eval-steps`; score, "
                  "news perplexity):", "", "| task | seed | run | step: score, ppl |", "|---|---|---|---|"]  # fmt: skip
        for m in recovering:
            metric = TASKS[m["task"]]
            lines.append(
                f"| {m['task']} | {m['seed']} | {m['name']} | "
                + "; ".join(_curve_point(p, metric, shut=False) for p in m["recover_eval_curve"])
                + " |"
            )
    lines += ["", "Means over seeds at the 30 % target (`gates_summary.json`):", "",
              "| task | metric | removed | unpruned | gated | exported | recovered | recovered - unpruned "
              "| decode speed-up | forgetting ppl (unpruned) |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, r in result["summary"].items():
        f = (lambda v: f"{v:.3f}") if r["metric"] == "accuracy" else (lambda v: f"{v:.1f}")
        sp = r["decode_speedup"]
        lines.append(
            f"| {task} | {r['metric']} | {r['removed_fraction']:.1%} | {f(r['unpruned'])} | {f(r['gated'])} | "
            f"{f(r['exported'])} | {f(r['recovered'])} | {f(r['recovered'] - r['unpruned'])} | "
            f"{'-' if sp is None else f'{sp:.2f}x'} | {r['forgetting_ppl']:.1f} ({r['forgetting_ppl_unpruned']:.1f}) |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    base = result["speed"][0]
    lines += [
        "",
        f"CPU speed ({result['threads']} threads, fp32, median of {s['speed_repeats']} rounds; every round times "
        "each model in turn; `width N`: random-init models of the original shape with only the MLP width changed):",
        "",
        "| model | params | intermediate / heads | prefill 1x128 ms | batched 8x128 tok/s | decode tok/s "
        "| speed-up prefill / batched / decode |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["speed"]:
        lines.append(
            f"| {r['label']} | {r['params']:,} | {r['intermediate_size']} / {r['num_attention_heads']} | "
            f"{r['prefill_ms']:.1f} | {r['batch_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
            f"{base['prefill_ms'] / r['prefill_ms']:.2f}x / "
            f"{r['batch_tokens_per_s'] / base['batch_tokens_per_s']:.2f}x / "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any run (the lists parsed; a bad combination exits with usage)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.3", help="targets run on rotten_tomatoes")
    p.add_argument("--gen-sparsities", default="0.3", help="targets run on e2e_nlg ('' to skip the task)")
    p.add_argument("--mc-sparsities", default="0.3", help="targets run on hyperbaton, a multiple-choice task "
                   "of the quality suite ('' to skip the task)")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--curve-seeds",
        default=None,
        help="seeds that run every target; the others run only the 30 %% one (default: all seeds)",
    )
    p.add_argument("--gate-steps", type=int, default=100)
    p.add_argument("--gate-lambda", type=float, default=1000.0)
    p.add_argument("--recover-steps", type=int, default=60, help="0: no recovery after the export")
    p.add_argument("--recover-lr", type=float, default=5e-5)
    p.add_argument(
        "--recover-params", choices=("full", "rows"), default="full",
        help="what the recovery trains: every weight of the export, or its rows at the LoRA r=8 budget "
        "(magnitude; recover_params)",
    )  # fmt: skip
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-general", type=int, default=200)
    p.add_argument("--speed-repeats", type=int, default=10)
    p.add_argument(
        "--recipe", choices=("teacher", "base"), default="teacher",
        help="teacher: tune the dense model first (rows, --teacher-steps), gate it with low-rank terms and a "
        "ramped target, distilling it during gating and after the export; base: gate the base model alone "
        "and distil the unpruned base after the export",
    )  # fmt: skip
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--gate-ramp", type=float, default=0.5)
    p.add_argument("--gate-low-rank", type=int, default=8)
    p.add_argument("--low-rank-lr", type=float, default=1e-3)
    p.add_argument("--gate-lr", type=float, default=0.05, help="the gates' learning rate (gate_lr)")
    p.add_argument(
        "--ema-decay", type=float, default=0.0,
        help="the gates runs (gate phase and recovery) evaluate, keep and export the moving average of what "
        "they train (ema_decay; 0: off)",
    )  # fmt: skip
    p.add_argument("--prune-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="gate and remove query heads besides MLP channels")  # fmt: skip
    p.add_argument(
        "--early-stopping", type=int, default=0, metavar="PATIENCE",
        help="every training (the teacher, the unpruned reference, the recovery) ends at its best step by the "
        "validation loss on held-out training examples, measured every --eval-steps, after PATIENCE measurements "
        "without improvement; the gate phase runs to its target and keeps its best step among those at it (0: off)",
    )  # fmt: skip
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument(
        "--metric-for-best-model", default="loss",
        help="with --early-stopping: what every run's best step goes by (metric_for_best_model): loss, the "
        "validation loss, or accuracy, the held-out examples' accuracy",
    )  # fmt: skip
    p.add_argument(
        "--general-teacher", choices=("teacher", "base"), default="teacher",
        help="teacher recipe: who teaches the news articles in both distillations: the task-tuned teacher, or the "
        "base model before task tuning (distill_general_teacher)",
    )  # fmt: skip
    p.add_argument(
        "--lr-scheduler", default="constant",
        help="the gates runs' lr_scheduler (a transformers.get_scheduler name), over the gate phase's steps "
        "and again over the recovery's; the teacher and the reference keep a constant rate",
    )  # fmt: skip
    p.add_argument(
        "--warmup-steps", type=int, default=0,
        help="the gates runs' warmup_steps, at the start of the gate phase and again of the recovery (AdamW's "
        "first steps move every weight by about the learning rate)",
    )  # fmt: skip
    p.add_argument(
        "--gate-lr-scheduler", choices=("constant",), default=None,
        help="constant: the gates keep their rate while --lr-scheduler and --warmup-steps schedule the low-rank "
        "terms (gate_lr_scheduler, CoFi's); default: the gates follow the schedule too",
    )  # fmt: skip
    p.add_argument(
        "--recover-lr-scheduler", default=None,
        help="the recovery's own lr_scheduler (recover_lr_scheduler; default: --lr-scheduler)",
    )  # fmt: skip
    p.add_argument(
        "--recover-warmup-steps", type=int, default=None,
        help="the recovery's own warm-up steps (recover_warmup_steps; default: --warmup-steps)",
    )  # fmt: skip
    p.add_argument(
        "--distill-hidden", type=float, default=0.0,
        help="both distillations also pull every layer's hidden states towards the teacher's, at this weight "
        "(distill_hidden; 0: logits only)",
    )  # fmt: skip
    p.add_argument(
        "--distill-answer", type=float, default=0.0,
        help="both distillations also weigh the KL at the task's answers per example, at this weight "
        "(distill_answer; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, default=1,
        help="training runs at once, each with CPUs/jobs threads (wall times depend on it, and the gates runs' "
        "scores through the floating-point order); the speed measurement runs alone afterwards",
    )  # fmt: skip
    p.add_argument(
        "--gate-weights-lr", type=float, default=0.0,
        help="teacher recipe: train the linear modules' weights with the gates at this lr instead of "
        "low-rank terms (gate_train_weights; 0: off)",
    )  # fmt: skip
    add_run_args(p, "runs/bench-gates", RESULTS, "gates", also_rendered="gates_curve.png")
    args = p.parse_args(argv)
    if args.render:
        return args
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.gen_sparsities = [float(s) for s in args.gen_sparsities.split(",") if s]
    args.mc_sparsities = [float(s) for s in args.mc_sparsities.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.curve_seeds is not None:
        args.curve_seeds = [int(s) for s in args.curve_seeds.split(",") if s]
    if args.general_teacher == "base" and (args.recipe != "teacher" or not args.distill_general):
        p.error("--general-teacher base: the teacher recipe's news articles (--distill-general > 0)")
    from neurontune.choices import check_warmup
    from neurontune.errors import NeurontuneError

    try:  # before any run: transformers' constant schedule would ignore the warm-up
        check_warmup(args.lr_scheduler, args.warmup_steps, "--lr-scheduler", "--warmup-steps")
        check_warmup(args.recover_lr_scheduler or args.lr_scheduler,
                     args.warmup_steps if args.recover_warmup_steps is None else args.recover_warmup_steps,
                     "--recover-lr-scheduler" if args.recover_lr_scheduler else "--lr-scheduler",
                     "--warmup-steps" if args.recover_warmup_steps is None else "--recover-warmup-steps")  # fmt: skip
    except NeurontuneError as e:
        p.error(str(e))
    if args.early_stopping and not args.recover_steps:
        p.error("--early-stopping picks the recovery's best step: it needs --recover-steps > 0")
    if args.metric_for_best_model != "loss" and not args.early_stopping:
        p.error("--metric-for-best-model: what --early-stopping goes by; it needs --early-stopping")
    if args.jobs < 1:
        p.error("--jobs: at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.render:
        render_only(args.out, "gates", render)
        curve(json.loads((args.out / "gates.json").read_text()), args.out / "gates_curve.png")
        return
    runs = training_runs(args)
    speed = speeds(speed_models(args, runs), args.speed_repeats)
    result = {
        "command": command_line(__file__),
        "commit": code_commit(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "speed": speed,
    }
    result["summary"] = summary(runs, speed)
    write_results(args.out, "gates", result, render)
    (args.out / "gates_summary.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    curve(result, args.out / "gates_curve.png")


if __name__ == "__main__":
    main()
