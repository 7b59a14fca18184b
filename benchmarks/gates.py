"""Stochastic gates on the embedded default: quality against removed parameters, before and after
recovery, and the measured CPU speed of every pruned export next to the original, in one run.

    python benchmarks/gates.py --gen-sparsities ''   # SmolLM2-135M, Rotten Tomatoes (about 40 minutes on 2 cores)
    python benchmarks/gates.py --model tiny-llama --gate-steps 3 --recover-steps 2 \\
        --eval-examples 8 --forgetting-examples 2 --speed-repeats 2 --out /tmp/g     # smoke run
    python benchmarks/gates.py --render          # rebuild the table from the JSON

Every training run is ``neurontune finetune`` in a fresh subprocess with the same data and
evaluation as benchmarks/quality.py:

- ``zero-shot``: the base model (method none);
- ``rows (unpruned)``: row-sparse tuning of the full model (magnitude rows, budget of LoRA r=8),
  ``--recover-steps`` steps: the quality to hold;
- ``gates S``: method gates, target sparsity S of the MLP channels and of the query heads (every
  KV group keeps the same number), ``--gate-steps`` steps, gates at lr 0.05, penalty weight
  ``--gate-lambda`` (1000: with 50, 60 steps shut only 9 % of the channels); the export is a plain
  transformers model with a smaller ``intermediate_size`` / ``num_attention_heads``;
- ``gates S + rows``: that export fine-tuned row-sparse (recovery), ``--recover-steps`` steps;
- ``gates S + low-rank``: gates and a rank-8 low-rank term trained together (the joint variant).

Speed: each export and the original, fp32, loaded in this one process and timed in turn with all
CPU threads: prefill latency (batch 1 x 128 tokens), batched forward throughput (8 x 128 tokens) and
greedy decoding throughput (batch 1, 32 new tokens), median of ``--speed-repeats`` rounds, each
round timing every model in turn (timing one model after another moved results by 30 % here).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from neurontune.bench import add_run_args, finetune_run, render_only, write_results

RESULTS = Path(__file__).parent / "results"
TASKS = {"rotten_tomatoes": "accuracy", "e2e_nlg": "rougeL"}


def common(args: argparse.Namespace, task: str) -> list[str]:
    return [
        f"task={task}", f"seed={args.seed}", f"batch_size={args.batch_size}",
        f"train_examples={args.train_examples}", f"eval_examples={args.eval_examples}",
        f"forgetting_examples={args.forgetting_examples}", "eval_before=false", "save_steps=0",
    ]  # fmt: skip


def rows(args: argparse.Namespace, model: str) -> list[str]:
    return [
        f"model={model}", "method=rows", "scorer=magnitude", "budget=lora:8", "lr=3e-4",
        f"steps={args.recover_steps}",
    ]  # fmt: skip


def gates(args: argparse.Namespace, sparsity: float, low_rank: int = 0) -> list[str]:
    return [
        f"model={args.model}", "method=gates", f"gate_sparsity={sparsity}", "prune_heads=true",
        f"gate_low_rank={low_rank}", "gate_lr=0.05", f"gate_lambda={args.gate_lambda}", "lr=3e-4",
        f"steps={args.gate_steps}",
    ]  # fmt: skip


def runs_for_task(args: argparse.Namespace, task: str, sparsities: list[float]) -> list[dict]:
    base, out = common(args, task), args.runs / task
    metric = TASKS[task]
    done = []

    def run(name: str, sparsity: float, overrides: list[str], folder: str) -> dict:
        m = finetune_run([*overrides, *base], out / folder, reuse=args.reuse)
        m["name"], m["target_sparsity"] = name, sparsity
        g = m.get("gates") or {}
        print(
            f"{task} {name}: {metric} {m['after'][metric]:.3f}"
            + (f" (gated {g['gated'][metric]:.3f})" if g else "")
            + f" train {m['train_seconds']:.0f}s wall {m['wall_seconds'] or 0:.0f}s",
            flush=True,
        )
        done.append(m)
        return m

    run("zero-shot", 0.0, [f"model={args.model}", "method=none"], "none")
    run("rows (unpruned)", 0.0, rows(args, args.model), "rows")
    for s in sparsities:
        run(f"gates {s:.0%}", s, gates(args, s), f"gates-{s}")
        pruned = out / f"gates-{s}" / "pruned"
        run(f"gates {s:.0%} + rows", s, rows(args, str(pruned)), f"gates-{s}-rows")
    if args.joint is not None and task == "rotten_tomatoes":
        run(
            f"gates {args.joint:.0%} + low-rank",
            args.joint,
            gates(args, args.joint, 8),
            f"gates-{args.joint}-lr8",
        )
    return done


# ---- speed ----------------------------------------------------------------------------------------
def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def speeds(models: dict[str, str], repeats: int) -> list[dict]:
    """Time every model in turn, round after round (so drifts in CPU speed hit all of them alike):
    prefill 1 x 128, forward 8 x 128, greedy decoding of 32 tokens; medians over ``repeats`` rounds."""
    from neurontune.models import load_model

    g = torch.Generator().manual_seed(0)
    loaded = {label: load_model(name, dtype=torch.float32)[0].eval() for label, name in models.items()}
    vocab = next(iter(loaded.values())).config.vocab_size
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

    times = {label: {k: [] for k in ("prefill", "batched", "decode")} for label in loaded}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for label, m in loaded.items():
            for k, fn in jobs(m).items():
                t = _seconds(fn)
                if r:
                    times[label][k].append(t)
    out = []
    for label, m in loaded.items():
        med = {k: statistics.median(v) for k, v in times[label].items()}
        out.append({
            "label": label, "model": models[label], "params": sum(p.numel() for p in m.parameters()),
            "intermediate_size": m.config.intermediate_size, "num_attention_heads": m.config.num_attention_heads,
            "prefill_ms": 1000 * med["prefill"], "batch_tokens_per_s": batch.numel() / med["batched"],
            "decode_tokens_per_s": new / med["decode"],
        })  # fmt: skip
    return out


# ---- report ---------------------------------------------------------------------------------------
def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Stochastic gates: parameters removed, quality, and CPU speed of the pruned model",
        "",
        f"`{result['command']}` on {result['machine']}. Model `{s['model']}`, batch {s['batch_size']} "
        f"from the first {s['train_examples']} training examples, seed {s['seed']}, eval on "
        f"{s['eval_examples']} held-out examples, forgetting = perplexity on {s['forgetting_examples']} "
        f"news articles. Gates: {s['gate_steps']} steps (gate lr 0.05, ranked penalty, lambda {s['gate_lambda']:g}, sigma "
        f"0.1, tau 0.5), MLP channels and query heads. Recovery and the unpruned reference: row-sparse, magnitude "
        f"rows at the LoRA r=8 budget, {s['recover_steps']} steps, lr 3e-4. One seed: differences of a "
        "few points on 200 examples are within noise (see quality.md for the seed spread).",
        "",
        "| task | run | MLP+attention params removed | model params | score | gated (before export) "
        "| forgetting ppl | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["runs"]:
        metric = TASKS[m["task"]]
        g = m.get("gates") or {}
        removed = m.get("removed_fraction_of_prunable")
        fmt = (lambda v: f"{v:.3f}") if metric == "accuracy" else (lambda v: f"{v:.1f}")
        lines.append(
            f"| {m['task']} | {m['name']} | {'-' if removed is None else f'{removed:.1%}'} | "
            f"{m['model_params']:,} | {metric} {fmt(m['after'][metric])} | "
            f"{fmt(g['gated'][metric]) if g else '-'} | {m['after']['forgetting_ppl']:.2f} | "
            f"{m['train_seconds']:.0f} |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    base = result["speed"][0]
    lines += [
        "",
        f"CPU speed ({result['threads']} threads, fp32, median of {s['speed_repeats']} rounds; every round times "
        "each model in turn):",
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.2,0.3,0.4")
    p.add_argument("--gen-sparsities", default="0.3", help="sparsities run on e2e_nlg ('' to skip the task)")
    p.add_argument("--joint", type=float, default=0.3, help="sparsity of the gates + low-rank run (-1: none)")
    p.add_argument("--gate-steps", type=int, default=100)
    p.add_argument("--gate-lambda", type=float, default=1000.0)
    p.add_argument("--recover-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-repeats", type=int, default=10)
    add_run_args(p, "runs/bench-gates", RESULTS, "gates")
    args = p.parse_args()
    if args.render:
        render_only(args.out, "gates", render)
        return
    args.joint = None if args.joint < 0 else args.joint
    runs = runs_for_task(args, "rotten_tomatoes", [float(s) for s in args.sparsities.split(",")])
    if args.gen_sparsities:
        runs += runs_for_task(args, "e2e_nlg", [float(s) for s in args.gen_sparsities.split(",")])
    pruned = {m["saved"]: m for m in runs if m["method"] == "gates"}
    for m in runs:  # the size of the model one deploys: row deltas merge in, gates are folded away
        g = m.get("gates") or (pruned.get(m["model"]) or {}).get("gates")
        m["removed_fraction_of_prunable"] = g["removed_fraction_of_prunable"] if g else None
        m["model_params"] = g["total_params"][1] if g else m["total_params"] - m["trainable_params"]
    models = {"original": args.model}
    models.update(
        {m["name"]: m["saved"] for m in runs if m["method"] == "gates" and m["task"] == "rotten_tomatoes"}
    )
    speed = speeds(models, args.speed_repeats)
    result = {
        "command": "python benchmarks/gates.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "speed": speed,
    }
    write_results(args.out, "gates", result, render)


if __name__ == "__main__":
    main()
