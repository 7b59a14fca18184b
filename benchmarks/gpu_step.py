"""Train-step time and peak memory: row-sparse tuning (every impl) vs PEFT LoRA vs full fine-tuning,
at the same trainable-parameter count, on a GPU or a CPU.

    python benchmarks/gpu_step.py                                  # CPU: tiny-llama + SmolLM2-135M shape
    python benchmarks/gpu_step.py --models llama-3.2-1b llama-3-8b # GPU: real shapes (defaults differ)
    python benchmarks/gpu_step.py --grad-ckpt both                 # with and without gradient checkpointing
    python benchmarks/gpu_step.py --quantization nf4 --name quantized \
        --models smollm2-135m --methods rows-auto lora                # rows on a 4-bit base vs QLoRA

Models are random-init models built from a config at real shapes (the weights do not change the cost):
``tiny-llama``, ``smollm2-135m`` (SmolLM2-135M's shape), ``llama-3.2-1b``, ``llama-3-8b``. Budget:
LoRA rank ``--rank`` on every linear layer; row methods get magnitude-selected rows at the same count
(k = round(r(in+out)/in) per module). Precisions: ``bf16`` (bf16 weights, no autocast), ``amp`` (fp32
weights + bf16 autocast: what ``neurontune finetune precision=auto`` does on a GPU), ``fp32``
(``precision=auto`` on a CPU). AdamW on the trainable parameters, one synthetic batch of seeded token
ids, every position labelled.

``--quantization nf4|fp4|int8``: the frozen base is loaded quantized by bitsandbytes (``neurontune.models``:
the random-init model is saved once under ``$NEURONTUNE_CACHE/bench-models`` and loaded back with a
``BitsAndBytesConfig``); ``lora`` is then QLoRA and the row methods run through the quantized layer's
own kernels. Full fine-tuning and the dense-only impls are skipped (they cannot run on a packed base).

Each (model, precision, checkpointing, method) runs in a fresh subprocess. Step time: median of the
timed steps (CUDA events on a GPU, ``perf_counter`` on a CPU), best of ``--repeats`` (the order of
methods rotates between repeats). Peak memory above the loaded model: ``torch.cuda.max_memory_allocated``
on a GPU; on a CPU the peak RSS during the timed steps (a 2 ms sampling thread) minus the RSS before
the model was wrapped. Writes ``results/gpu_step.json`` and ``results/gpu_step.md`` (or the
``--name`` given), with the command, device and versions, after every worker (a run cut short keeps
what it measured). A worker that fails (out of memory, say) is recorded as such and the run goes on.
``--append`` adds to the saved results of the same device (several calls of a time-limited machine
into one table); a cell measured again replaces the earlier one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from neurontune.bench import command_line, render_only, run_worker, write_results

RESULTS = Path(__file__).parent / "results"
# lora-nocast: PEFT's get_peft_model(..., autocast_adapter_dtype=False), the adapter kept in the base's dtype
# (PEFT's default upcasts it to fp32 on a bf16 base), the fairer baseline for pure-bf16 rows
# rows-peft: the PEFT method's layer (what `finetune` trains since #32), impl auto; rows-*: RowTuneModel's
METHODS = [
    "rows-auto",
    "rows-merged",
    "rows-fused",
    "rows-index_add",
    "rows-peft",
    "lora",
    "lora-nocast",
    "full",
]
# Llama-family shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False),
}
# default batch x seq per model, and precisions, per device kind
GPU_DEFAULTS = {"models": ["llama-3.2-1b", "llama-3-8b"], "precisions": ["bf16", "amp"]}
CPU_DEFAULTS = {"models": ["tiny-llama", "smollm2-135m"], "precisions": ["fp32", "amp"]}
CKPT = {"no": [0], "yes": [1], "both": [0, 1]}  # --grad-ckpt -> the checkpointing settings run
BATCH = {"tiny-llama": (4, 128), "smollm2-135m": (4, 128), "llama-3.2-1b": (4, 1024), "llama-3-8b": (2, 1024)}


def build_model(name: str, dtype, quantization: str = "none"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neurontune.models import load_model, tiny_model, tiny_tokenizer

    if quantization != "none":  # a saved copy of the random-init model, loaded back quantized
        from neurontune.io import cache_dir

        path = cache_dir() / "bench-models" / name
        if not (path / "config.json").is_file():
            build_model(name, torch.float32).save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)  # load_model wants one; the ids are synthetic anyway
        return load_model(str(path), dtype=dtype, quantization=quantization)[0]
    if name == "tiny-llama":
        return tiny_model("tiny-llama", dtype=dtype)
    h, inter, layers, heads, kv, vocab, tied = SHAPES[name]
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def worker(a: argparse.Namespace) -> dict:
    import torch

    from neurontune import RowTuneConfig, get_rowtune_model
    from neurontune.bench import PeakRSS
    from neurontune.scoring import score_model
    from neurontune.selection import select
    from neurontune.targets import find_target_modules

    model_name, precision, ckpt, method = a.worker[0], a.worker[1], a.worker[2] == "1", a.worker[3]
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    batch, seq = a.batch or BATCH[model_name][0], a.seq or BATCH[model_name][1]
    wdtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_model(model_name, wdtype, a.quantization).to(dev) if a.quantization == "none" else (
        build_model(model_name, wdtype, a.quantization))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 3, (batch, seq), generator=g).to(dev)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    resolved = None
    import psutil

    rss0 = psutil.Process().memory_info().rss
    if method == "rows-peft":
        from peft import get_peft_model

        spec = select(model, score_model(model, "magnitude"), match_lora_rank=a.rank)
        model = get_peft_model(model, RowTuneConfig(rows=spec))
    elif method.startswith("rows"):
        spec = select(model, score_model(model, "magnitude"), match_lora_rank=a.rank)
        model = get_rowtune_model(model, spec, RowTuneConfig(impl=method.split("-", 1)[1]))
        layer = next(iter(model.rowtune_layers().values()))
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "amp"):
            resolved = layer.resolved_impl(torch.empty(0, device=dev, dtype=wdtype))
    elif method in ("lora", "lora-nocast"):
        from peft import LoraConfig, get_peft_model

        suffixes = sorted({t.split(".")[-1] for t in find_target_modules(model)})
        model = get_peft_model(
            model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=suffixes),
            autocast_adapter_dtype=method == "lora",
        )  # fmt: skip
    elif method == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(method)
    params = [p for p in model.parameters() if p.requires_grad]
    quantized = sum(1 for m in model.modules() if type(getattr(m, "weight", None)).__name__ in (
        "Params4bit", "Int8Params"))  # fmt: skip
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "amp"):
            loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    times = []
    with PeakRSS() as mem:
        while len(times) < a.steps or sum(times) < a.min_seconds:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                step().item()
                times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - mem0) if cuda else (mem.peak - rss0)
    trainable = sum(p.numel() for p in params)
    return {
        "model": model_name,
        "precision": precision,
        "grad_ckpt": ckpt,
        "method": method,
        "quantization": a.quantization,
        "quantized_layers": quantized,
        "resolved_impl": resolved,
        "batch": batch,
        "seq": seq,
        "trainable_params": trainable,
        "step_s_median": statistics.median(times),
        "step_times": times,
        "peak_mib": peak / 2**20,
        "tokens_per_s": batch * seq / statistics.median(times),
    }


def run_all(a: argparse.Namespace, on_row=None) -> list[dict]:
    """Every (model, precision, checkpointing, repeat, method) in its own worker; ``on_row(rows)`` after
    each, so a run cut short keeps what it measured. A worker that fails is recorded, not fatal."""
    rows = []
    for model_name in a.models:
        for precision in a.precisions:
            for ckpt in CKPT[a.grad_ckpt]:
                for rep in range(a.repeats):
                    order = a.methods[rep % len(a.methods) :] + a.methods[: rep % len(a.methods)]
                    for method in order:
                        cmd = [sys.executable, __file__, "--worker", model_name, precision, str(ckpt), method]
                        cmd += ["--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup)]
                        cmd += ["--min-seconds", str(a.min_seconds), "--quantization", a.quantization]
                        cmd += ["--batch", str(a.batch)] if a.batch else []
                        cmd += ["--seq", str(a.seq)] if a.seq else []
                        print(f"[{model_name} {precision} ckpt={ckpt} rep {rep}] {method} ...", flush=True)
                        try:
                            r = run_worker(cmd)
                        except SystemExit as e:  # run_worker's exit on a failed worker, with its stderr
                            print(e, flush=True)
                            r = failed(model_name, precision, ckpt, method, str(e).strip().splitlines()[-1])
                        r["repeat"] = rep
                        rows.append(r)
                        if r.get("failed"):
                            print(f"    failed: {r['failed']}", flush=True)
                        else:
                            print(
                                f"    {r['step_s_median'] * 1000:.1f} ms, +{r['peak_mib']:.0f} MiB",
                                flush=True,
                            )
                        if on_row is not None:
                            on_row(rows)
    return rows


def failed(model_name: str, precision: str, ckpt: int, method: str, why: str) -> dict:
    return {"model": model_name, "precision": precision, "grad_ckpt": bool(ckpt), "method": method,
            "failed": why[:200], "trainable_params": None, "resolved_impl": None}  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["model"], r["precision"], r["grad_ckpt"]) for r in rows)
    for model_name, precision, ckpt in keys:
        group = [
            r for r in rows if (r["model"], r["precision"], r["grad_ckpt"]) == (model_name, precision, ckpt)
        ]
        for method in dict.fromkeys(r["method"] for r in group):
            rs = [r for r in group if r["method"] == method and not r.get("failed")]
            if not rs:
                why = next(r["failed"] for r in group if r["method"] == method)
                out.append({**failed(model_name, precision, ckpt, method, why), "batch": ""})
                continue
            out.append(
                {
                    "model": model_name,
                    "precision": precision,
                    "grad_ckpt": ckpt,
                    "method": method,
                    "resolved_impl": rs[0]["resolved_impl"],
                    "batch": f"{rs[0]['batch']}x{rs[0]['seq']}",
                    "trainable_params": rs[0]["trainable_params"],
                    # best repeat: a repeat disturbed by other load only ever runs slower
                    "step_ms": 1000 * min(r["step_s_median"] for r in rs),
                    "step_ms_max": 1000 * max(r["step_s_median"] for r in rs),  # the spread over repeats
                    "repeats": len(rs),
                    "peak_mib": statistics.median(r["peak_mib"] for r in rs),
                }
            )
    return out


def render(result: dict) -> str:
    meta, summary = result["meta"], result["summary"]
    mem_what = (
        "torch.cuda.max_memory_allocated above the loaded model"
        if meta["cuda"]
        else "peak RSS during the timed steps minus RSS before wrapping the model"
    )
    q = meta.get("quantization", "none")
    title = (
        f"# Train-step time and memory on a {q} base (bitsandbytes {meta.get('bitsandbytes')}): rows vs QLoRA"
        if q != "none"
        else "# Train-step time and memory: rows (every impl) vs PEFT LoRA vs full fine-tuning"
    )
    lines = [
        title,
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}; {meta['date']}  ",
        f"Random-init models at real shapes; budget LoRA rank {meta['rank']} on every linear layer (rows: "
        f"magnitude-selected, same trainable count); AdamW; step = median of >= {meta['steps']} timed steps "
        f"(>= {meta['min_seconds']} s) after {meta['warmup']} warm-up, best of {meta['repeats']} repeats "
        f"({'CUDA events' if meta['cuda'] else 'perf_counter'}); memory = {mem_what}, median of repeats.  ",
        "Precision: `bf16` = bf16 weights; `amp` = fp32 weights + bf16 autocast (`precision=auto` on a GPU); "
        "`fp32` = `precision=auto` on a CPU. `rows-auto` resolves to the impl in brackets.",
        "",
        "| model | batch | precision | grad ckpt | method | trainable | step (ms) | vs LoRA | vs full | peak (MiB) | mem vs LoRA |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        same = [
            x
            for x in summary
            if (x["model"], x["precision"], x["grad_ckpt"]) == (r["model"], r["precision"], r["grad_ckpt"])
        ]
        lora = next((x for x in same if x["method"] == "lora"), None)
        full = next((x for x in same if x["method"] == "full"), None)

        def ratio(x, key, r=r):
            return f"{r[key] / x[key]:.2f}x" if x and not x.get("failed") and x[key] > 0 else "–"

        def spread(x):  # the slowest repeat beside the best, where several ran
            return f" (..{x['step_ms_max']:.1f}, {x['repeats']} reps)" if x.get("repeats", 1) > 1 else ""

        name = r["method"] + (f" [{r['resolved_impl']}]" if r["method"] == "rows-auto" else "")
        if r.get("failed"):
            lines.append(
                f"| {r['model']} | | {r['precision']} | {'yes' if r['grad_ckpt'] else 'no'} | {name} | | "
                f"{r['failed']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {'yes' if r['grad_ckpt'] else 'no'} | {name} | "
            f"{r['trainable_params']:,} | {r['step_ms']:.1f}{spread(r)} | {ratio(lora, 'step_ms')} | "
            f"{ratio(full, 'step_ms')} | "
            f"{r['peak_mib']:.0f} | {ratio(lora, 'peak_mib')} |"
        )
    return "\n".join(lines) + "\n"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} threads"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    p.add_argument(
        "--models", nargs="+", help="default: GPU llama-3.2-1b llama-3-8b; CPU tiny-llama smollm2-135m"
    )
    p.add_argument(
        "--precisions", nargs="+", choices=["bf16", "amp", "fp32"], help="default: GPU bf16 amp; CPU fp32 amp"
    )
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--grad-ckpt", choices=["no", "yes", "both"], default="no")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quantization", choices=["none", "nf4", "fp4", "int8"], default="none")
    p.add_argument("--batch", type=int, help="override the per-model default batch size")
    p.add_argument("--seq", type=int, help="override the per-model default sequence length")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="gpu_step", help="results file stem")
    p.add_argument("--render", action="store_true", help="only rebuild the markdown from the saved JSON")
    p.add_argument(
        "--append",
        action="store_true",
        help="add to the saved results (same device) instead of replacing them",
    )
    a = p.parse_args()
    if a.render:
        return render_only(a.out, a.name, render)
    if a.worker:
        import json

        import torch

        try:
            print(json.dumps(worker(a)))
        except torch.OutOfMemoryError:  # recorded as a result: e.g. full FT of an 8B model in fp32 + AdamW
            m, precision, ckpt, method = a.worker
            print(json.dumps(failed(m, precision, int(ckpt), method, "out of memory")))
        return
    import peft
    import torch
    import transformers

    defaults = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    if a.quantization != "none":  # a packed base: no full fine-tuning, no dense-weight impls
        a.methods = [m for m in a.methods if m not in ("full", "rows-merged", "rows-fused")]
    a.models = a.models or defaults["models"]
    a.precisions = a.precisions or defaults["precisions"]
    meta = {
        "command": command_line(__file__),
        "device": device_name(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "rank": a.rank,
        "quantization": a.quantization,
        "bitsandbytes": _version("bitsandbytes"),
        "steps": a.steps,
        "warmup": a.warmup,
        "min_seconds": a.min_seconds,
        "repeats": a.repeats,
        "date": time.strftime("%Y-%m-%d"),
    }
    earlier = []
    if a.append and (a.out / f"{a.name}.json").is_file():
        import json

        saved = json.loads((a.out / f"{a.name}.json").read_text())
        if saved["meta"]["device"] != meta["device"]:
            sys.exit(
                f"--append: {a.name}.json was measured on {saved['meta']['device']}, not {meta['device']}"
            )
        earlier, meta["command"] = saved["runs"], saved["meta"]["command"] + "` then `" + meta["command"]
        new = {(m, p, bool(c)) for m in a.models for p in a.precisions for c in CKPT[a.grad_ckpt]}
        # a cell measured again replaces the earlier measurement of it
        earlier = [
            r
            for r in earlier
            if (r["model"], r["precision"], r["grad_ckpt"]) not in new or r["method"] not in a.methods
        ]

    def save(rows: list[dict], echo: bool = False) -> None:
        rows = earlier + rows
        write_results(a.out, a.name, {"meta": meta, "summary": summarise(rows), "runs": rows}, render, echo)

    save(run_all(a, on_row=save), echo=True)


if __name__ == "__main__":
    main()
