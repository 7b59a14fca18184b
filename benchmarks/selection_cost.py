"""Cost of each neuron scorer, and how well the cheap ones agree with a full-probe NeFT selection.

    python benchmarks/selection_cost.py                       # bundled SmolLM2-135M, Rotten Tomatoes
    python benchmarks/selection_cost.py --model tiny-llama --reference-steps 20   # seconds-long smoke run

Every scorer scores all linear layers of the model on the same fixed calibration set (the first
``--calib`` training examples, batches of 8, <= 128 tokens) and selects rows at the budget of LoRA
rank 8. Each scorer runs in a fresh subprocess; time is wall-clock for scoring, peak memory is the
peak RSS during scoring minus the RSS before it, after every weight has been read once so that the
memory-mapped checkpoint is resident in the baseline (neurontune.bench.PeakRSS).

The reference is NeFT as in the paper: a probe fine-tune of *all* parameters (here one pass over
``--reference-examples`` examples), rows ranked by 1 - cos(before, after). Agreement is reported as
Jaccard and overlap coefficient of the selected (module, row) pairs; two random selections at this
budget agree at about ratio / (2 - ratio) Jaccard, shown in the `random` row.

Writes results/selection_cost.json, results/selection_cost.md and the specs under results/selection_specs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from neurontune.bench import command_line, run_worker

RESULTS = Path(__file__).parent / "results"
# name -> (scorer, options, calibration examples); "neft-full" is the reference
SCORERS = {
    "magnitude": ("magnitude", {}, None),
    "random": ("random", {}, None),
    "wanda": ("wanda", {}, None),
    "activation": ("activation", {}, None),
    "taylor": ("taylor", {}, None),
    "fisher": ("fisher", {}, None),
    "zo-taylor": ("zo-taylor", {"samples": 4}, None),
    "neft-probe8": ("neft", {"probe_steps": 8, "probe_lr": 1e-4, "probe_params": "targets"}, None),
}


def worker(args, name: str) -> dict:
    import torch

    from neurontune.bench import PeakRSS
    from neurontune.data import load_movie_reviews
    from neurontune.models import load_model
    from neurontune.scoring import score_model
    from neurontune.selection import select
    from neurontune.tasks import fixed_batches, sentiment_examples

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    if name == "neft-full":
        scorer, options = "neft", {"probe_steps": 0, "probe_lr": 1e-4, "probe_params": "all"}
        n_examples = args.reference_examples
    else:
        scorer, options, n_examples = SCORERS[name]
        n_examples = n_examples or args.calib
    rows = load_movie_reviews("rotten_tomatoes", seed=0)["train"].select(range(n_examples)).to_list()
    calib = fixed_batches(sentiment_examples(rows), tok, 8, 128)
    if name == "neft-full":
        options["probe_steps"] = min(args.reference_steps, len(calib)) if args.reference_steps else len(calib)
    with torch.no_grad():  # page in the (memory-mapped) weights so the baseline includes them
        for prm in model.parameters():
            prm.sum()
    with PeakRSS() as mem:
        base = mem.rss()
        t0 = time.perf_counter()
        scores = score_model(model, scorer, batches=calib, seed=0, **options)
        seconds = time.perf_counter() - t0
    spec = select(
        model,
        scores,
        match_lora_rank=args.rank,
        seed=0,
        provenance={
            "scorer": scorer,
            "scorer_options": options,
            "base_model": args.model,
            "calib_examples": n_examples,
            "task": "rotten_tomatoes",
            "score_seconds": seconds,
        },
    )
    path = args.out / "selection_specs" / f"{args.model}-{name}.json"
    spec.save(path)
    return {
        "name": name,
        "scorer": scorer,
        "options": options,
        "calib_examples": n_examples,
        "calib_batches": len(calib),
        "seconds": seconds,
        "peak_rss_delta_mib": (mem.peak - base) / 2**20,
        "rows": spec.num_rows(),
        "params": spec.num_params(),
        "spec": str(path),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=int, default=64, help="calibration examples for the scorers")
    p.add_argument("--reference-examples", type=int, default=800, help="examples in the full-probe NeFT pass")
    p.add_argument(
        "--reference-steps", type=int, default=0, help="cap on reference probe steps (0 = one pass)"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return

    import torch
    import transformers

    from neurontune.selection import overlap
    from neurontune.spec import NeuronSpec

    rows = []
    for name in ["neft-full", *SCORERS]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--model",
            args.model,
            "--calib",
            str(args.calib),
            "--reference-examples",
            str(args.reference_examples),
            "--reference-steps",
            str(args.reference_steps),
            "--rank",
            str(args.rank),
            "--out",
            str(args.out),
        ]
        print(f"{name} ...", flush=True)
        r = run_worker(cmd)
        rows.append(r)
        print(f"    {r['seconds']:.1f}s, peak +{r['peak_rss_delta_mib']:.0f} MiB", flush=True)
    ref = NeuronSpec.load(rows[0]["spec"])
    for r in rows:
        o = overlap(NeuronSpec.load(r["spec"]), ref)
        r["jaccard_vs_neft_full"], r["overlap_vs_neft_full"] = o["jaccard"], o["overlap"]
        r["spec"] = os.path.relpath(r["spec"], args.out)
    total_rows = sum(s.shape[0] for s in ref.modules.values())
    ratio = ref.num_rows() / total_rows
    meta = {
        "command": command_line(__file__),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU only",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)),
        "model": args.model,
        "rank": args.rank,
        "selected_fraction_of_rows": ratio,
        "random_expected_jaccard": ratio / (2 - ratio),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Scorer cost and agreement with full-probe NeFT",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; {meta['threads']} threads. "
        f"Model {args.model}, all linear layers, budget = LoRA rank {args.rank} "
        f"({ref.num_rows():,} of {total_rows:,} rows, {100 * ratio:.1f}%). Calibration: first {args.calib} Rotten Tomatoes "
        f"train examples (batches of 8, <= 128 tokens). Reference `neft-full`: probe fine-tune of all parameters, "
        f"one pass over {rows[0]['calib_examples']} examples ({rows[0]['options']['probe_steps']} steps, AdamW lr 1e-4). "
        f"Two random selections at this budget agree at Jaccard ~ {meta['random_expected_jaccard']:.3f}.",
        "",
        "| scorer | passes | calib examples | time (s) | peak memory (MiB) | Jaccard vs neft-full | overlap vs neft-full |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    passes = {
        "magnitude": "none",
        "random": "none",
        "wanda": "forward",
        "activation": "forward",
        "taylor": "fwd+bwd",
        "fisher": "fwd+bwd",
        "zo-taylor": "2 fwd x samples",
        "neft": "probe training",
    }
    for r in rows:
        lines.append(
            f"| {r['name']} | {passes[r['scorer']]} | {r['calib_examples'] if passes[r['scorer']] != 'none' else '-'} | "
            f"{r['seconds']:.1f} | {r['peak_rss_delta_mib']:.0f} | {r['jaccard_vs_neft_full']:.3f} | "
            f"{r['overlap_vs_neft_full']:.3f} |"
        )
    md = "\n".join(lines) + "\n"
    (args.out / "selection_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
