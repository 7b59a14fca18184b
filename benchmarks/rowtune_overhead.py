"""Train-step time and peak memory: row-sparse tuning vs PEFT LoRA (same trainable params) vs full FT.

    python benchmarks/rowtune_overhead.py                  # tiny-llama and the bundled SmolLM2-135M
    python benchmarks/rowtune_overhead.py --models tiny-llama --steps 20

One script run measures every method side by side. Each (model, method) runs in a fresh
subprocess so that peak memory is that method's own: on CPU torch keeps no allocator statistics,
so a sampling thread (neurontune.bench.PeakRSS) records the process RSS every 2 ms during the timed
steps and we report the peak minus the RSS just before wrapping the model (adapter + gradients +
optimizer state + activations). The order of methods is rotated between repeats. The same synthetic batch
(seeded random token ids, all positions labelled) is used for every method.

Writes results/rowtune_overhead.json and results/rowtune_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from neurontune.bench import run_worker

RESULTS = Path(__file__).parent / "results"
METHODS = ["rowtune-fused", "rowtune-index_add", "lora", "full"]


def worker(
    model_name: str, method: str, rank: int, batch: int, seq: int, steps: int, warmup: int, min_seconds: float
) -> dict:
    import psutil
    import torch

    from neurontune import get_rowtune_model
    from neurontune.bench import PeakRSS
    from neurontune.models import load_model
    from neurontune.rowtune import RowTuneConfig
    from neurontune.scoring import score_model
    from neurontune.selection import select
    from neurontune.targets import find_target_modules

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    model, _ = load_model(model_name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 3, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = find_target_modules(model)
    rss0 = psutil.Process().memory_info().rss

    if method.startswith("rowtune"):
        spec = select(model, score_model(model, "magnitude"), match_lora_rank=rank)
        model = get_rowtune_model(model, spec, RowTuneConfig(impl=method.split("-", 1)[1]))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        suffixes = sorted({t.split(".")[-1] for t in targets})
        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=suffixes)
        )
    elif method == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()

    def step():
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    with PeakRSS() as mem:
        while len(times) < steps or sum(times) < min_seconds:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in params)
    return {
        "model": model_name,
        "method": method,
        "trainable_params": trainable,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_times": times,
        "peak_rss_delta_mib": (mem.peak - rss0) / 2**20,
        # fp32 gradient (4 B) + two AdamW moments (8 B) per trainable parameter
        "grad_and_optimizer_state_mib": trainable * 12 / 2**20,
    }


def run_all(args) -> dict:
    rows = []
    for model_name in args.models:
        for rep in range(args.repeats):
            order = METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]
            for method in order:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    model_name,
                    method,
                    "--rank",
                    str(args.rank),
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--min-seconds",
                    str(args.min_seconds),
                ]
                print(f"[{model_name} rep {rep}] {method} ...", flush=True)
                r = run_worker(cmd)
                r["repeat"] = rep
                rows.append(r)
                print(
                    f"    {r['step_s_median'] * 1000:.1f} ms/step, peak +{r['peak_rss_delta_mib']:.1f} MiB",
                    flush=True,
                )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        for method in METHODS:
            rs = [r for r in rows if r["model"] == model_name and r["method"] == method]
            if not rs:
                continue
            out.append(
                {
                    "model": model_name,
                    "method": method,
                    "trainable_params": rs[0]["trainable_params"],
                    # best repeat: a repeat disturbed by other load on the machine only ever runs slower
                    "step_ms": 1000 * min(r["step_s_median"] for r in rs),
                    "peak_mib": statistics.median(r["peak_rss_delta_mib"] for r in rs),
                    "state_mib": rs[0]["grad_and_optimizer_state_mib"],
                }
            )
    return out


def to_markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        "# Row-sparse tuning overhead vs PEFT LoRA vs full fine-tuning",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; "
        f"{meta['threads']} threads; batch {meta['batch']} x {meta['seq']} tokens; step time = median step of the best of "
        f"{meta['repeats']} repeats (each >= {meta['steps']} timed steps and >= {meta['min_seconds']} s, after {meta['warmup']} "
        f"warm-up steps), peak memory = median over repeats; budget = LoRA rank {meta['rank']} "
        "on all linear layers (row methods: magnitude-selected rows, k = round(r(in+out)/in) per module).",
        "",
        "Peak memory = peak RSS during the timed steps minus RSS after loading the model (adapter, gradients, "
        "optimizer state, activations). State = fp32 gradients + AdamW moments of the trainable parameters.",
        "",
        "| model | method | trainable params | step time (ms) | vs LoRA | peak memory (MiB) | vs LoRA | grad+optim state (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lora = next(x for x in summary if x["model"] == r["model"] and x["method"] == "lora")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['trainable_params']:,} | {r['step_ms']:.1f} | "
            f"{r['step_ms'] / lora['step_ms']:.2f}x | {r['peak_mib']:.1f} | {r['peak_mib'] / lora['peak_mib']:.2f}x | "
            f"{r['state_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--render", action="store_true", help="only rebuild the markdown table from the saved JSON"
    )
    args = p.parse_args()
    if args.render:
        saved = json.loads((args.out / "rowtune_overhead.json").read_text())
        saved["meta"].setdefault("min_seconds", args.min_seconds)
        (args.out / "rowtune_overhead.md").write_text(to_markdown(saved["summary"], saved["meta"]))
        return
    if args.worker:
        print(
            json.dumps(
                worker(
                    *args.worker, args.rank, args.batch, args.seq, args.steps, args.warmup, args.min_seconds
                )
            )
        )
        return
    import peft
    import torch
    import transformers

    rows = run_all(args)
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, CPU only".replace(
            "  ", " "
        ),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "min_seconds": args.min_seconds,
        "repeats": args.repeats,
        "rank": args.rank,
        "date": time.strftime("%Y-%m-%d"),
    }
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rowtune_overhead.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n"
    )
    md = to_markdown(summary, meta)
    (args.out / "rowtune_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
