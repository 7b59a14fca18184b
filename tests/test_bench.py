"""The helpers every benchmark shares: the command it records and how it writes its results."""

import json
import shlex
import sys
from pathlib import Path

import pytest

from neurontune.bench import command_line, write_results


def test_command_line_can_be_run_again(monkeypatch):
    argv = ["benchmarks/quality_suite.py", "--note", "Reduced CPU run (2 cores): 6 tasks", "--lrs", "1e-3"]
    monkeypatch.setattr(sys, "argv", argv)
    line = command_line("benchmarks/quality_suite.py")
    assert shlex.split(line) == ["python", *argv]


def test_write_results_keeps_the_old_files_when_rendering_fails(tmp_path):
    write_results(tmp_path, "r", {"x": 1}, lambda r: f"x = {r['x']}\n", echo=False)
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1}

    def broken(result):
        raise KeyError("y")

    with pytest.raises(KeyError):
        write_results(tmp_path, "r", {"x": 2}, broken, echo=False)
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1}
    assert (tmp_path / "r.md").read_text() == "x = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


@pytest.mark.slow  # ~3 min; in .ci/run
def test_gates_benchmark_runs_the_teacher_recipe_end_to_end(tmp_path):
    """benchmarks/gates.py on the tiny model: per task a teacher, the unpruned reference with every step
    of the pipeline, and a gates run per target gating the teacher (its news articles distilled from the
    base model: --general-teacher base; the layers' hidden states distilled too: --distill-hidden; the
    recovery on a schedule of its own, training the export's rows: --recover-params rows); JSON, markdown,
    summary and curve."""
    import subprocess

    root = Path(__file__).parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "gates.py"), "--model", "tiny-llama", "--gate-steps", "4",
           "--recover-steps", "2", "--teacher-steps", "2", "--seeds", "0", "--eval-examples", "4",
           "--forgetting-examples", "2", "--speed-repeats", "1", "--distill-general", "2", "--train-examples", "16",
           "--sparsities", "0.2,0.4", "--gen-sparsities", "", "--mc-sparsities", "0.3", "--general-teacher", "base",
           "--distill-hidden", "0.5", "--recover-lr-scheduler", "constant_with_warmup", "--recover-warmup-steps", "1",
           "--recover-params", "rows", "--distill-answer", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gates.json").read_text())
    names = [(m["task"], m["name"]) for m in result["runs"]]
    assert names == [
        ("rotten_tomatoes", "teacher (rows)"), ("rotten_tomatoes", "rows (unpruned)"),
        ("rotten_tomatoes", "gates 20% + distill"), ("rotten_tomatoes", "gates 40% + distill"),
        ("hyperbaton", "teacher (rows)"), ("hyperbaton", "rows (unpruned)"), ("hyperbaton", "gates 30% + distill"),
    ]  # fmt: skip
    by = {(m["task"], m["name"]): m for m in result["runs"]}
    assert by["rotten_tomatoes", "rows (unpruned)"]["steps"] == 2 + 4 + 2  # every step of the gates pipeline
    gated = by["rotten_tomatoes", "gates 40% + distill"]
    teacher = tmp_path / "runs" / "teacher" / "rotten_tomatoes" / "seed0" / "teacher" / "merged"
    assert gated["model"] == str(teacher)  # the tuned dense model is the one gated
    assert gated["gates"]["removed_fraction_of_prunable"] >= 0.4
    cfg = json.loads(
        (
            tmp_path / "runs" / "teacher" / "rotten_tomatoes" / "seed0" / "gates-0.4" / "config.json"
        ).read_text()
    )
    assert (
        cfg["distill_general_teacher"] == "tiny-llama"
    )  # --general-teacher base: the model before the teacher
    assert cfg["distill_hidden"] == 0.5 and cfg["recover"] == "distill" and cfg["gate_distill"]
    assert cfg["recover_params"] == "rows" and cfg["distill_answer"] == 2.0
    assert (cfg["recover_lr_scheduler"], cfg["recover_warmup_steps"], cfg["lr_scheduler"]) == (
        "constant_with_warmup",
        1,
        "constant",
    )  # the recovery's own schedule, the gate phase's unchanged
    summary = json.loads((tmp_path / "out" / "gates_summary.json").read_text())
    assert set(summary) == {"hyperbaton"} and summary["hyperbaton"]["removed_fraction"] >= 0.3
    assert (tmp_path / "out" / "gates_curve.png").stat().st_size > 1000
    # --render rebuilds the markdown and the curve from the JSON alone
    md_before = (tmp_path / "out" / "gates.md").read_text()
    for f in ("gates.md", "gates_curve.png"):
        (tmp_path / "out" / f).unlink()
    res = subprocess.run(
        [*cmd[:2], "--render", "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "gates.md").read_text() == md_before
    assert (tmp_path / "out" / "gates_curve.png").stat().st_size > 1000
    md = (tmp_path / "out" / "gates.md").read_text()
    assert "Teacher: rows" in md and "the news distilled from the base model before task tuning" in md
    assert md.count("0.5 x the layers' hidden-state error") == 2  # the gate phase and the recovery
    assert md.count(" + 2 x the KL at the task's answers, per example") == 2
    assert "The recovery's learning rate: constant_with_warmup schedule with 1 warm-up steps." in md
    assert "Distillation: 2 steps, rows of the export (magnitude, LoRA r=8 budget), lr 5e-05" in md


def test_gates_benchmark_refuses_a_warm_up_that_a_constant_schedule_would_ignore(tmp_path):
    """Before any run (a teacher takes minutes): one argparse error naming the benchmark's own flags."""
    import subprocess

    gates = str(Path(__file__).parents[1] / "benchmarks" / "gates.py")
    for flags, said in (
        (["--warmup-steps", "3"], "--warmup-steps=3 does nothing with --lr-scheduler=constant"),
        (["--lr-scheduler", "cosine", "--warmup-steps", "3", "--recover-lr-scheduler", "constant"],
         "--warmup-steps=3 does nothing with --recover-lr-scheduler=constant"),
        (["--recover-warmup-steps", "2"], "--recover-warmup-steps=2 does nothing with --lr-scheduler=constant"),
    ):  # fmt: skip
        res = subprocess.run([sys.executable, gates, *flags, "--runs", str(tmp_path / "r"), "--out", str(tmp_path)],
                             capture_output=True, text=True, check=False)  # fmt: skip
        assert res.returncode == 2 and said in res.stderr, res.stderr
        assert not (tmp_path / "r").exists()


def _gates_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gates_bench", Path(__file__).parents[1] / "benchmarks" / "gates.py"
    )
    gates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gates)
    return gates


def test_gates_benchmark_shows_the_recovery_along_its_steps():
    """A run with the recovery's evaluations (recover/eval_log.json) gets a row of the recovery table in
    the markdown: each step's score (with the first label's share of the answers, where counted) and news
    perplexity; without any, the committed results render
    without the table and are otherwise the same."""
    gates = _gates_benchmark()
    result = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "gates.json").read_text())
    for m in result["runs"]:
        m.pop("recover_eval_curve", None)
    plain = gates.render(result)
    assert "The pruned model along the recovery" not in plain
    run = next(m for m in result["runs"] if m["method"] == "gates")
    run["recover_eval_curve"] = [{"step": 0, "accuracy": 0.79, "forgetting_ppl": 99.9},
                                 {"step": 25, "accuracy": 0.8125, "forgetting_ppl": 91.2,
                                  "label_shares": {"negative": 0.46, "positive": 0.54}}]  # fmt: skip
    md = gates.render(result)
    assert (
        f"| rotten_tomatoes | {run['seed']} | {run['name']} | 0: 0.790, 100; 25: 0.812 [negative 46%], 91 |"
        in md.splitlines()
    )
    assert md.replace(md[md.index("\nThe pruned model along") : md.index("\nMeans over seeds")], "") == plain


def test_gates_benchmark_runs_jobs_at_once_each_after_the_teacher_it_needs(monkeypatch, tmp_path):
    """--jobs 2: two runs at a time with half the CPUs each; the teachers start first, every other run of a
    seed only once its teacher has finished, the 30 % runs before the rest of the curve; the results come
    back in the plan's order, and a reference the teacher's early stop stands in for never runs."""
    import os
    import threading
    import time

    gates = _gates_benchmark()
    lock, events, running, most = threading.Lock(), [], set(), [0]

    def fake_run(overrides, out, reuse=False, threads=None):
        run = (out.parent.name, out.name)  # (seedN, folder)
        with lock:
            events.append(("start", *run))
            running.add(run)
            most[0] = max(most[0], len(running))
        time.sleep(0.2 if run == ("seed1", "teacher") else 0.05)  # seed 1's teacher is slow
        if out.name.startswith("gates"):  # the recovery's evaluations (eval_steps)
            (out / "recover").mkdir(parents=True)
            (out / "recover" / "eval_log.json").write_text(
                json.dumps({"points": [{"step": 0, "accuracy": 0.4}]})
            )
        with lock:
            events.append(("end", *run))
            running.discard(run)
        return {"method": "gates" if out.name.startswith("gates") else "rows", "after": {"accuracy": 0.5},
                "early_stopping": {"stopped": run == ("seed0", "teacher")}, "threads": threads,
                "wall_seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(gates, "finetune_run", fake_run)
    args = gates.parse_args(["--seeds", "0,1", "--curve-seeds", "0", "--sparsities", "0.2,0.3,0.4",
                             "--gen-sparsities", "", "--mc-sparsities", "", "--jobs", "2",
                             "--runs", str(tmp_path)])  # fmt: skip
    runs = gates.training_runs(args)
    assert [(m["seed"], m["name"]) for m in runs] == [
        (0, "teacher (rows)"), (0, "rows (unpruned)"), (0, "gates 20% + distill"), (0, "gates 30% + distill"),
        (0, "gates 40% + distill"), (1, "teacher (rows)"), (1, "rows (unpruned)"), (1, "gates 30% + distill"),
    ]  # fmt: skip
    assert runs[1]["same_as"] == "teacher (rows)" and ("start", "seed0", "rows") not in events
    assert [m.get("recover_eval_curve") for m in runs[2:5]] == [[{"step": 0, "accuracy": 0.4}]] * 3
    assert most[0] == 2 and {m["threads"] for m in runs if "same_as" not in m} == {
        max(1, os.cpu_count() // 2)
    }
    starts = [e[1:] for e in events if e[0] == "start"]
    assert set(starts[:2]) == {("seed0", "teacher"), ("seed1", "teacher")}
    assert starts.index(("seed0", "gates-0.3")) < starts.index(("seed0", "gates-0.2"))
    for seed in ("seed0", "seed1"):
        teacher_done = events.index(("end", seed, "teacher"))
        assert all(
            events.index(("start", s, f)) > teacher_done for s, f in starts if s == seed and f != "teacher"
        )
    # seed 0's runs went ahead while seed 1's teacher was still training
    assert events.index(("start", "seed0", "gates-0.3")) < events.index(("end", "seed1", "teacher"))
    with pytest.raises(SystemExit):
        gates.parse_args(["--jobs", "0"])


def test_gates_benchmark_passes_the_gate_rate_and_the_moving_average_to_the_gates_runs_alone():
    """--gate-lr and --ema-decay reach the gates runs' command (not the teacher's); their defaults leave the
    command text as it was (--reuse finds the runs made before the options existed)."""
    gates = _gates_benchmark()
    default = gates.gates(gates.parse_args([]), 0.3, Path("teacher"))
    assert "gate_lr=0.05" in default and not any(a.startswith("ema_decay=") for a in default)
    args = gates.parse_args(["--gate-lr", "0.02", "--ema-decay", "0.9"])
    run = gates.gates(args, 0.3, Path("teacher"))
    assert "gate_lr=0.02" in run and "ema_decay=0.9" in run
    assert not any(a.startswith(("ema_decay=", "gate_lr=")) for a in gates.rows(args, 10))
    text = gates.recipe_text(vars(args) | {"recipe": "teacher"})
    assert "gate lr 0.02" in text and "ema_decay=0.9" in text


@pytest.mark.slow  # ~1 min; in .ci/run
def test_gates_benchmark_trains_the_weights_with_the_gates_and_may_skip_the_recovery(tmp_path):
    """--gate-weights-lr gates with gate_train_weights instead of low-rank terms; --recover-steps 0 makes
    the export the result (recover=none), and the reference counts the steps that remain; --curve-seeds
    runs every target on some seeds only; --lr-scheduler reaches the gates runs alone, and with
    --gate-lr-scheduler constant their low-rank terms or weights alone, the gates keeping their rate."""
    import subprocess

    root = Path(__file__).parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "gates.py"), "--model", "tiny-llama", "--gate-steps", "4",
           "--recover-steps", "0", "--teacher-steps", "2", "--gate-weights-lr", "1e-4", "--seeds", "0,1",
           "--lr-scheduler", "cosine", "--warmup-steps", "1", "--gate-lr-scheduler", "constant",
           "--curve-seeds", "0", "--eval-examples", "4", "--forgetting-examples", "2", "--speed-repeats", "1",
           "--distill-general", "2", "--train-examples", "16", "--sparsities", "0.2,0.3", "--gen-sparsities", "",
           "--mc-sparsities", "", "--jobs", "2",
           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gates.json").read_text())
    # --curve-seeds 0 (and --jobs 2: the results in the plan's order): seed 1 runs only the 30 % target
    assert [(m["seed"], m["name"]) for m in result["runs"]] == [
        (0, "teacher (rows)"), (0, "rows (unpruned)"), (0, "gates 20%"), (0, "gates 30%"),
        (1, "teacher (rows)"), (1, "rows (unpruned)"), (1, "gates 30%"),
    ]  # fmt: skip
    assert json.loads((tmp_path / "out" / "gates_summary.json").read_text())["rotten_tomatoes"]["seeds"] == [
        0,
        1,
    ]
    by = {m["name"]: m for m in result["runs"] if m["seed"] == 0}
    assert by["rows (unpruned)"]["steps"] == 2 + 4
    run = tmp_path / "runs" / "teacher" / "rotten_tomatoes" / "seed0" / "gates-0.3"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["gate_train_weights"] and cfg["gate_low_rank"] == 0 and cfg["lr"] == 1e-4
    assert cfg["recover"] == "none" and not (run / "recovered").exists() and (run / "pruned").is_dir()
    assert cfg["lr_scheduler"] == "cosine" and cfg["warmup_steps"] == 1  # the gates runs only
    assert cfg["gate_lr_scheduler"] == "constant"
    teacher = json.loads((run.parent / "teacher" / "config.json").read_text())
    assert teacher["lr_scheduler"] == "constant" and teacher["warmup_steps"] == 0
    assert teacher["gate_lr_scheduler"] is None
    assert by["gates 30%"]["after"] == by["gates 30%"]["gates"]["exported"]  # the export is the result
    md = (tmp_path / "out" / "gates.md").read_text()
    assert "trained with the gates at lr 0.0001" in md and "No recovery: the export is the result." in md
    assert "cosine schedule with warmup_steps=1 over the gate phase's steps" in md
    assert "the gates keep their rate, only the weights follow it." in md


def test_a_run_stands_in_for_a_new_one_only_if_it_ran_todays_library_code(tmp_path, monkeypatch):
    """same_source: a commit whose src/ equals the working tree's; not a dirty one, not another src/,
    not one that is not on record; a change outside src/ (a benchmark, a result) does not count."""
    import subprocess

    from neurontune import bench

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.py").write_text("A = 1\n")
    git("add", ".")
    git("commit", "-qm", "one")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    bench._src_unchanged_since.cache_clear()
    first = bench.run_source()
    assert first and not first.endswith("-dirty") and bench.same_source(first)
    (tmp_path / "notes.md").write_text("a result\n")
    git("add", ".")
    git("commit", "-qm", "outside src")
    bench._src_unchanged_since.cache_clear()
    assert bench.same_source(first)  # only the library's code decides
    (tmp_path / "src" / "lib.py").write_text("A = 2\n")
    bench._src_unchanged_since.cache_clear()
    assert bench.run_source().endswith("-dirty")
    assert not bench.same_source(first) and not bench.same_source(bench.run_source())
    git("commit", "-qam", "two")
    bench._src_unchanged_since.cache_clear()
    assert not bench.same_source(first) and bench.same_source(bench.run_source())
    assert not bench.same_source(None) and not bench.same_source("")
    bench._src_unchanged_since.cache_clear()
