"""End-to-end ``neurontune finetune`` speed: rows vs LoRA vs full fine-tuning at the same budget, through
the real pipeline (data, accelerate, precision, optimizer, logging), on a GPU or a CPU.

    python benchmarks/finetune_speed.py                                # CPU: tiny-llama
    python benchmarks/finetune_speed.py --model llama-3.2-1b           # GPU: Llama-3.2-1B shape

The model is a random-init model built from a config at a real shape (``gpu_step.py``'s shapes; the
weights do not change the cost), saved once with the byte-level tiny tokenizer and passed as
``model=<dir>``. The data are seeded random words as plain text (trained on every token), long enough to
fill ``max_length``. Each method runs ``neurontune finetune`` in its own process with its defaults
(``precision=auto``: bf16 autocast on fp32 weights on a GPU; rows selected by ``scorer`` at the budget
``lora:<rank>``; LoRA at rank ``<rank>``). Reported from each run's ``metrics.json`` and
``train_log.csv``: train seconds, tokens/s, the median step (the first step, which carries one-off
start-up costs, is in the total but not in the median), trainable parameters and peak memory. Writes
``results/finetune_speed.{json,md}`` (or ``--name``) with the command, device and versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

from gpu_step import build_model, device_name

from neurontune.bench import command_line, finetune_run, render_only, write_results

RESULTS = Path(__file__).parent / "results"
METHODS = ["rows", "lora", "full"]


def make_assets(
    model_name: str, folder: Path, n_records: int, chars: int, dtype: str = "float32"
) -> tuple[Path, Path]:
    """The saved random-init model (in ``dtype``) and a plain-text JSONL file of ``n_records`` records
    of at least ``chars`` characters, made once per folder."""
    import torch

    from neurontune.models import tiny_tokenizer

    model_dir = folder / (model_name if dtype == "float32" else f"{model_name}-{dtype}")
    data = folder / f"text-{chars}.jsonl"
    if not (model_dir / "config.json").is_file():
        model = build_model(model_name, getattr(torch, dtype))
        model.save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        del model
    if not data.is_file():
        rng = random.Random(0)
        words = [
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
            for _ in range(500)
        ]
        with data.open("w") as f:
            for _ in range(n_records):
                text = ""
                while len(text) < chars:
                    text += rng.choice(words) + " "
                f.write(json.dumps({"text": text.strip()}) + "\n")
    return model_dir, data


def step_seconds(out: Path) -> list[float]:
    with (out / "train_log.csv").open() as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: llama-3.2-1b on a GPU, tiny-llama on a CPU")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scorer", default="magnitude")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra finetune option")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-finetune-speed"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="finetune_speed", help="results file stem")
    p.add_argument("--render", action="store_true", help="only rebuild the markdown from the saved JSON")
    a = p.parse_args()
    if a.render:
        return render_only(a.out, a.name, render)
    import peft
    import torch
    import transformers

    model_name = a.model or ("llama-3.2-1b" if torch.cuda.is_available() else "tiny-llama")
    model_dir, data = make_assets(model_name, a.runs / "assets", 4 * a.batch_size * a.steps, 4 * a.max_length)
    rows = []
    for method in a.methods:
        overrides = [f"model={model_dir}", f"task={data}", f"method={method}", f"steps={a.steps}",
                     f"batch_size={a.batch_size}", f"max_length={a.max_length}",
                     "eval_examples=16", "eval_before=false", "forgetting_examples=0", "save_merged=false", *a.set]  # fmt: skip
        if method == "rows":
            overrides += [f"scorer={a.scorer}", f"budget=lora:{a.rank}"]
        elif method == "lora":
            overrides.append(f"lora_r={a.rank}")
        out = a.runs / method
        print(f"[{model_name}] {method} ...", flush=True)
        m = finetune_run(overrides, out)
        steps = step_seconds(out)
        r = {
            "method": method,
            "trainable_params": m["trainable_params"],
            "train_seconds": m["train_seconds"],
            "tokens_per_second": m["tokens_per_second"],
            "step_ms_median": 1000 * statistics.median(steps[1:] or steps),
            "first_step_ms": 1000 * steps[0],
            "peak_memory_mib": m["peak_memory_mib"],
            "peak_memory_kind": m["peak_memory_kind"],
            "precision": m["precision"],
            "wall_seconds": m["wall_seconds"],
            "command": m["command"],
        }
        rows.append(r)
        print(f"    train {r['train_seconds']:.1f} s, {r['tokens_per_second']:.0f} tok/s", flush=True)
    meta = {
        "command": command_line(__file__),
        "model": model_name,
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "rank": a.rank,
        "scorer": a.scorer,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_results(a.out, a.name, {"meta": meta, "runs": rows}, render)


def render(result: dict) -> str:
    meta, runs = result["meta"], result["runs"]
    lora = next((r for r in runs if r["method"] == "lora"), None)
    full = next((r for r in runs if r["method"] == "full"), None)

    def ratio(r, x, key):
        return f"{r[key] / x[key]:.2f}x" if x and x[key] else "–"

    lines = [
        f"# End-to-end `neurontune finetune` speed on the {meta['model']} shape: rows vs LoRA vs full",
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}; {meta['date']}  ",
        f"Random-init model, plain-text data; {meta['steps']} steps of batch {meta['batch_size']} x "
        f"{meta['max_length']} tokens; rows at budget lora:{meta['rank']} ({meta['scorer']} scorer), LoRA rank "
        f"{meta['rank']}; each method's default learning rate and `precision=auto`. Train time = the runs' "
        "summed step times (`metrics.json`); median step leaves out the first step.",
        "",
        "| method | precision | trainable | train (s) | tokens/s | median step (ms) | first step (ms) | "
        "train time vs LoRA | vs full | peak memory (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['method']} | {r['precision']} | {r['trainable_params']:,} | {r['train_seconds']:.2f} | "
            f"{r['tokens_per_second']:,.0f} | {r['step_ms_median']:.1f} | {r['first_step_ms']:.0f} | "
            f"{ratio(r, lora, 'train_seconds')} | {ratio(r, full, 'train_seconds')} | "
            f"{r['peak_memory_mib']:,.0f} ({r['peak_memory_kind']}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
