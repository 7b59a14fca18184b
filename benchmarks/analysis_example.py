"""The example neuron-analysis report on the embedded default, from real runs in one go:

    python benchmarks/analysis_example.py          # SmolLM2-135M (about 30 minutes on 2 cores)
    python benchmarks/analysis_example.py --model tiny-llama --steps 3 --eval-examples 8 \\
        --out /tmp/analysis --runs /tmp/analysis-runs                   # smoke run

Runs (each ``neurontune finetune`` in a subprocess, same steps, batch, budget LoRA r=8 and eval):
Rotten Tomatoes with taylor, NeFT and random rows (checkpoints every steps/8, for the dynamics) and
full fine-tuning; IMDB with its own taylor rows, with Rotten Tomatoes' taylor rows (transfer) and
with random rows. Taylor, not magnitude, for the transfer: magnitude ignores the data, so both tasks
would get the same rows. A magnitude selection (``neurontune select``, no training) joins the overlap. Then ``neurontune analyze`` over the specs and runs writes
results/analysis/report.html and its PNGs, and the transfer table goes to results/analysis/transfer.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from neurontune.bench import finetune_run

RESULTS = Path(__file__).parent / "results" / "analysis"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--runs", type=Path, default=Path("runs/bench-analysis"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--reuse", action="store_true", help="keep finished runs in --runs made with the same settings"
    )
    args = p.parse_args()
    common = [
        f"model={args.model}", f"steps={args.steps}", "batch_size=8", "train_examples=2000",
        f"eval_examples={args.eval_examples}", "forgetting_examples=32", "max_length=256", "seed=0",
        "budget=lora:8", "lr=3e-4",
    ]  # fmt: skip
    every = max(1, args.steps // 8)
    plan = [
        ("rt-taylor", ["task=rotten_tomatoes", "scorer=taylor", f"save_steps={every}", "save_total_limit=100"]),
        ("rt-neft", ["task=rotten_tomatoes", "scorer=neft", "scorer_options=probe_steps=8,probe_lr=1e-4",
                     f"save_steps={every}", "save_total_limit=100"]),
        ("rt-random", ["task=rotten_tomatoes", "scorer=random", f"save_steps={every}", "save_total_limit=100"]),
        ("rt-full", ["task=rotten_tomatoes", "method=full", "lr=3e-5", "save_steps=0"]),
        ("imdb-taylor", ["task=imdb", "scorer=taylor", "save_steps=0"]),
        ("imdb-with-rt-neurons", ["task=imdb", f"spec={args.runs / 'rt-taylor'}", "save_steps=0"]),
        ("imdb-random", ["task=imdb", "scorer=random", "save_steps=0"]),
    ]  # fmt: skip
    results = {}
    for name, extra in plan:
        m = finetune_run([*common, *extra], args.runs / name, reuse=args.reuse)
        results[name] = m
        metric = m["primary_metric"]
        print(f"{name}: {metric} {m['after'][metric]:.3f} train {m['train_seconds']:.0f}s", flush=True)
    r = args.runs
    magnitude = r / "rt-magnitude.json"
    subprocess.run(
        [sys.executable, "-m", "neurontune.cli", "select", f"model={args.model}", "task=rotten_tomatoes",
         "scorer=magnitude", "budget=lora:8", f"output={magnitude}"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "neurontune.cli", "analyze",
        f"specs={r / 'rt-taylor'},{r / 'rt-neft'},{magnitude},{r / 'rt-random'},{r / 'imdb-taylor'},{r / 'imdb-random'}",
        "labels=RT taylor,RT NeFT,magnitude,RT random,IMDB taylor,IMDB random",
        f"runs={r / 'rt-taylor'},{r / 'rt-neft'},{r / 'rt-random'},{r / 'rt-full'},{r / 'imdb-taylor'},"
        f"{r / 'imdb-with-rt-neurons'},{r / 'imdb-random'}",
        f"full_ft={r / 'rt-full' / 'model'}", f"model={args.model}", f"output={args.out}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    lines = [
        "# Transfer: IMDB trained on Rotten Tomatoes' neurons, its own, or random ones",
        "",
        f"`python benchmarks/analysis_example.py {' '.join(sys.argv[1:])}`; model `{args.model}`, {args.steps} steps x "
        f"batch 8, budget LoRA r=8, lr 3e-4, max_length 256, seed 0, accuracy on {args.eval_examples} held-out "
        "IMDB reviews. One seed: differences of a few points are within noise.",
        "",
        "| IMDB rows chosen by | rows | accuracy before | accuracy after | forgetting ppl |",
        "|---|---|---|---|---|",
    ]
    for name, label in (
        ("imdb-taylor", "IMDB's own taylor scores"),
        ("imdb-with-rt-neurons", "Rotten Tomatoes' taylor selection"),
        ("imdb-random", "random"),
    ):
        m = results[name]
        lines.append(
            f"| {label} | {m['rows']:,} | {m['before']['accuracy']:.3f} | {m['after']['accuracy']:.3f} | "
            f"{m['after']['forgetting_ppl']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.md").write_text("\n".join(lines) + "\n")
    summary = {k: {"after": v["after"], "before": v["before"], "rows": v.get("rows"), "command": v["command"]}
               for k, v in results.items()}  # fmt: skip
    (args.out / "runs.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
