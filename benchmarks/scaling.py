"""Data-parallel scaling and capacity: step time and per-process peak memory of ``neurontune finetune``
on 1, 2 and 4 processes under DDP, FSDP2 and ZeRO-3.

    python benchmarks/scaling.py                       # CPU: 1 vs 2 processes (DDP, FSDP2, ZeRO-2, ZeRO-3)
    python benchmarks/scaling.py --model llama-3.2-1b --cells 1:ddp,2:fsdp2,4:fsdp2,2:zero3 ...
    python benchmarks/scaling.py --procs 1 --model ... # on a GPU machine: the single-GPU baseline

Each run is ``neurontune finetune`` (rows, ``--scorer``, lora:8 budget; or ``--method full``) in a fresh
launch: plain for one process, ``torchrun --standalone --nproc-per-node N`` otherwise (with the variables ``accelerate
launch`` exports for an FSDP2 or DeepSpeed config, for ``--sharding``), with ``OMP_NUM_THREADS=1`` on
a CPU so that N processes use N cores. Every process takes ``--batch-size`` examples per step, so N
processes train N times the samples of one per step; samples/s = steps x batch x N / train seconds
(the main process's summed step times, from ``metrics.json``). ``--model`` is a model name or one of
the random-init shapes of ``gpu_step.py`` (``llama-3.2-1b``: saved once as a safetensors directory, so
FSDP2 can read it shard by shard). Memory: the main process's peak RSS through loading, selection and
training (``metrics.json``), and the largest process's peak RSS over the whole run, load to exit
(``RUSAGE_CHILDREN`` of a wrapper around the launch), with glibc's mmap threshold fixed (see ``run``).
Writes ``results/scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from neurontune.bench import code_commit, command_line, render_only, write_results

RESULTS = Path(__file__).parent / "results"


SHARDING = {  # what `accelerate launch --config_file examples/accelerate/<name>.yaml` exports
    "ddp": {},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"},
    # accelerate's SIZE_BASED_WRAP: a unit per module of over 10M parameters (at the 1B shape each MLP
    # projection, 16.8M, and each attention block, 10.5M; the embedding's pieces at most 10M)
    "fsdp2-size": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
                   "FSDP_MIN_NUM_PARAMS": "10000000"},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    # a DeepSpeed config file (accelerate's deepspeed_config_file) with the capacity setting: no layer
    # kept gathered for reuse, so each is gathered again for its backward (3 gathers a step under
    # gradient checkpointing, as fsdp2-size's units of one projection), two projections live in the forward
    "zero3-reuse0": {"ACCELERATE_USE_DEEPSPEED": "true"},
    # examples/accelerate/zero3_capacity.yaml: its config file adds no prefetch, one projection live in the
    # forward (DeepSpeed holds a recomputed layer's frozen parameters through its backward: see render)
    "zero3-capacity": {"ACCELERATE_USE_DEEPSPEED": "true"},
}  # fmt: skip
CONFIG_FILES = {
    "zero3-reuse0": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "train_batch_size": "auto", "gradient_clipping": "auto",
                     "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0}},
    "zero3-capacity": Path(__file__).parents[1] / "examples" / "deepspeed" / "zero3_capacity.json",
}  # fmt: skip


# runs the launch and prints the largest peak RSS (KiB) of the processes it waited for, itself excepted
PEAK = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"  # fmt: skip


def model_path(name: str, folder: Path) -> str:
    """``name``, or for a shape of gpu_step.py its random-init model saved under ``folder`` (once)."""
    from gpu_step import SHAPES

    if name not in SHAPES:
        return name
    from finetune_speed import make_assets

    return str(make_assets(name, folder, 16, 64)[0])


def run(n: int, a: argparse.Namespace, out: Path, sharding: str = "ddp") -> dict:
    method = ["method=rows", f"scorer={a.scorer}", "budget=lora:8"] if a.method == "rows" else ["method=full"]
    args = [
        "finetune", f"model={a.model_path}", *method, f"dtype={a.dtype}", f"steps={a.steps}", f"batch_size={a.batch_size}", f"max_length={a.max_length}", "eval_before=false",
        f"eval_examples={a.eval_examples}", "forgetting_examples=0", "save_steps=0",
        f"gradient_checkpointing={str(a.gradient_checkpointing).lower()}", f"output_dir={out}", "--overwrite",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "neurontune.cli"]
    if n > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                  "-m", "neurontune.cli"]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", **(SHARDING[sharding] if n > 1 else {})}
    if n > 1 and sharding in CONFIG_FILES:
        conf = CONFIG_FILES[sharding]
        if isinstance(conf, dict):  # written for the run
            conf = out.parent / f"{sharding}.json"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(json.dumps(CONFIG_FILES[sharding], indent=1))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(conf)
    if not a.gpu:
        env["OMP_NUM_THREADS"] = str(a.threads)
        # glibc's malloc raises its mmap threshold as big blocks are freed, then keeps later freed blocks in
        # its heap, so RSS stays at a high-water mark of allocator retention, not of use. A fixed threshold
        # returns big blocks to the OS when freed: RSS then follows what is allocated (as CUDA's
        # max_memory_allocated does on a GPU), in every run alike.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", PEAK, *launch, *args], env=env, capture_output=True, text=True, check=False
    )
    largest_kib = int(res.stderr.strip().splitlines()[-1])
    if res.returncode != 0:  # recorded, and the other cells still run
        killed = "exitcode: -9" in res.stderr or res.returncode in (-9, 137)
        why = "killed (out of memory)" if killed else f"failed (exit {res.returncode})"
        print(f"run failed ({n} processes, {sharding}): {why}\n{res.stderr[-1500:]}", file=sys.stderr)
        return {"processes": n, "sharding": sharding, "error": why, "largest_process_peak_mib": largest_kib / 1024,
                "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    log = (out / "train_log.csv").read_text().splitlines()[1:]
    steady = [float(r.split(",")[-1]) for r in log[a.warmup :]]  # step seconds after warm-up
    return {
        "processes": n,
        "sharding": sharding if n > 1 else "-",
        "train_seconds": m["train_seconds"],
        "steady_step_s": sum(steady) / len(steady),
        "samples_per_s": a.batch_size * n / (sum(steady) / len(steady)),
        "wall_seconds": time.perf_counter() - t0,
        "trainable_params": m["trainable_params"],
        "peak_memory_mib": m["peak_memory_mib"],
        "largest_process_peak_mib": largest_kib / 1024,
        "sharded_load": m.get("sharded_load"),
        "loaded": "shards" if m.get("sharded_load") else "whole",
    }


# (hidden, intermediate, layers, kv heads x head dim, vocab, tied) of the models users shard
CAPACITY_SHAPES = {
    "Llama-3-8B": (4096, 14336, 32, 8 * 128, 128256, False),
    "Llama-3-70B": (8192, 28672, 80, 8 * 128, 128256, False),
}


def capacity(runs: list[dict], gpus: int = 8, gib: int = 80, rank: int = 16) -> str:
    """The capacity table: per-GPU memory of FSDP2 training for 8B and 70B on ``gpus`` x ``gib`` GiB,
    computed from the shapes and per-parameter byte costs (bf16 base, fp32 trainable state), with the
    measured per-process figures of ``runs`` (the CPU cells) as the check that the sharded weights
    divide by N."""
    lines = [
        f"## Capacity on {gpus} x {gib} GiB (computed, not measured)",
        "",
        "Per GPU under FSDP2 with the base loaded sharded: the base's bf16 shard (2 B/param / N); the units "
        "FSDP holds whole while they compute (one decoder layer, twice for the prefetch of the next, and "
        "one piece of the embedding or head, which a sharded load cuts into pieces no larger than a layer); "
        "the trainable "
        f"state at the LoRA-r{rank} budget (fp32 delta, gradient and two AdamW moments: 16 B per trainable "
        "param, sharded). What is left of the card is for activations, which do not shard (they follow the "
        "per-GPU micro-batch). DDP (every GPU holds the whole base) is the column beside it. With "
        "`fsdp2_size.yaml` (units of over 10M parameters) the units held are about one MLP projection (and a "
        "piece of at most 10M parameters) instead of a layer: the last column.",
        "",
        "| model | params | bf16 base | shard (1/N) | layer x2 + head | trainable state / N | total before "
        "activations | left for activations | DDP: whole base per GPU | fsdp2_size: projection x2 + piece, total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, (h, inter, layers, kv, vocab, tied) in CAPACITY_SHAPES.items():
        attn = 2 * h * h + 2 * h * kv
        mlp = 3 * h * inter
        layer = attn + mlp
        embed = vocab * h
        params = layers * layer + embed * (1 if tied else 2) + (2 * layers + 1) * h
        trainable = layers * rank * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))
        g = 2**30
        shard = 2 * params / gpus / g
        held = (2 * 2 * layer + 2 * min(embed, layer)) / g
        state = 16 * trainable / gpus / g
        total = shard + held + state
        whole = 2 * params / g
        small = (2 * 2 * h * inter + 2 * min(embed, 10_000_000)) / g  # the largest unit: an MLP projection
        lines.append(
            f"| {name} | {params / 1e9:.1f} B | {whole:.1f} GiB | {shard:.1f} GiB | {held:.1f} GiB | {state:.2f} GiB | "
            f"{total:.1f} GiB | {gib - total:.1f} GiB | {whole:.1f} GiB{' (does not fit)' if whole > gib else ''} | "
            f"{small:.2f} GiB, {shard + small + state:.1f} GiB |"
        )
    sharded = [r for r in runs if r.get("loaded") == "shards" and r.get("largest_process_peak_mib")]
    one = next((r for r in runs if r["processes"] == 1), None)
    if one and sharded:
        parts = ", ".join(
            f"{r['sharding']} at {r['processes']}: {r['largest_process_peak_mib'] / one['largest_process_peak_mib']:.2f}x"
            for r in sharded
        )
        lines += [
            "",
            f"Measured above (CPU, the 1B shape in fp32), the largest process's whole-run peak against 1 "
            f"process: {parts}. What does not divide by N there: the libraries (~0.5 GiB per process), the "
            "units gathered whole while they compute (fsdp2: a decoder layer, 232 MiB in fp32, held twice while "
            "FSDP2 gathers it: all-gather output and copy-out, and a piece of the 128k x 2048 embedding, at most "
            "as large; fsdp2-size: an MLP projection, 64 MiB, and a piece of at most 38 MiB; zero3: what "
            "DeepSpeed keeps live, up to a layer by default here (from its recomputation to its backward) and "
            "the next parameter it prefetches, the embedding in pieces of a projection), and the activations "
            "of each process's own micro-batch.",
        ]
    lines += [
        "",
        "Activations measured on an H100 (`results/gpu_step.md`): Llama-3-8B, rows, bf16, batch 2 x 1024, "
        "no gradient checkpointing, 14.9 GB above the weights (deltas, gradients and AdamW included). "
        "Checkpointing cuts that further; at 70B it was not measured (no multi-GPU machine in these sessions).",
    ]
    return "\n".join(lines)


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Scaling and capacity: step time and per-process memory on 1 and N processes",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; torch {result['torch']}; {result['date']}"
        + (f"; code {result['commit']}" if result.get("commit") else "")
        + "  ",
        f"`neurontune finetune` model `{s['model']}`"
        + (f" in {s['dtype']}" if s.get("dtype", "auto") != "auto" else "")
        + (
            ", full fine-tuning (every parameter and its AdamW moments)"
            if s.get("method") == "full"
            else f", rows ({s.get('scorer', 'taylor')}) at the lora:8 budget"
        )
        + ", "
        f"batch {s['batch_size']} per process x {s['max_length']} tokens max, {s['steps']} steps"
        f"{', gradient checkpointing' if s.get('gradient_checkpointing') else ''}; samples/s from the mean step "
        f"time after {s['warmup']} warm-up steps (main process). CPU runs use {s['threads']} thread(s) per process.",
        "",
        "| processes | sharding | base loaded | mean step (s) | samples/s | speed-up | peak RSS, main process "
        "through training (MiB) | peak RSS, largest process, whole run (MiB) | vs 1 process |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = result["runs"][0]
    for r in result["runs"]:
        largest = r.get("largest_process_peak_mib")
        if "error" in r:
            lines.append(
                f"| {r['processes']} | {r['sharding']} | - | {r['error']} | | | | {largest:.0f} (when killed) | |"
            )
            continue
        ratio = f"{largest / base['largest_process_peak_mib']:.2f}x" if largest and base.get(
            "largest_process_peak_mib") else "-"  # fmt: skip
        lines.append(
            f"| {r['processes']} | {r.get('sharding', '-')} | {r.get('loaded', 'whole')} | {r['steady_step_s']:.3f} | "
            f"{r['samples_per_s']:.2f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
            f"{r.get('peak_memory_mib', float('nan')):.0f} | "
            f"{'-' if largest is None else f'{largest:.0f}'} | {ratio} |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    lines += [
        "",
        '"shards": the base was built without its weights and each process read only its FSDP2 shards or',
        'ZeRO-3 partitions from the checkpoint (`neurontune.sharded`); "whole": every process loaded the whole',
        "base before it was sharded (DDP always; FSDP2 and ZeRO-3 for zo-taylor/neft, DoRA/PiSSA/gates,",
        "a built-in tiny model or save_merged). fsdp2: a unit per decoder layer (TRANSFORMER_BASED_WRAP, as",
        "`examples/accelerate/fsdp2.yaml`); fsdp2-size: a unit per module of over 10M parameters",
        "(SIZE_BASED_WRAP, `fsdp_min_num_params: 10000000`, as `examples/accelerate/fsdp2_size.yaml`), a PEFT",
        "layer with its base layer; the embedding and head in pieces no larger than a unit in both. zero3:",
        "`examples/accelerate/zero3.yaml`'s settings, at most a decoder layer gathered (kept from its",
        "recomputation to its backward), the embedding and head in pieces of one MLP projection;",
        "zero3-reuse0: a DeepSpeed config file with `stage3_max_reuse_distance: 0` (two projections live in",
        "the forward: the one computing and one prefetched);",
        "zero3-capacity: `examples/accelerate/zero3_capacity.yaml`'s config file",
        "(`examples/deepspeed/zero3_capacity.json`: reuse 0 and `stage3_prefetch_bucket_size: 0`, one",
        "projection live in the forward), the capacity setting. In the backward under gradient checkpointing",
        "DeepSpeed (0.19.8) holds every frozen parameter a layer's recomputation gathered until that layer's",
        "backward ends, so all ZeRO-3 cells hold a whole decoder layer then (traced: 168-232 MiB gathered at",
        "each process's peak at the 1B shape), where fsdp2-size gathers a unit again for its backward.",
    ]
    if result.get("capacity"):
        lines += ["", result["capacity"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", help="a model, or a shape of gpu_step.py (llama-3.2-1b)"
    )
    p.add_argument("--procs", default="1,2")
    p.add_argument("--sharding", default="ddp,fsdp2,zero2,zero3", help="for N > 1: " + ", ".join(SHARDING))
    p.add_argument(
        "--cells", default="", help="N:sharding,... in this order (instead of --procs x --sharding)"
    )
    p.add_argument("--scorer", default="magnitude")
    p.add_argument(
        "--method", choices=("rows", "full"), default="rows", help="full: method=full (no scorer, budget)"
    )
    p.add_argument(
        "--dtype", default="auto", help="finetune's dtype= (the base's, and full's trained weights)"
    )
    p.add_argument("--eval-examples", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--assets", type=Path, default=Path("runs/bench-assets"))
    p.add_argument(
        "--capacity", type=Path, help="a markdown file appended to the results (the capacity table)"
    )
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="threads per process on a CPU")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-scaling"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default="")
    p.add_argument(
        "--name",
        default="scaling",
        help="results file name (<name>.json, .md): a recheck of some cells beside the full table",
    )
    p.add_argument("--render", action="store_true")
    a = p.parse_args()
    if a.render:
        return render_only(a.out, a.name, render)
    import torch

    a.gpu = torch.cuda.is_available()
    a.model_path = model_path(a.model, a.assets)
    cells = (
        [(int(c.split(":")[0]), c.split(":")[1]) for c in a.cells.split(",")]
        if a.cells
        else [
            (n, s)
            for n in map(int, a.procs.split(","))
            for s in (a.sharding.split(",") if n > 1 else ["ddp"])
        ]
    )
    runs = []
    for n, sharding in cells:
        print(f"{n} process(es), {sharding} ...", flush=True)
        runs.append(run(n, a, a.runs / f"p{n}-{sharding}", sharding))
        if "error" not in runs[-1]:
            print(f"    {runs[-1]['samples_per_s']:.2f} samples/s, largest process "
                  f"{runs[-1]['largest_process_peak_mib']:.0f} MiB", flush=True)  # fmt: skip
    device = torch.cuda.get_device_name(0) if a.gpu else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    result = {
        "command": command_line(__file__),
        "commit": code_commit(),
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            k: getattr(a, k)
            for k in (
                "model",
                "steps",
                "warmup",
                "batch_size",
                "max_length",
                "threads",
                "cells",
                "scorer",
                "method",
                "dtype",
                "gradient_checkpointing",
            )
        },
        "runs": runs,
        "note": a.note,
    }
    result["capacity"] = capacity(runs) if a.method == "rows" else ""  # the table is the rows budget's
    write_results(a.out, a.name, result, render)


if __name__ == "__main__":
    main()
