"""A multi-task quality suite: every method at its own best learning rate, several seeds, intervals.

    python benchmarks/quality_suite.py                                   # the whole suite (hours on a CPU)
    python benchmarks/quality_suite.py --methods none,full --phases test --seeds 0   # does each task learn?
    python benchmarks/quality_suite.py --model tiny-llama --tasks hyperbaton,past_tense --methods none,lora,rows-taylor \
        --lrs 1e-3 --seeds 0,1 --steps 4 --train-examples 32 --eval-examples 8 --out /tmp/qs   # smoke run
    python benchmarks/quality_suite.py --render                          # rebuild the markdown and PNG

Two phases, each run ``neurontune finetune`` in a fresh subprocess with the same data, steps, batch
size and evaluation; only the method and its learning rate change:

1. ``sweep``: every (task, method, learning rate) on a validation split (``eval_split=validation``:
   the last 10 % of the train split, which training then leaves out; the test split is not read),
   first seed, with ``eval_steps`` so the validation curve shows whether the steps were enough. Each
   (task, method) keeps the learning rate with the best validation score (ties: the smaller).
2. ``test``: every (task, method) at its chosen learning rate on the test split, for each seed (the
   seed sets the data split and order, selection ties and random scores).

``--lr-from dora=lora,rows-neft=rows-taylor`` skips the sweep of a method and gives it, on each task,
the rate chosen for another (a cheaper suite; the markdown lists which rates were borrowed).
``--tasks`` also takes data files (any file ``neurontune finetune task=FILE`` reads: classification,
multiple choice, prompt/completion, ...), so the suite runs on tasks kept apart; their runs go to a
folder named by the file's stem and a hash of its path.
``--recorded old.json`` takes each run an earlier results file holds with the very same command from
it instead of running it again (a method added to a finished suite costs only its own runs; the
markdown says how many runs are old and when they ran).

Scores are the task's primary metric on a 0-1 scale (accuracy; exact match / 100). Per (task,
method): the mean over seeds and a 95 % t-interval. Per method: the suite mean (per seed, the mean
over tasks). Paired comparisons (row methods against LoRA and full fine-tuning): the differences
over every (task, seed) pair (and each scorer against random rows), their mean, 95 % t-interval and
a two-sided paired t-test and Wilcoxon signed-rank p-value; "significant" means the interval
excludes 0. Writes ``results/quality_suite.json``, ``.md`` and ``quality_suite_curves.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from pathlib import Path

from neurontune.bench import (
    add_run_args,
    command_line,
    finetune_command,
    finetune_run,
    machine,
    render_only,
    same_source,
    write_results,
)

RESULTS = Path(__file__).parent / "results"
# task -> why it is in the suite
TASKS = {
    "rotten_tomatoes": "2-way sentiment classification (movie reviews); the easy case, already above chance zero-shot",
    "hyperbaton": "2-way multiple choice (BIG-bench): English adjective order, a rule the base model does not "
    "follow zero-shot and can learn from examples",
    "unit_identification": "3-way multiple choice (BIG-bench unit_conversion): the answer carrying the unit the "
    "question names; a format the base model misses",
    "sports_understanding": "2-way multiple choice (BIG-bench): plausibility from world knowledge about athletes; "
    "hard for a small model",
    "past_tense": "short generation, exact match (BIG-bench linguistic_mappings): English past tense, regular and "
    "irregular verbs",
    "arithmetic": "exact match on the number (BIG-bench): 1-2 digit addition and subtraction",
    "multiemo": "4-way sentiment classification of long opinions (BIG-bench multiemo)",
    "vitaminc": "3-way multiple choice (BIG-bench): does a Wikipedia passage support a claim (True/False/Neither)",
    "product_sentiment": "4-way classification (BIG-bench multiemo, English product-review sentences): negative, "
    "neutral, positive or ambivalent; the base model has no notion of 'ambivalent'",
    "si_conversion": "5-way multiple choice (BIG-bench unit_conversion): an SI quantity in another prefix; the "
    "distractors have the wrong unit or the wrong power of ten",
    "negation": "short generation, exact match (BIG-bench linguistic_mappings): negate a simple sentence (does not "
    "+ base form), a transformation the base model does not do zero-shot",
}
# the suite: the pilot's tasks (results/quality_suite_pilot.md) that full fine-tuning lifts above zero-shot
# and the majority class, 2 of each kind; unit_identification is solved zero-shot, sports_understanding unlearned
DEFAULT_TASKS = "rotten_tomatoes,hyperbaton,product_sentiment,si_conversion,past_tense,arithmetic"
# name -> finetune overrides (budget: LoRA r=8's count unless the name says otherwise)
METHODS: dict[str, list[str]] = {
    "none": ["method=none"],
    "full": ["method=full"],
    "lora": ["method=lora"],
    "dora": ["method=dora"],
    "rows-neft": ["method=rows", "scorer=neft", "scorer_options=probe_steps=8,probe_lr=1e-4"],
    "rows-taylor": ["method=rows", "scorer=taylor"],
    "rows-fisher": ["method=rows", "scorer=fisher"],
    "rows-magnitude": ["method=rows", "scorer=magnitude"],
    "rows-random": ["method=rows", "scorer=random"],
    "lora-r32": ["method=lora", "budget=lora:32"],
    "rows-taylor-r32": ["method=rows", "scorer=taylor", "budget=lora:32"],
    # the same parameter count as rows-taylor, spread over modules by score instead of evenly
    "rows-taylor-global": ["method=rows", "scorer=taylor", "budget=lora-global:8"],
}
# the GPU's default precision paths, run on a CPU under torch.autocast("cpu", bf16) (precision=bf16):
# -amp: fp32 weights with bf16 autocast, what precision=auto gives on a GPU for an fp32 checkpoint (the
# bundled model's), rows' impl then resolving to `merged`; -bf16: bf16 weights too, what dtype=auto gives
# for a bf16 checkpoint (Llama-3 and most others), rows' impl `fused`. Each is compared with its fp32 run.
PRECISIONS = {"-amp": ["precision=bf16"], "-bf16": ["precision=bf16", "dtype=bfloat16"]}
METHODS.update(
    {
        f"{m}{suffix}": [*METHODS[m], *extra]
        for m in ("rows-taylor", "lora")
        for suffix, extra in PRECISIONS.items()
    }
)


def precision_base(method: str) -> str | None:
    """The fp32 method a precision variant (``rows-taylor-amp``) is compared with, else None."""
    return next((method.removesuffix(x) for x in PRECISIONS if method.endswith(x)), None)


DEFAULT_METHODS = (
    "none,full,lora,dora,rows-neft,rows-taylor,rows-fisher,rows-magnitude,rows-random,rows-taylor-global,"
    "lora-r32,rows-taylor-r32"
)
ROW_METHODS = [m for m in METHODS if m.startswith("rows-")]


def scale(metric: str, value: float) -> float:
    return value / 100 if metric in ("exact_match", "rougeL", "bleu", "chrf") else value


def overrides(
    a: argparse.Namespace, task: str, method: str, seed: int, lr: float | None, split: str
) -> list[str]:
    length = f"num_train_epochs={a.epochs:g}" if a.epochs else f"steps={a.steps}"
    o = [
        f"model={a.model}", f"task={task}", f"seed={seed}", length, f"batch_size={a.batch_size}",
        f"train_examples={a.train_examples}", f"eval_examples={a.eval_examples}", f"max_length={a.max_length}",
        "forgetting_examples=0", "eval_before=false", "save_steps=0", f"eval_split={split}", *METHODS[method],
        *a.set,
    ]  # fmt: skip
    if a.split_seed is not None:  # every seed trains and tests on the same split
        o.insert(3, f"split_seed={a.split_seed}")
    if lr is not None:
        o.append(f"lr={lr:g}")
    if split == "validation" and a.eval_steps:
        o.append(f"eval_steps={a.eval_steps}")
    return o


def run(a: argparse.Namespace, phase: str, task: str, method: str, seed: int, lr: float | None) -> dict:
    split = "validation" if phase == "sweep" else "test"
    name = f"{method}-lr{lr:g}-s{seed}" if lr is not None else f"{method}-s{seed}"
    out = a.runs / phase / task_dir(task) / name
    o = overrides(a, task, method, seed, lr, split)
    if (old := a.recorded.get(finetune_command(o, out))) is not None:
        if same_source(old.get("source")):
            print(f"{phase} {task} {method} lr={lr} seed={seed}: recorded {old['score']:.3f}", flush=True)
            return old
        print(f"{phase} {task} {method} lr={lr} seed={seed}: recorded at other code "
              f"({old.get('source') or 'not on record'}), running it again", flush=True)  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None
    m = finetune_run(o, out, reuse=a.reuse, threads=threads)
    if not a.keep_weights:  # a full fine-tuning run leaves ~2 GB (model + final checkpoint); scores need none
        import shutil

        for heavy in ("model", "checkpoints", "merged"):
            shutil.rmtree(out / heavy, ignore_errors=True)
    metric = m["primary_metric"]
    row = {
        "phase": phase, "task": task, "method": method, "seed": seed, "lr": lr, "metric": metric,
        "score": scale(metric, m["after"][metric]), "trainable_params": m["trainable_params"],
        "train_seconds": m["train_seconds"], "steps": m["steps"], "command": m["command"],
        "source": m["source"], "config": resolved_options(out),
    }  # fmt: skip
    curve = out / "eval_log.json"
    if curve.is_file():
        import json

        points = json.loads(curve.read_text())["points"]
        row["curve"] = [(p["step"], scale(metric, p[metric])) for p in points]
    print(f"{phase} {task} {method} lr={lr} seed={seed}: {metric} {m['after'][metric]:.3f}", flush=True)
    return row


def resolved_options(out: Path) -> dict:
    """Every finetune option of the run in ``out`` as it resolved them (its ``config.json``), so a result
    says what ran, not only what the command set."""
    import json

    return json.loads((out / "config.json").read_text())


def task_dir(task: str) -> str:
    """The runs' folder for a task: its name, or for a data file its stem and a hash of the path as given."""
    if task in TASKS:
        return task
    import hashlib

    return f"{Path(task).stem}-{hashlib.sha1(task.encode()).hexdigest()[:8]}"


def task_info(task: str, seeds: list[int], n: int) -> tuple[float | None, str]:
    """The majority-class rate of the evaluated test examples (mean over the splits of ``seeds``; None
    for tasks without labels) and why the task is in the suite (for a data file: what it holds)."""
    from neurontune.errors import NeurontuneError
    from neurontune.tasks import load_task

    try:
        loaded = [load_task(task, seed=seed) for seed in seeds]
    except NeurontuneError as e:
        sys.exit(f"--tasks {task}: {e}")
    first = loaded[0]
    why = TASKS.get(task) or (
        f"a data file: {first.kind.replace('_', ' ')}, {len(first.train)} training and {len(first.eval)} "
        "test examples (split as `neurontune finetune task=FILE` splits it)"
    )
    if not first.eval or first.eval[0].label is None:
        return None, why
    rates = []
    for t in loaded:
        labels = [e.label for e in t.eval[:n]]
        rates.append(max(labels.count(v) for v in set(labels)) / len(labels))
    return statistics.fmean(rates), why


def recorded(paths: list[Path]) -> dict[str, dict]:
    """command -> run, from earlier results files (``--recorded``); each run keeps the date it was
    recorded on (``recorded``), so the markdown can say which runs are new."""
    from neurontune.errors import NeurontuneError
    from neurontune.io import read_json

    runs: dict[str, dict] = {}
    for path in paths:
        try:
            result = read_json(path, "--recorded results file")
            found = {r["command"]: r for r in result["runs"]}
        except NeurontuneError as e:
            sys.exit(str(e))
        except (KeyError, TypeError):
            sys.exit(f"--recorded {path}: not a results file (no runs with their commands)")
        for command, r in found.items():
            runs.setdefault(command, {**r, "recorded": r.get("recorded", result.get("date"))})
    return runs


def lrs_for(a: argparse.Namespace, method: str) -> list[float]:
    """The learning rates swept for ``method`` (each family has its own grid, around its usual rate)."""
    if method == "none":
        return []
    grid = a.lrs_full if method == "full" else a.lrs_rows if method.startswith("rows-") else a.lrs
    return [float(x) for x in grid.split(",")]


def borrowed(spec: str, methods: list[str]) -> dict[str, str]:
    """``--lr-from`` (``dora=lora,rows-neft=rows-taylor``): method -> the method whose chosen rates it
    takes instead of a sweep of its own. The source must be in the suite and sweep itself."""
    out = dict(item.split("=", 1) for item in spec.split(",") if item)
    bad = [f"{m}={src}" for m, src in out.items()
           if m not in methods or src not in methods or src in out or m in ("none", src)]  # fmt: skip
    if bad:
        sys.exit(f"--lr-from: each METHOD=SOURCE needs both in --methods, a source that sweeps itself: {bad}")
    return out


def choose(sweep: list[dict]) -> dict[str, dict[str, float]]:
    """task -> method -> the learning rate with the best validation score (ties: the smaller)."""
    best: dict[tuple[str, str], dict] = {}
    for r in sweep:
        cur = best.get((r["task"], r["method"]))
        if cur is None or (r["score"], -r["lr"]) > (cur["score"], -cur["lr"]):
            best[(r["task"], r["method"])] = r
    out: dict[str, dict[str, float]] = {}
    for (t, m), r in best.items():
        out.setdefault(t, {})[m] = r["lr"]
    return out


def tried(sweep: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(task, method) -> the learning rates its sweep ran, ascending."""
    out: dict[tuple[str, str], set[float]] = {}
    for r in sweep:
        out.setdefault((r["task"], r["method"]), set()).add(r["lr"])
    return {k: sorted(v) for k, v in out.items()}


def at_edge(sweep: list[dict]) -> list[tuple[str, str]]:
    """The (task, method)s whose chosen rate is the smallest or the largest their sweep tried (of 2 or
    more): the best rate may lie beyond the grid."""
    chosen, grids = choose(sweep), tried(sweep)
    return [(t, m) for (t, m), g in grids.items() if len(g) > 1 and chosen[t][m] in (g[0], g[-1])]


def beyond_edges(sweep: list[dict]) -> list[tuple[str, str, float]]:
    """For each (task, method) :func:`at_edge`, the next rate beyond its chosen one, a step of the grid's
    own ratio at that end (1e-4,3e-4,1e-3 choosing 1e-3 next tries 3.33e-3), to 3 significant digits."""
    grids, chosen, out = tried(sweep), choose(sweep), []
    for t, m in at_edge(sweep):
        g, lr = grids[(t, m)], chosen[t][m]
        nxt = lr / (g[1] / g[0]) if lr == g[0] else lr * (g[-1] / g[-2])
        out.append((t, m, float(f"{nxt:.3g}")))
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(
        stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    )


def compare(score: dict, m: str, ref: str, tasks: list[str], seeds: list[int]) -> dict | None:
    """``m`` against ``ref`` with the task as the unit: per task, the mean over seeds of the paired
    differences (each seed trains both on the same split and tests them on the same examples) and its
    95 % interval over seeds; across tasks, the mean of the per-task means, its 95 % t-interval and a
    two-sided one-sample t-test (df = tasks - 1). None with fewer than 2 tasks that have both."""
    from scipy import stats

    per_task = []
    for t in tasks:
        d = [
            score[(t, m, s)] - score[(t, ref, s)]
            for s in seeds
            if (t, m, s) in score and (t, ref, s) in score
        ]
        if d:
            mean, half = interval(d)
            per_task.append({"task": t, "mean_diff": mean, "ci95": half, "seeds": len(d)})
    if len(per_task) < 2:
        return None
    means = [x["mean_diff"] for x in per_task]
    mean, half = interval(means)
    if statistics.stdev(means) > 0:
        p = float(stats.ttest_1samp(means, 0.0).pvalue)
    else:  # every task differs by the same amount: no spread to test against
        p = 1.0 if mean == 0 else 0.0
    return {
        "method": m, "against": ref, "tasks": len(per_task), "mean_diff": mean, "ci95": half, "t_test_p": p,
        "wins": sum(x > 0 for x in means), "losses": sum(x < 0 for x in means), "per_task": per_task,
    }  # fmt: skip


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (in the given order): the i-th smallest of m is multiplied by
    m - i + 1, then made non-decreasing, capped at 1. A comparison is significant at 5 % family-wise
    error when its adjusted p is below 0.05."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    out, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        out[i] = running
    return out


def summarize(test: list[dict], tasks: list[str], methods: list[str], seeds: list[int]) -> dict:
    score = {(r["task"], r["method"], r["seed"]): r["score"] for r in test}
    table = []
    for t in tasks:
        for m in methods:
            vals = [score[(t, m, s)] for s in seeds if (t, m, s) in score]
            if vals:
                mean, half = interval(vals)
                table.append({"task": t, "method": m, "mean": mean, "ci95": half, "values": vals})
    suite = []
    for m in methods:
        per_seed = [
            statistics.fmean(score[(t, m, s)] for t in tasks)
            for s in seeds
            if all((t, m, s) in score for t in tasks)
        ]
        if per_seed:
            mean, half = interval(per_seed)
            suite.append({"method": m, "mean": mean, "ci95": half, "values": per_seed})
    paired = []
    for m in methods:
        if (base := precision_base(m)) is not None:  # the GPU's precision against fp32, nothing else
            if (c := compare(score, m, base, tasks, seeds)) is not None:
                paired.append(c)
            continue
        if not m.startswith("rows-"):
            continue
        budget = re.search(r"-r\d+$", m)  # a larger budget compares with LoRA at that rank
        refs = [f"lora{budget.group()}" if budget else "lora", "full"]
        if m != "rows-random" and not budget:  # does the scorer beat rows picked at random?
            refs.append("rows-random")
        if m.endswith("-global"):  # spread by score against spread evenly
            refs.append(m.removesuffix("-global"))
        for ref in refs:
            if (c := compare(score, m, ref, tasks, seeds)) is not None:
                paired.append(c)
    for c, p in zip(paired, holm([c["t_test_p"] for c in paired]), strict=True):
        c["holm_p"], c["significant"] = p, p < 0.05
    return {"table": table, "suite": suite, "paired": paired}


def chosen_curves(result: dict) -> list[dict]:
    """The sweep runs with a validation curve at their (task, method)'s chosen learning rate."""
    chosen = result["chosen_lr"]
    return [r for r in result["runs"] if r["phase"] == "sweep" and r.get("curve")
            and chosen.get(r["task"], {}).get(r["method"]) == r["lr"]]  # fmt: skip


def plot(result: dict, path: Path) -> None:
    """Validation curves of the sweep at each (task, method)'s chosen learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = chosen_curves(result)
    tasks = list(dict.fromkeys(r["task"] for r in curves))
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for r in (r for r in curves if r["task"] == t):
            steps, vals = zip(*r["curve"], strict=True)
            ax.plot(steps, vals, marker=".", label=f"{r['method']} ({r['lr']:g})")
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")  # per task: the chosen rates differ between tasks
    axes[0][0].set_ylabel("validation score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['mean']:.3f}" if len(r["values"]) < 2 else f"{r['mean']:.3f} ± {r['ci95']:.3f}"


def _grids(s: dict) -> str:
    rows = s.get("lrs_rows", s["lrs"])  # results written before rows had their own grid
    return f"LoRA/DoRA {s['lrs']}, rows {rows}, full {s['lrs_full']}"


def _length(s: dict) -> str:
    return f"{s['epochs']:g} epoch(s)" if s.get("epochs") else f"{s['steps']} steps"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render(result: dict) -> str:
    why = result.get("why", {})  # files written before data-file tasks have none: the built-in reasons
    s = result["settings"]
    summary = result["summary"]
    lines = [
        "# Quality suite: every method at its own best learning rate, several seeds, 95 % intervals",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['date']}  ",
        f"Model `{s['model']}`; {_length(s)} x batch {s['batch_size']} from the first "
        f"{s['train_examples']} training examples (max {s['max_length']} tokens); test on the first "
        f"{s['eval_examples']} test examples; seeds {s['seeds']}"
        + (
            f" (every seed on the split of seed {s['split_seed']}: the same training and test examples); "
            if s.get("split_seed") is not None
            else " (each seed its own split); "
        )
        + (
            f"learning rates swept on a validation split with seed {s['seeds'][0]}: {_grids(s)}. "
            if result["chosen_lr"]
            else f"learning rates not swept: the first of each grid ({_grids(s)}). "
        )
        + (f"Every run also sets {', '.join(f'`{x}`' for x in s['set'])}. " if s.get("set") else "")
        + "Scores on a 0-1 scale (accuracy; exact match / 100).",
        "",
        "## Tasks",
        "",
        "| task | majority class | why |",
        "|---|---:|---|",
        *[
            f"| {t} | {_fmt(result.get('majority', {}).get(t))} | {why.get(t) or TASKS.get(t, '')} |"
            for t in s["tasks"]
        ],
    ]
    if summary["table"]:
        methods = list(dict.fromkeys(r["method"] for r in summary["table"]))
        cell = {(r["task"], r["method"]): r for r in summary["table"]}
        lines += ["", "## Test scores (mean ± 95 % half-interval over seeds)", "",
                  "| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]  # fmt: skip
        for t in s["tasks"]:
            row = [_cell(cell.get((t, m))) for m in methods]
            lines.append(f"| {t} | " + " | ".join(row) + " |")
        if summary["suite"]:
            suite = {r["method"]: r for r in summary["suite"]}
            lines.append(
                "| **suite mean** | " + " | ".join(f"**{_cell(suite.get(m))}**" for m in methods) + " |"
            )
    if result["chosen_lr"]:
        methods = list(dict.fromkeys(m for per in result["chosen_lr"].values() for m in per))
        lines += ["", "## Learning rates chosen on the validation split", "",
                  "| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]  # fmt: skip
        edge = {tuple(x) for x in result.get("lr_at_edge", [])}
        for t, per in result["chosen_lr"].items():
            cells = [f"{per[m]:g}" + (" *" if (t, m) in edge else "") if m in per else "-" for m in methods]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        if edge:
            lines += ["", f"\\* at an end of the rates swept, after {s.get('extend_grid', 0)} extra round(s) "
                      "beyond the ends: the best rate may lie further out."]  # fmt: skip
        lend = s.get("lr_from") or {}
        if lend:
            lines += ["", "Not swept (`--lr-from`), each takes the rate chosen for another method on each task: "
                      + ", ".join(f"{m} from {src}" for m, src in lend.items()) + "."]  # fmt: skip
    if summary["paired"] and "per_task" in summary["paired"][0]:
        lines += ["", "## Row methods against LoRA at the same budget, full fine-tuning and random rows (the task as the unit)", "",
                  "Per task, the mean over seeds of the paired differences; across tasks, their mean with a 95 % "
                  "t-interval and a one-sample t-test; Holm's correction over every comparison in the table.", "",
                  "| method | against | tasks | mean difference | 95 % interval | t-test p | Holm p | tasks won / lost | significant (Holm) |",
                  "|---|---|---:|---:|---|---:|---:|---|---|"]  # fmt: skip
        for r in summary["paired"]:
            lines.append(
                f"| {r['method']} | {r['against']} | {r['tasks']} | {r['mean_diff']:+.3f} | "
                f"[{r['mean_diff'] - r['ci95']:+.3f}, {r['mean_diff'] + r['ci95']:+.3f}] | {r['t_test_p']:.3f} | "
                f"{r['holm_p']:.3f} | {r['wins']} / {r['losses']} | {'yes' if r['significant'] else 'no'} |"
            )
        tasks = s["tasks"]
        lines += ["", "### Per task: mean difference ± 95 % half-interval over seeds", "",
                  "| method | against | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]  # fmt: skip
        for r in summary["paired"]:
            at = {x["task"]: x for x in r["per_task"]}
            cells = [f"{at[t]['mean_diff']:+.3f} ± {at[t]['ci95']:.3f}" if t in at else "-" for t in tasks]
            lines.append(f"| {r['method']} | {r['against']} | " + " | ".join(cells) + " |")
    elif summary["paired"]:  # results written before the task was the unit: pairs pooled over tasks x seeds
        lines += ["", "## Row methods against LoRA at the same budget, full fine-tuning and random rows (paired over tasks x seeds)", "",
                  "| method | against | pairs | mean difference | 95 % interval | t-test p | Wilcoxon p | wins / losses | significant |",
                  "|---|---|---:|---:|---|---:|---:|---|---|"]  # fmt: skip
        for r in summary["paired"]:
            lines.append(
                f"| {r['method']} | {r['against']} | {r['pairs']} | {r['mean_diff']:+.3f} | "
                f"[{r['mean_diff'] - r['ci95']:+.3f}, {r['mean_diff'] + r['ci95']:+.3f}] | {r['t_test_p']:.3f} | "
                f"{r['wilcoxon_p']:.3f} | {r['wins']} / {r['losses']} | {'yes' if r['significant'] else 'no'} |"
            )
    curves = chosen_curves(result)
    if curves:
        steps = sorted({step for r in curves for step, _ in r["curve"]})
        lines += ["", f"## Validation curves at the chosen learning rates (seed {s['seeds'][0]})", "",
                  "| task | method (lr) | " + " | ".join(f"step {k}" for k in steps) + " |",
                  "|---|---|" + "---:|" * len(steps)]  # fmt: skip
        for r in curves:
            at = dict(r["curve"])
            lines.append(f"| {r['task']} | {r['method']} ({r['lr']:g}) | "
                         + " | ".join(_fmt(at.get(k)) for k in steps) + " |")  # fmt: skip
    if result.get("curves_png"):
        lines += ["", f"Plotted: `{result['curves_png']}`."]
    if result.get("partial"):
        lines += [
            "",
            f"**Partial**: stopped after {len(result['runs'])} runs; rerun with `--reuse` or `--recorded` this file to finish.",
        ]
    if old := [r for r in result["runs"] if r.get("recorded")]:
        dates = ", ".join(sorted({str(r["recorded"]) for r in old}))
        lines += ["", f"{len(old)} of the {len(result['runs'])} runs were taken from an earlier results file "
                      f"(`--recorded`), where the very same command had run (recorded {dates}); the others ran "
                      f"on {result['date']}."]  # fmt: skip
    if result.get("note"):
        lines += ["", result["note"]]
    lines += [
        "",
        "Every run's score, learning rate, seed and command are in the JSON beside this file (`runs`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--epochs", type=float, default=None,
        help="train each run for this many passes over its training examples (num_train_epochs) instead of --steps",
    )  # fmt: skip
    p.add_argument(
        "--split-seed", type=int, default=0,
        help="every run's train/test split (finetune's split_seed): each seed trains and tests on the same "
        "examples, so differences between methods are paired by example, not by resampled test sets",
    )  # fmt: skip
    p.add_argument(
        "--extend-grid", type=int, default=2,
        help="up to this many extra sweep rounds: a rate chosen at an end of its grid tries one step beyond",
    )  # fmt: skip
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning rates swept for LoRA and DoRA")
    p.add_argument("--lrs-rows", default="1e-4,3e-4,1e-3", help="learning rates swept for the row methods")
    p.add_argument("--lrs-full", default="1e-5,3e-5,1e-4", help="learning rates swept for full fine-tuning")
    p.add_argument(
        "--lr-from", default="",
        help="METHOD=SOURCE,...: METHOD is not swept and takes SOURCE's chosen rate on each task "
        "(e.g. dora=lora,rows-neft=rows-taylor); the markdown says which rates were borrowed",
    )  # fmt: skip
    p.add_argument("--eval-steps", type=int, default=20, help="validation curve points in the sweep")
    p.add_argument("--phases", default="sweep,test", help="sweep, test or both; test alone uses the first lr")
    p.add_argument(
        "--jobs", type=int, default=1,
        help="runs at once, each with CPUs/jobs threads (scores do not depend on it; train_seconds do)",
    )  # fmt: skip
    p.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep each run's full model and checkpoints (removed by default: a full run leaves ~2 GB)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a finetune setting for every run (repeatable), e.g. --set lr_scheduler=cosine --set warmup_steps=6",
    )  # fmt: skip
    p.add_argument(
        "--recorded", action="append", type=Path, default=[], metavar="JSON",
        help="an earlier results file (repeatable): a run it records with the very same command (settings, "
        "seed, learning rate, run folder) is taken from it instead of run again",
    )  # fmt: skip
    p.add_argument("--note", default="")
    p.add_argument(
        "--name", default="quality_suite", help="results file name (<name>.json, .md, _curves.png)"
    )
    add_run_args(p, "runs/bench-quality-suite", RESULTS, "quality_suite")
    p.set_defaults(train_examples=800, eval_examples=200)
    a = p.parse_args()
    if bad := [x for x in a.set if "=" not in x]:
        sys.exit(f"--set takes KEY=VALUE, got {bad}")
    if a.render:
        return render_only(a.out, a.name, render)
    tasks, methods = a.tasks.split(","), a.methods.split(",")
    seeds = [int(x) for x in a.seeds.split(",")]
    # a task is a built-in one or a data file `neurontune finetune task=FILE` reads (tasks kept apart)
    unknown = [t for t in tasks if t not in TASKS and not Path(t).exists()]
    unknown += [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown tasks or methods: {unknown} (tasks: {', '.join(TASKS)} or a data file)")
    phases = a.phases.split(",")
    a.recorded = recorded(a.recorded)
    lend = borrowed(a.lr_from, methods)
    runs: list[dict] = []
    splits = seeds if a.split_seed is None else [a.split_seed]
    info = {t: task_info(t, splits, a.eval_examples) for t in tasks}  # loads each task once

    def save(partial: bool) -> None:
        result = _result(a, runs, tasks, methods, seeds, info, lend, partial)
        if not partial:
            png = a.out / f"{a.name}_curves.png"
            plot(result, png)
            result["curves_png"] = png.name if png.is_file() else None
        write_results(a.out, a.name, result, render, echo=not partial)

    def run_all(jobs: list[tuple]) -> None:
        """Every job, ``a.jobs`` at a time; the results kept in the jobs' order."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        done: dict[int, dict] = {}
        before = list(runs)
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(run, a, *job): i for i, job in enumerate(jobs)}
            for f in as_completed(futures):
                try:
                    done[futures[f]] = f.result()
                except BaseException:  # a failed run: no new ones; the finished ones stay saved
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                runs[:] = before + [done[i] for i in sorted(done)]
                save(partial=True)

    if "sweep" in phases:
        run_all([("sweep", t, m, seeds[0], lr) for t in tasks for m in methods if m not in lend
                 for lr in lrs_for(a, m)])  # fmt: skip
        for _ in range(a.extend_grid):  # a rate chosen at an end of the grid: one more step beyond it
            more = [
                ("sweep", t, m, seeds[0], x)
                for t, m, x in beyond_edges([r for r in runs if r["phase"] == "sweep"])
            ]
            if not more:
                break
            run_all(more)
    chosen = choose([r for r in runs if r["phase"] == "sweep"])

    def lr(t: str, m: str) -> float | None:
        return chosen.get(t, {}).get(lend.get(m, m)) or (lrs_for(a, m) or [None])[0]

    if "test" in phases:
        # every task and method of one seed before the next: a stopped run stays paired
        run_all([("test", t, m, s, lr(t, m)) for s in seeds for t in tasks for m in methods])
    save(partial=False)


def _result(a: argparse.Namespace, runs: list[dict], tasks: list[str], methods: list[str], seeds: list[int],
            info: dict[str, tuple[float | None, str]], lend: dict[str, str], partial: bool) -> dict:  # fmt: skip
    import time

    test = [r for r in runs if r["phase"] == "test"]
    return {
        "command": command_line(__file__),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "model": a.model,
            "tasks": tasks,
            "methods": methods,
            "seeds": seeds,
            "steps": None if a.epochs else a.steps,
            "epochs": a.epochs,
            "split_seed": a.split_seed,
            "extend_grid": a.extend_grid,
            "batch_size": a.batch_size,
            "train_examples": a.train_examples,
            "eval_examples": a.eval_examples,
            "max_length": a.max_length,
            "lrs": a.lrs,
            "lrs_rows": a.lrs_rows,
            "lrs_full": a.lrs_full,
            "eval_steps": a.eval_steps,
            "lr_from": lend,
            "set": a.set,
            "jobs": a.jobs,
        },
        "majority": {t: rate for t, (rate, _) in info.items()},
        "why": {t: why for t, (_, why) in info.items()},
        "chosen_lr": choose([r for r in runs if r["phase"] == "sweep"]),
        "lr_at_edge": [list(x) for x in at_edge([r for r in runs if r["phase"] == "sweep"])],
        "summary": summarize(test, tasks, methods, seeds),
        "runs": runs,
        "partial": partial,
        "note": a.note,
    }


if __name__ == "__main__":
    main()
