"""Data-parallel scaling: training samples per second of ``neurontune finetune`` on 1 and 2 processes.

    python benchmarks/scaling.py                       # CPU: 1 vs 2 processes (DDP, FSDP2, ZeRO-2, ZeRO-3)
    python benchmarks/scaling.py --procs 1 --model ... # on a GPU machine: the single-GPU baseline

Each run is ``neurontune finetune`` (rows, magnitude, lora:8 budget) in a fresh launch: plain for one
process, ``torchrun --standalone --nproc-per-node N`` otherwise (with the variables ``accelerate
launch`` exports for an FSDP2 or DeepSpeed config, for ``--sharding``), with ``OMP_NUM_THREADS=1`` on
a CPU so that N processes use N cores. Every process takes ``--batch-size`` examples per step, so N
processes train N times the samples of one per step; samples/s = steps x batch x N / train seconds
(the main process's summed step times, from ``metrics.json``). Writes ``results/scaling.{json,md}``.
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

from neurontune.bench import command_line, render_only, write_results

RESULTS = Path(__file__).parent / "results"


SHARDING = {  # what `accelerate launch --config_file examples/accelerate/<name>.yaml` exports
    "ddp": {},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
}  # fmt: skip


def run(n: int, a: argparse.Namespace, out: Path, sharding: str = "ddp") -> dict:
    args = [
        "finetune", f"model={a.model}", "method=rows", "budget=lora:8", f"steps={a.steps}",
        f"batch_size={a.batch_size}", f"max_length={a.max_length}", "eval_before=false", "eval_examples=8",
        "forgetting_examples=0", "save_steps=0", f"output_dir={out}", "--overwrite",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "neurontune.cli"]
    if n > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                  "-m", "neurontune.cli"]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", **(SHARDING[sharding] if n > 1 else {})}
    if not a.gpu:
        env["OMP_NUM_THREADS"] = str(a.threads)
    t0 = time.perf_counter()
    res = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"run failed ({n} processes, {sharding}):\n{res.stderr[-3000:]}")
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
    }


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Data-parallel scaling: samples per second on 1 and N processes",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; torch {result['torch']}; {result['date']}  ",
        f"`neurontune finetune` model `{s['model']}`, rows at the lora:8 budget, batch {s['batch_size']} per "
        f"process x {s['max_length']} tokens max, {s['steps']} steps; samples/s from the mean step time after "
        f"{s['warmup']} warm-up steps (main process). CPU runs use {s['threads']} thread(s) per process.",
        "",
        "| processes | sharding | mean step (s) | samples/s | speed-up | peak RSS, main process (MiB) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    base = result["runs"][0]["samples_per_s"]
    for r in result["runs"]:
        lines.append(
            f"| {r['processes']} | {r.get('sharding', '-')} | {r['steady_step_s']:.3f} | {r['samples_per_s']:.2f} | "
            f"{r['samples_per_s'] / base:.2f}x | {r.get('peak_memory_mib', float('nan')):.0f} |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    lines += [
        "",
        "Peak RSS is the main process's high-water mark through loading, selection and training: every",
        "process loads the whole model before FSDP2 / ZeRO-3 shard it, and gathers it whole again after",
        "training, so on one machine these modes cannot show a lower peak; what they shard is the memory",
        "of the steps (parameters, gradients and AdamW state), which for a 135M model on a CPU is small",
        "next to the per-layer all-gathers over gloo that make them slower here.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--sharding", default="ddp,fsdp2,zero2,zero3", help="for N > 1: " + ", ".join(SHARDING))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="threads per process on a CPU")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-scaling"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default="")
    p.add_argument("--render", action="store_true")
    a = p.parse_args()
    if a.render:
        return render_only(a.out, "scaling", render)
    import torch

    a.gpu = torch.cuda.is_available()
    runs = []
    for n in (int(x) for x in a.procs.split(",")):
        for sharding in a.sharding.split(",") if n > 1 else ["ddp"]:
            print(f"{n} process(es), {sharding} ...", flush=True)
            runs.append(run(n, a, a.runs / f"p{n}-{sharding}", sharding))
            print(f"    {runs[-1]['samples_per_s']:.2f} samples/s", flush=True)
    device = torch.cuda.get_device_name(0) if a.gpu else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    result = {
        "command": command_line(__file__),
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            k: getattr(a, k)
            for k in ("model", "steps", "warmup", "batch_size", "max_length", "threads", "sharding")
        },
        "runs": runs,
        "note": a.note,
    }
    write_results(a.out, "scaling", result, render)


if __name__ == "__main__":
    main()
