"""Where a process's memory goes in an FSDP2 run with the sharded load: peak and current RSS after
each phase (libraries and the empty model, the sharded load, the first forward, its backward, a second
step), per process. Fix glibc's mmap threshold as ``scaling.py`` does (it is read at process start):

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 \
        benchmarks/fsdp_phases.py --model llama-3.2-1b

Run under torchrun with the variables ``accelerate launch`` exports for an FSDP2 config (set here if
absent). The model is the random-init shape saved by ``scaling.py`` (``--model`` a gpu_step shape);
the adapter is LoRA r8 on q/v, the batch one sequence of ``--tokens``. Writes
``results/fsdp_phases.{json,md}`` (rank 0); with accelerate's size-based policy
(``FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP FSDP_MIN_NUM_PARAMS=10000000``, as ``fsdp2_size.yaml``),
``results/fsdp_phases_size.{json,md}``.
"""

from __future__ import annotations

import os

for k, v in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}.items():  # fmt: skip
    os.environ.setdefault(k, v)

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def rss() -> tuple[float, float]:
    """(peak, current) RSS of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        current = int(f.read().split("VmRSS:")[1].split()[0]) / 1024
    return peak, current


def render(result: dict) -> str:
    lines = [
        "# FSDP2 with the sharded load: memory by phase, per process",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; torch {result['torch']}; {result['date']}; code {result['commit']}  ",
        f"Model `{result['model']}` (random init, fp32), LoRA r8 on q_proj/v_proj, one sequence of "
        f"{result['tokens']} tokens, {result['processes']} processes; RSS with glibc's mmap threshold fixed.  ",
        f"FSDP2 units ({result['wrap']}): {result['units']}, the largest of "
        f"{result['largest_unit_params']:,} parameters (what a process gathers whole at once).",
        "",
        "| phase | "
        + " | ".join(f"rank {r} peak / current (MiB)" for r in range(result["processes"]))
        + " |",
        "|---|" + "---:|" * result["processes"],
    ]
    for i, phase in enumerate(result["phases"]):
        cells = [f"{p[i][1]:.0f} / {p[i][2]:.0f}" for p in result["per_process"]]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--assets", type=Path, default=Path("runs/bench-assets"))
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    import torch
    from accelerate.utils import gather_object
    from peft import LoraConfig, get_peft_model
    from scaling import model_path

    from neurontune.bench import code_commit, command_line, write_results
    from neurontune.models import load_model
    from neurontune.runtime import fsdp_units, process_state
    from neurontune.sharded import shard_and_fill
    from neurontune.train import TrainArgs, launched_min_num_params, shard_model

    state = process_state()
    record = []
    path = model_path(a.model, a.assets)  # rank 0 may build it; the others wait
    state.wait_for_everyone()
    model, _ = load_model(path, empty=True, device="cpu")
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    record.append(("libraries and the empty model", *rss()))
    model, read = shard_and_fill(
        model, lambda m: shard_model(m, TrainArgs(gradient_checkpointing=True)), launched_min_num_params()
    )
    units = fsdp_units(model)
    record.append((f"sharded load ({read['bytes_read'] / 2**20:,.0f} MiB read)", *rss()))
    model.train()
    x = torch.randint(0, 1000, (1, a.tokens))
    out = model(input_ids=x, labels=x)
    record.append(("first forward", *rss()))
    out.loss.backward()
    del out
    record.append(("its backward", *rss()))
    model(input_ids=x, labels=x).loss.backward()
    record.append(("a second forward and backward", *rss()))
    per_process = gather_object([record])
    if state.is_main_process:
        result = {
            "command": " ".join(
                [f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS", "FSDP_AUTO_WRAP_POLICY", "FSDP_MIN_NUM_PARAMS") if k in os.environ]
                + [f"torchrun --standalone --nproc-per-node {state.num_processes}", command_line(__file__)[7:]]
            ),
            "commit": code_commit(),
            "device": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "model": a.model,
            "tokens": a.tokens,
            "processes": state.num_processes,
            "wrap": os.environ["FSDP_AUTO_WRAP_POLICY"],
            "units": len(units),
            "largest_unit_params": max(units.values()),
            "phases": [r[0] for r in record],
            "per_process": per_process,
        }  # fmt: skip
        size = result["wrap"] == "SIZE_BASED_WRAP"
        write_results(a.out, "fsdp_phases_size" if size else "fsdp_phases", result, render)


if __name__ == "__main__":
    main()
