"""Quality of each method at the same trainable-parameter budget and the same steps, side by side.

    python benchmarks/quality.py                                   # bundled SmolLM2-135M (about an hour on 2 cores)
    python benchmarks/quality.py --model tiny-llama --steps 3 --eval-examples 8 --out /tmp/q   # smoke run
    python benchmarks/quality.py --render                          # rebuild the table from the JSON

Every run is ``neurontune finetune`` in a fresh subprocess with the same data, steps, batch size,
evaluation and seed list; only the method (and its usual learning rate) changes:

- ``none``: zero-shot; ``full``: every parameter; ``lora``: PEFT LoRA r=8 on all linears; ``dora``:
  PEFT DoRA r=8 (LoRA's count plus one magnitude per output row); ``shira``: PEFT SHiRA with LoRA
  r=8's count of sparse entries per module;
- ``rows-*``: row-sparse tuning with rows chosen by NeFT (8-step probe of the target linears), taylor,
  magnitude or random (each module its own random rows), at the budget of LoRA r=8 (same
  trainable-parameter count, per module).

Metrics: accuracy (Rotten Tomatoes) or ROUGE-L / BLEU / chrF (E2E NLG), perplexity on 32 held-out
news articles (forgetting; the base model's is the ``none`` row), training time, peak RSS of the
process through loading, selection and training, and the size of what is saved. Writes
results/quality.json and results/quality.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from neurontune.bench import add_run_args, command_line, finetune_run, machine, render_only, write_results

RESULTS = Path(__file__).parent / "results"
# name -> finetune overrides; learning rates are the usual ones per family (not tuned here)
METHODS: dict[str, list[str]] = {
    "none": ["method=none"],
    "full": ["method=full", "lr=3e-5"],
    "lora": ["method=lora", "lr=3e-4"],
    "dora": ["method=dora", "lr=3e-4"],
    "shira": ["method=shira", "lr=3e-4"],
    "rows-neft": ["method=rows", "scorer=neft", "scorer_options=probe_steps=8,probe_lr=1e-4", "lr=3e-4"],
    "rows-taylor": ["method=rows", "scorer=taylor", "lr=3e-4"],
    "rows-magnitude": ["method=rows", "scorer=magnitude", "lr=3e-4"],
    "rows-random": ["method=rows", "scorer=random", "lr=3e-4"],
}
TASKS = {"rotten_tomatoes": "accuracy", "e2e_nlg": "rougeL"}


def run_one(args: argparse.Namespace, task: str, method: str, seed: int) -> dict:
    overrides = [
        f"model={args.model}", f"task={task}", f"seed={seed}", f"steps={args.steps}",
        f"batch_size={args.batch_size}", f"train_examples={args.train_examples}",
        f"eval_examples={args.eval_examples}", f"forgetting_examples={args.forgetting_examples}",
        "budget=lora:8", "eval_before=false", "save_steps=0", *METHODS[method],
    ]  # fmt: skip
    m = finetune_run(overrides, args.runs / task / f"{method}-s{seed}", reuse=args.reuse)
    m["seed"], m["name"] = seed, method
    return m


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for task, metric in TASKS.items():
        for name in METHODS:
            rs = [r for r in runs if r["task"] == task and r["name"] == name]
            if not rs:
                continue
            vals = [r["after"][metric] for r in rs]
            row = {
                "task": task,
                "method": name,
                "metric": metric,
                "seeds": [r["seed"] for r in rs],
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals,
                "forgetting_ppl": statistics.fmean(r["after"]["forgetting_ppl"] for r in rs),
                "trainable_params": rs[0]["trainable_params"],
                "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
                "peak_rss_mib": statistics.fmean(r["peak_memory_mib"] for r in rs),
                "saved_bytes": rs[0]["saved_bytes"],
            }
            if metric == "rougeL":
                row["bleu"] = statistics.fmean(r["after"]["bleu"] for r in rs)
                row["chrf"] = statistics.fmean(r["after"]["chrf"] for r in rs)
            rows.append(row)
    return rows


def _size(n: int) -> str:
    return "-" if not n else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Quality at the same budget: zero-shot, full FT, LoRA / DoRA / SHiRA r=8, row-sparse (4 selections)",
        "",
        f"`{result['command']}` on {result['machine']}. Model `{s['model']}`, {s['steps']} steps x batch "
        f"{s['batch_size']} from the first {s['train_examples']} training examples, eval on "
        f"{s['eval_examples']} held-out examples, forgetting = perplexity on {s['forgetting_examples']} "
        f"held-out news articles ({s.get('forgetting_text', 'BIG-bench gem/xsum')}). Seeds {s['seeds']} on Rotten Tomatoes and "
        f"{s['gen_seeds']} on E2E (data order, selection ties, random scores; `{s['single_seed_methods']}` "
        "with the first seed only); mean ± sample std over seeds, n in the last column. Learning rates "
        "are each family's usual (full 3e-5, LoRA-family and rows 3e-4), not tuned.",
        "",
        "| task | method | trainable params | score | BLEU / chrF | forgetting ppl | train s | peak RSS | saved | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        score = (
            f"{r['metric']} {r['mean']:.3f} ± {r['std']:.3f}"
            if r["metric"] == "accuracy"
            else (f"{r['metric']} {r['mean']:.1f} ± {r['std']:.1f}")
        )
        gen = f"{r['bleu']:.1f} / {r['chrf']:.1f}" if "bleu" in r else "-"
        lines.append(
            f"| {r['task']} | {r['method']} | {r['trainable_params']:,} | {score} | {gen} | "
            f"{r['forgetting_ppl']:.2f} | {r['train_seconds']:.0f} | {r['peak_rss_mib']:.0f} MiB | "
            f"{_size(r['saved_bytes'])} | {len(r['values'])} |"
        )
    if result.get("partial"):
        lines += [
            "",
            f"**Partial**: the run stopped after {len(result['runs'])} of its runs; rerun with `--reuse` to finish.",
        ]
    if result.get("note"):
        lines += ["", result["note"]]
    lines += [
        "",
        "Per-seed values are in quality.json (`summary[].values`, and every run's full metrics in `runs`).",
        "Peak RSS is the whole process through loading, selection and training (`ru_maxrss`), so it",
        "includes the model and the scorer's own pass; see gpu_step.md for training-step time and memory alone.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="seeds for rotten_tomatoes")
    p.add_argument("--gen-seeds", default="0", help="seeds for e2e_nlg (generation eval is slower)")
    p.add_argument(
        "--single-seed-methods",
        default="none,full",
        help="methods run with the first seed only (none has no randomness; full is the slow reference)",
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--note", default="", help="a remark on the run's conditions, printed under the table")
    add_run_args(p, "runs/bench-quality", RESULTS, "quality")
    args = p.parse_args()
    if args.render:
        render_only(args.out, "quality", render)
        return
    runs = []
    seeds = {t: [int(x) for x in (args.seeds if t == "rotten_tomatoes" else args.gen_seeds).split(",")]
             for t in args.tasks.split(",")}  # fmt: skip
    # every task's first seed before any task's second: a stopped benchmark still covers every task
    order = [(t, s[i]) for i in range(max(map(len, seeds.values()))) for t, s in seeds.items() if i < len(s)]
    for task, seed in order:
        for method in args.methods.split(","):
            if method in args.single_seed_methods.split(",") and seed != seeds[task][0]:
                continue
            m = run_one(args, task, method, seed)
            print(
                f"{task} {method} seed {seed}: {TASKS[task]} {m['after'][TASKS[task]]:.3f} "
                f"forgetting {m['after']['forgetting_ppl']:.2f} train {m['train_seconds']:.0f}s "
                f"wall {m['wall_seconds'] or 0:.0f}s",
                flush=True,
            )
            runs.append(m)
            write_results(args.out, "quality", _result(args, runs, partial=True), render, echo=False)
    write_results(args.out, "quality", _result(args, runs, partial=False), render)


def _result(args: argparse.Namespace, runs: list[dict], partial: bool) -> dict:
    """The results so far (``partial`` until the last run is in: a stopped run keeps what it measured)."""
    return {
        "command": command_line(__file__),
        "machine": machine(),
        "settings": {
            "model": args.model,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "train_examples": args.train_examples,
            "eval_examples": args.eval_examples,
            "forgetting_examples": args.forgetting_examples,
            "forgetting_text": "the Lee corpus of ABC news",
            "seeds": args.seeds,
            "gen_seeds": args.gen_seeds,
            "single_seed_methods": args.single_seed_methods,
        },
        "summary": summarize(runs),
        "runs": runs,
        "note": args.note,
        "partial": partial,
    }


if __name__ == "__main__":
    main()
