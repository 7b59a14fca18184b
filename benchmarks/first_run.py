"""A user's first run on a task of their own: does it learn? Training lengths side by side, per method.

    python benchmarks/first_run.py --tasks hyperbaton --methods rows,lora --eval-examples 300
    python benchmarks/first_run.py --render                    # rebuild the table from the JSON

Every run is ``neurontune finetune task=<task> method=<method> <recipe>`` in a fresh subprocess with
everything else at its default (the bundled SmolLM2-135M, 2,000 training examples, batch 8, each
method's default rate), so it is the command a new user types. The recipes spell out their options, so
the table keeps its meaning when the defaults change:

- ``steps40``: 40 optimizer steps, whatever the data (the default until 2026-12-03);
- ``epoch``: one pass over the training examples (``num_train_epochs=1``, the default since);
- ``epoch-es``: one pass with early stopping on the validation loss of the last 10 % of the training
  examples (which it then leaves out), measured every 25 steps, patience 3; the result is the best
  measured step's weights. ``eval_steps`` also evaluates the test examples every 25 steps (the curve
  below the table): those are never used to decide anything.

Reports the score before and after, the steps run, where early stopping stopped and which step it kept,
the training time (the steps alone, as the run measures it) and the wall time (loading, selection,
every evaluation). Writes results/first_run.json and results/first_run.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neurontune.bench import code_commit, command_line, finetune_run, machine, render_only, write_results

RESULTS = Path(__file__).parent / "results"
RECIPES: dict[str, list[str]] = {
    "steps40": ["steps=40"],
    "epoch": ["num_train_epochs=1"],
    "epoch-es": ["num_train_epochs=1", "eval_steps=25", "early_stopping_patience=3"],
}


def run_one(args: argparse.Namespace, task: str, method: str, recipe: str) -> dict:
    overrides = [f"task={task}", f"eval_examples={args.eval_examples}", f"method={method}", *RECIPES[recipe]]
    out = args.runs / task / f"{recipe}-{method}"
    m = finetune_run(overrides, out, reuse=args.reuse)
    curve = out / "eval_log.json"
    if curve.is_file():
        import json

        log = json.loads(curve.read_text())
        m["test_curve"] = {int(p["step"]): p[log["metric"]] for p in log["points"]}
    m.update(task=task, method=method, recipe=recipe)
    return m


def metric_of(m: dict) -> str:
    return m["primary_metric"]


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# A first run on a task of one's own: training lengths side by side",
        "",
        f"Command: `{result['command']}`  ",
        f"Code {result['commit']}; machine: {result['machine']}; torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}  ",
        f"`neurontune finetune task=<task> method=<method> eval_examples={s['eval_examples']} <recipe>`, "
        "everything else at its default (SmolLM2-135M, 2,000 training examples, batch 8, the method's default "
        "rate, seed 0). Recipes: "
        + "; ".join(f"`{k}`: `{' '.join(v)}`" for k, v in RECIPES.items())
        + ". With early stopping the last 10 % of the training examples are held out for its validation loss.",
        "",
        "| task | method | recipe | before | after | steps run | early stopping | training (s) | wall (s) |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for m in result["runs"]:
        metric = metric_of(m)
        es = m.get("early_stopping")
        stop = f"{'stopped' if es['stopped'] else 'ran all'}; kept step {es['best_step']}" if es else "-"
        before = m.get("before") or {}
        wall = f"{m['wall_seconds']:.0f}" if m.get("wall_seconds") else "-"
        lines.append(
            f"| {m['task']} | {m['method']} | {m['recipe']} | {before.get(metric, float('nan')):.3f} | "
            f"{m['after'][metric]:.3f} | {m['steps']} | {stop} | {m['train_seconds']:.0f} | {wall} |"
        )
    curves = [m for m in result["runs"] if m.get("test_curve")]
    if curves:
        lines += ["", "Test-set score every 25 steps (observed, not used by early stopping):", ""]
        for m in curves:
            pts = ", ".join(
                f"{k}: {v:.3f}" for k, v in sorted(m["test_curve"].items(), key=lambda kv: int(kv[0]))
            )
            lines.append(f"- {m['task']} {m['method']} {m['recipe']}: {pts}")
    if result.get("note"):
        lines += ["", result["note"]]
    lines += [
        "",
        "Every run's metrics are in the JSON beside this file (`runs`); a wall time `-` is a run reused (kept from an earlier run with the same options).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="hyperbaton")
    p.add_argument("--methods", default="rows,lora")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument(
        "--extra", default="", help="more runs as task:method:recipe,... (e.g. full fine-tuning on one task)"
    )
    p.add_argument("--eval-examples", type=int, default=300)
    p.add_argument("--runs", type=Path, default=Path("runs/bench-first-run"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--reuse", action="store_true", help="keep finished runs in --runs made with the same options"
    )
    p.add_argument("--note", default="")
    p.add_argument("--render", action="store_true", help="only rebuild first_run.md from first_run.json")
    args = p.parse_args()
    if args.render:
        render_only(args.out, "first_run", render)
        return
    import torch
    import transformers

    result = {
        "command": command_line(__file__),
        "commit": code_commit(),
        "machine": machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {"eval_examples": args.eval_examples, "recipes": RECIPES},
        "runs": [],
        "note": args.note,
        "partial": True,
    }
    todo = [
        (t, m, r)
        for t in args.tasks.split(",")
        for m in args.methods.split(",")
        for r in args.recipes.split(",")
    ]
    todo += [tuple(x.split(":")) for x in args.extra.split(",") if x]
    for task, method, recipe in todo:
        m = run_one(args, task, method, recipe)
        print(
            f"{task} {method} {recipe}: {m['after'][metric_of(m)]:.3f} after {m['steps']} steps",
            flush=True,
        )
        result["runs"].append(m)
        write_results(args.out, "first_run", result, render, echo=False)
    result["partial"] = False
    write_results(args.out, "first_run", result, render)


if __name__ == "__main__":
    main()
