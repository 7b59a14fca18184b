"""Peak memory of every stage of the default ``neurontune finetune`` at real shapes, each stage in its own
process, against the peak of a row training step at the same batch.

    python benchmarks/memory.py --model smollm2-135m                  # CPU: peak RSS of each process
    python benchmarks/memory.py --model llama-3.2-1b --calib-examples 8
    python benchmarks/memory.py --model llama-3-8b --grad-ckpt both  # GPU: torch.cuda.max_memory_allocated

The model is a random-init model at the named shape (``gpu_step.py``'s shapes; weights do not change the
cost), saved once in ``--save-dtype`` (fp32 by default on a CPU, bf16 on a GPU, as checkpoints ship)
with the byte-level tiny tokenizer, and loaded with finetune's default ``dtype=auto`` (the checkpoint's
own on a GPU, fp32 on a CPU). The data are seeded random words as plain text, long enough to fill
``--max-length``. Stages, each a fresh process that loads the model and then does one thing with the
library calls ``neurontune finetune`` makes:

- ``load``: the model alone (every weight read once);
- ``score-<scorer>``: ``score_model`` on ``--calib-examples`` examples in batches of ``--batch-size``
  (finetune's ``calib_batch_size``), at the default memory setting (``neft-grouped``: NeFT with
  ``probe_mode=grouped``);
- ``train-<method>``: the method's ``build`` (rows chosen by ``magnitude``, whose cost is ``score-magnitude``)
  then ``--steps`` optimizer steps of the training loop at ``--batch-size`` x ``--max-length``, with a
  checkpoint written after every step (so the checkpoint is inside this peak);
- ``eval``: the evaluation finetune runs before and after training (``eval_batch_size`` 16);
- ``merge`` / ``export``: ``neurontune merge`` and ``neurontune export --check`` of the adapter that
  ``train-rows`` saved.

On a CPU the peak is the process's peak RSS (libraries included; ``baseline`` is the RSS after imports);
on a GPU it is ``torch.cuda.max_memory_allocated``. Writes ``results/memory.{json,md}`` (``--name``),
with the command, device and versions; stages that fail (out of memory) are recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from finetune_speed import make_assets
from gpu_step import _version, device_name

from neurontune.bench import code_commit, command_line, render_only, write_results

RESULTS = Path(__file__).parent / "results"
SCORERS = [
    "magnitude",
    "random",
    "wanda",
    "activation",
    "taylor",
    "fisher",
    "zo-taylor",
    "neft",
    "neft-grouped",
]
STAGES = ["load", *(f"score-{s}" for s in SCORERS), "train-rows", "train-lora", "train-full", "eval",
          "merge", "export"]  # fmt: skip
# what `neurontune finetune` with its defaults runs: load, the taylor selection, row training, evaluation
DEFAULT_COMMAND = ["load", "score-taylor", "train-rows", "eval"]


def versions() -> str:
    return ", ".join(f"{p} {_version(p)}" for p in ("torch", "transformers", "peft", "accelerate"))


def _peak() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"


def worker(a: argparse.Namespace) -> dict:
    """One stage in this process; returns its peak."""
    import torch

    from neurontune.config import FinetuneConfig
    from neurontune.models import load_model
    from neurontune.tasks import fixed_batches, load_task

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    runs = Path(a.runs)
    stage = a.worker
    t0 = time.perf_counter()
    info: dict = {}
    if stage in ("merge", "export"):
        from neurontune import export as ex
        from neurontune.config import MergeConfig
        from neurontune.pipeline import run_merge

        adapter = runs / "run-rows" / "adapter"
        target = runs / f"{stage}-out"
        if target.exists():
            import shutil

            shutil.rmtree(target)
        if stage == "merge":
            run_merge(MergeConfig(adapter=str(adapter), output=str(target), model=str(a.model_dir)))
        else:
            info = ex.export(str(adapter), "peft-lora", str(target), False, True, str(a.model_dir))
            info = {"max_abs_logit_diff": info.get("max_abs_logit_diff")}
    else:
        model, tok = load_model(str(a.model_dir), dtype="auto", device=dev)
        with (
            torch.no_grad()
        ):  # every weight read once: a CPU load maps the file, RSS counts pages once touched
            for p in model.parameters():
                p.sum()
        info["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        task = load_task(str(a.data), tok, seed=0).head(a.train_examples, a.eval_examples)
        if stage.startswith("score-"):
            from neurontune.scoring import score_model

            scorer = stage.removeprefix("score-")
            calib = fixed_batches(task.train[: a.calib_examples], tok, a.batch_size, a.max_length)
            options = {"probe_steps": a.probe_steps} if scorer.startswith("neft") else {}
            if scorer == "neft-grouped":  # NeFT's memory-bounded probe
                scorer, options["probe_mode"] = "neft", "grouped"
            score_model(model, scorer, batches=calib, seed=0, **options)
        elif stage.startswith("train-"):
            from neurontune.methods import get_method
            from neurontune.runtime import count_parameters
            from neurontune.tasks import StepBatches
            from neurontune.train import train, train_args

            method_name = stage.removeprefix("train-")
            out = runs / f"run-{method_name}"
            cfg = FinetuneConfig(
                model=str(a.model_dir), method=method_name, steps=a.steps, batch_size=a.batch_size,
                max_length=a.max_length, save_steps=1, output_dir=str(out), gradient_checkpointing=bool(a.ckpt),
                overwrite=True, **({"scorer": "magnitude"} if method_name == "rows" else {}),
            )  # fmt: skip
            method = get_method(method_name)(cfg)
            if out.exists():
                import shutil

                shutil.rmtree(out)
            out.mkdir(parents=True)
            model = method.build(model, tok, task, out)
            info["trainable_params"] = count_parameters(model)[0]
            data = StepBatches(task.train, tok, cfg.batch_size, cfg.max_length, cfg.seed)
            log = train(
                model, data, train_args(cfg), out, param_groups=method.param_groups(model, cfg.lr),
                regularization=method.regularization(model), step_stats=method.step_stats(model),
                progress=False,
            )  # fmt: skip
            info["step_seconds"] = [round(r["seconds"], 3) for r in log]
            if method_name == "rows":
                method.save(model, tok, out)  # the adapter merge and export read
        elif stage == "eval":
            from neurontune.evaluation import evaluate
            from neurontune.tasks import general_text

            try:
                forget = general_text(32)
            except Exception:  # the news text is not on this machine (a GPU machine without the cache)
                forget = []
            info["forgetting_examples"] = len(forget)
            evaluate(model, tok, task, max_length=a.max_length, batch_size=16, general_text=forget)
        elif stage != "load":
            raise SystemExit(f"unknown stage {stage}")
    peak, kind = _peak()
    return {"stage": stage, "peak_bytes": peak, "kind": kind, "baseline_bytes": baseline,
            "seconds": round(time.perf_counter() - t0, 2), **info}  # fmt: skip


def run_stage(a: argparse.Namespace, stage: str, model_dir: Path, data: Path, ckpt: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, "--model-dir", str(model_dir), "--data", str(data),
           "--runs", str(a.runs), "--ckpt", str(ckpt), "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--steps", str(a.steps), "--calib-examples", str(a.calib_examples),
           "--probe-steps", str(a.probe_steps), "--train-examples", str(a.train_examples),
           "--eval-examples", str(a.eval_examples)]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        why = "out of memory" if res.returncode in (-9, 137) or "out of memory" in res.stderr else "failed"
        last = (res.stderr.strip().splitlines() or [""])[-1][-300:]
        return {"stage": stage, "error": f"{why} (exit {res.returncode}): {last}",
                "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def render(r: dict) -> str:
    gib = 2**30
    lines = [
        f"# Peak memory per stage: {', '.join(r['models'])}",
        "",
        f"Command: `{r['command']}`  ",
        f"Code commit: {r['commit']} (of the last call; each stage records its own); device: {r['device']}; {r['versions']}; {r['date']}.",
        "",
        "Each block gives its batch (training and calibration passes alike), calibration examples and training "
        f"steps (a checkpoint after each); evaluation batch 16. Peak: {r['kind']} of each stage's process (GiB)"
        + (", libraries included (RSS after imports: "
           f"{r['baseline_gib']:.2f} GiB)" if r["kind"] == "peak_rss" else "") + ". "
        "`ratio` is the stage's peak over the peak of `train-rows` at the same shape and checkpointing; "
        "the goal is no stage above 1.00.",
        "",
    ]  # fmt: skip
    for block in r["blocks"]:
        ref = next((s.get("peak_bytes") for s in block["stages"] if s["stage"] == "train-rows"), None)
        b = {**r, **block}  # blocks written before the settings were recorded per block: the file's
        lines += [f"## {block['model']}, weights {block['dtype']}, gradient checkpointing "
                  f"{'on' if block['ckpt'] else 'off'}", "",
                  f"Batch {b['batch_size']} x {b['max_length']} tokens, {b['calib_examples']} calibration "
                  f"examples, {b['steps']} training steps.", "",
                  "| stage | peak (GiB) | ratio to train-rows | seconds | notes |", "|---|---|---|---|---|"]  # fmt: skip
        for s in block["stages"]:
            if "error" in s:
                lines.append(
                    f"| {s['stage']} | - | - | {s['seconds']} | {s['error'][:160].replace('|', '/')} |"
                )
                continue
            notes = []
            if "trainable_params" in s:
                notes.append(f"{s['trainable_params']:,} trainable")
            if "max_abs_logit_diff" in s:
                notes.append(f"max logit diff {s['max_abs_logit_diff']:.2g}")
            ratio = f"{s['peak_bytes'] / ref:.2f}" if ref else "-"
            lines.append(f"| {s['stage']} | {s['peak_bytes'] / gib:.2f} | {ratio} | {s['seconds']} | "
                         f"{'; '.join(notes)} |")  # fmt: skip
        default = [s for s in block["stages"] if s["stage"] in DEFAULT_COMMAND and "peak_bytes" in s]
        if len(default) == len(DEFAULT_COMMAND):
            top = max(default, key=lambda s: s["peak_bytes"])
            lines += ["", f"The default command's peak (the largest of {', '.join(DEFAULT_COMMAND)}): "
                      f"{top['peak_bytes'] / gib:.2f} GiB, in `{top['stage']}`."]  # fmt: skip
        # the goal concerns the stages around row training; LoRA and full fine-tuning are the comparison
        over = [s["stage"] for s in block["stages"] if ref and s.get("peak_bytes", 0) > ref
                and s["stage"] not in ("train-lora", "train-full")]  # fmt: skip
        lines += [
            "",
            f"Stages other than training above train-rows: {', '.join(over) if over else 'none'}.",
            "",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=None, help="shapes (default: smollm2-135m on a CPU, "
                   "llama-3.2-1b and llama-3-8b on a GPU)")  # fmt: skip
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument(
        "--grad-ckpt", choices=["no", "yes", "both"], default=None, help="default: no on a CPU, both on a GPU"
    )
    p.add_argument("--save-dtype", default=None, help="dtype the random-init checkpoint is saved in")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on a CPU (finetune's), 2 on a GPU")
    p.add_argument(
        "--max-length", type=int, default=None, help="default 128 on a CPU (finetune's), 1024 on a GPU"
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--calib-examples", type=int, default=64, help="finetune's default 64")
    p.add_argument("--probe-steps", type=int, default=20, help="NeFT's probe steps (finetune's default 20)")
    p.add_argument("--train-examples", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--runs", type=Path, default=Path("runs/bench-memory"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="memory")
    p.add_argument("--append", action="store_true", help="add to an existing results file (stages measured "
                   "again replace the earlier ones)")  # fmt: skip
    p.add_argument("--render", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.render:
        render_only(a.out, a.name, render)
        return
    import torch

    gpu = torch.cuda.is_available()
    a.model = a.model or (["llama-3.2-1b", "llama-3-8b"] if gpu else ["smollm2-135m"])
    a.grad_ckpt = a.grad_ckpt or ("both" if gpu else "no")
    a.save_dtype = a.save_dtype or ("bfloat16" if gpu else "float32")
    a.batch_size = a.batch_size or (2 if gpu else 8)
    a.max_length = a.max_length or (1024 if gpu else 128)
    a.runs.mkdir(parents=True, exist_ok=True)
    old = json.loads((a.out / f"{a.name}.json").read_text()) if a.append else None
    result = {
        "command": (f"{old['command']}` then `" if old else "") + command_line(__file__),
        "commit": code_commit(),
        "device": device_name(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
        "kind": "cuda_max_allocated" if gpu else "peak_rss", "batch_size": a.batch_size,
        "max_length": a.max_length, "steps": a.steps, "calib_examples": a.calib_examples,
        "models": list(dict.fromkeys([*(old["models"] if old else []), *a.model])),
        "blocks": old["blocks"] if old else [],
    }  # fmt: skip
    base = subprocess.run([sys.executable, "-c", "import torch, transformers, peft, accelerate, resource; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    result["baseline_gib"] = int(base.stdout.strip()) * 1024 / 2**30
    settings = {"batch_size": a.batch_size, "max_length": a.max_length, "steps": a.steps,
                "calib_examples": a.calib_examples}  # fmt: skip
    for model in a.model:
        model_dir, data = make_assets(model, a.runs, 400, a.max_length * 2, a.save_dtype)
        for ckpt in {"no": [0], "yes": [1], "both": [0, 1]}[a.grad_ckpt]:
            # --append: a block measured before keeps its other stages; a stage measured again is replaced
            block = next((b for b in result["blocks"] if (b["model"], b["ckpt"]) == (model, ckpt)), None)
            if block is None:
                block = {"model": model, "dtype": a.save_dtype, "ckpt": ckpt, "stages": [], **settings}
                result["blocks"].append(block)
            for stage in a.stages:
                s = run_stage(a, stage, model_dir, data, ckpt)
                s["commit"] = result["commit"]
                block["stages"] = sorted([x for x in block["stages"] if x["stage"] != stage] + [s],
                                         key=lambda x: STAGES.index(x["stage"]))  # fmt: skip
                shown = f"{s['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in s else s["error"][:200]
                print(f"{model} ckpt={ckpt} {stage}: {shown} ({s['seconds']} s)", flush=True)
                write_results(a.out, a.name, result, render, echo=False)
    write_results(a.out, a.name, result, render)


if __name__ == "__main__":
    main()
