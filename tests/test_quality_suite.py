"""The quality suite's learning-rate choice and statistics (benchmarks/quality_suite.py) on made-up scores."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "quality_suite", Path(__file__).parents[1] / "benchmarks" / "quality_suite.py"
)
qs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qs)


def test_choose_takes_the_best_validation_score_and_the_smaller_lr_on_ties():
    sweep = [
        {"task": "t", "method": "lora", "lr": 1e-3, "score": 0.7},
        {"task": "t", "method": "lora", "lr": 3e-4, "score": 0.7},
        {"task": "t", "method": "lora", "lr": 3e-3, "score": 0.6},
        {"task": "t", "method": "full", "lr": 1e-4, "score": 0.9},
        {"task": "t", "method": "full", "lr": 1e-5, "score": 0.5},
    ]
    assert qs.choose(sweep) == {"t": {"lora": 3e-4, "full": 1e-4}}


def test_summary_intervals_and_paired_significance():
    tasks, seeds = ["a", "b"], [0, 1, 2]
    lora = {("a", 0): 0.50, ("a", 1): 0.52, ("a", 2): 0.48, ("b", 0): 0.30, ("b", 1): 0.33, ("b", 2): 0.29}
    test = [{"task": t, "method": "lora", "seed": s, "score": v} for (t, s), v in lora.items()]
    # rows: 0.1 better on every pair (a clear, significant win); random: the same as LoRA give or take
    test += [{"task": t, "method": "rows-taylor", "seed": s, "score": v + 0.1} for (t, s), v in lora.items()]
    noise = [0.02, -0.03, 0.01, -0.02, 0.03, -0.01]
    test += [{"task": t, "method": "rows-random", "seed": s, "score": v + e}
             for ((t, s), v), e in zip(lora.items(), noise, strict=True)]  # fmt: skip
    out = qs.summarize(test, tasks, ["lora", "rows-taylor", "rows-random"], seeds)
    a_lora = next(r for r in out["table"] if r["task"] == "a" and r["method"] == "lora")
    assert a_lora["mean"] == pytest.approx(0.5)
    assert a_lora["ci95"] == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)  # t(0.975, 2) x sd / sqrt(n)
    suite = {r["method"]: r for r in out["suite"]}
    assert suite["rows-taylor"]["mean"] == pytest.approx(suite["lora"]["mean"] + 0.1)
    paired = {(r["method"], r["against"]): r for r in out["paired"]}
    win = paired[("rows-taylor", "lora")]
    assert win["mean_diff"] == pytest.approx(0.1) and win["wins"] == 6 and win["significant"]
    tie = paired[("rows-random", "lora")]
    assert (
        tie["mean_diff"] == pytest.approx(0.0, abs=1e-9) and not tie["significant"] and tie["t_test_p"] > 0.5
    )
    # a scorer against chance
    assert paired[("rows-taylor", "rows-random")]["mean_diff"] == pytest.approx(0.1)
    assert ("rows-taylor", "full") not in paired  # no full runs: no comparison


def test_each_family_sweeps_its_own_grid():
    a = qs.argparse.Namespace(lrs="3e-4,1e-3", lrs_rows="1e-4", lrs_full="3e-5,1e-4")
    assert qs.lrs_for(a, "none") == []
    assert qs.lrs_for(a, "lora") == qs.lrs_for(a, "dora") == [3e-4, 1e-3]
    assert qs.lrs_for(a, "rows-taylor") == qs.lrs_for(a, "rows-random") == [1e-4]
    assert qs.lrs_for(a, "full") == [3e-5, 1e-4]


def test_borrowed_rates_need_a_source_that_sweeps_itself():
    methods = ["none", "lora", "dora", "rows-taylor", "rows-neft"]
    assert qs.borrowed("dora=lora,rows-neft=rows-taylor", methods) == {
        "dora": "lora",
        "rows-neft": "rows-taylor",
    }
    assert qs.borrowed("", methods) == {}
    for bad in ("dora=full", "lora-r32=lora", "dora=lora,lora=rows-taylor", "none=lora", "dora=dora"):
        with pytest.raises(SystemExit, match="--lr-from"):
            qs.borrowed(bad, methods)


def test_a_larger_budget_is_paired_with_lora_at_that_rank():
    test = [{"task": "a", "method": m, "seed": s, "score": v + s / (50 if m.startswith("rows") else 100)}
            for m, v in (("lora", 0.5), ("lora-r32", 0.6), ("rows-taylor-r32", 0.7)) for s in range(3)]  # fmt: skip
    out = qs.summarize(test, ["a"], ["lora", "lora-r32", "rows-taylor-r32"], [0, 1, 2])
    [r] = out["paired"]
    assert (r["method"], r["against"], round(r["mean_diff"], 6)) == ("rows-taylor-r32", "lora-r32", 0.11)


def test_a_global_budget_is_paired_with_the_same_scorer_spread_evenly():
    methods = ["lora", "rows-taylor", "rows-taylor-global"]
    test = [{"task": "a", "method": m, "seed": s, "score": 0.5 + i / 10 + s / 100}
            for i, m in enumerate(methods) for s in range(3)]  # fmt: skip
    out = qs.summarize(test, ["a"], methods, [0, 1, 2])
    pairs = {(r["method"], r["against"]): round(r["mean_diff"], 6) for r in out["paired"]}
    assert pairs == {("rows-taylor", "lora"): 0.1, ("rows-taylor-global", "lora"): 0.2,
                     ("rows-taylor-global", "rows-taylor"): 0.1}  # fmt: skip


def test_the_markdown_tabulates_the_validation_curves_at_the_chosen_rates_only():
    runs = [
        {"phase": "sweep", "task": "hyperbaton", "method": "lora", "lr": 1e-3, "curve": [(20, 0.467), (40, 0.587)]},
        {"phase": "sweep", "task": "hyperbaton", "method": "lora", "lr": 3e-3, "curve": [(20, 0.467), (40, 0.493)]},
        {"phase": "sweep", "task": "hyperbaton", "method": "full", "lr": 3e-5, "curve": [(20, 0.467), (40, 0.767)]},
    ]  # fmt: skip
    settings = {"model": "m", "steps": 40, "batch_size": 8, "train_examples": 480, "max_length": 128,
                "eval_examples": 150, "seeds": [0], "tasks": ["hyperbaton"], "lrs": [1e-3, 3e-3],
                "lrs_rows": [3e-4], "lrs_full": [3e-5]}  # fmt: skip
    result = {"command": "c", "machine": "x", "date": "d", "settings": settings, "majority": {},
              "chosen_lr": {"hyperbaton": {"lora": 1e-3, "full": 3e-5}}, "runs": runs,
              "summary": {"table": [], "suite": [], "paired": []}}  # fmt: skip
    md = qs.render(result)
    assert "| task | method (lr) | step 20 | step 40 |" in md
    assert "| hyperbaton | lora (0.001) | 0.467 | 0.587 |" in md
    assert "| hyperbaton | full (3e-05) | 0.467 | 0.767 |" in md
    assert "lora (0.003)" not in md  # a rate not chosen is in the JSON, not the table


@pytest.mark.slow  # ~2.5 min; .ci/run runs it after the default run
def test_the_suite_end_to_end_two_runs_at_once(tmp_path):
    """Sweep then test with --jobs 2: the test runs use the swept rates (DoRA LoRA's, not swept), in
    seed-major order, every run's folder and the results files are written."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(qs.__file__)), "--model", "tiny-llama", "--tasks", "hyperbaton",
           "--methods", "none,lora,dora", "--lr-from", "dora=lora", "--lrs", "1e-3,3e-2", "--seeds", "0,1", "--steps", "2",
           "--train-examples", "24", "--eval-examples", "4", "--eval-steps", "1", "--jobs", "2",
           "--set", "lr_scheduler=cosine", "--set", "warmup_steps=1",
           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "quality_suite.json").read_text())
    sweep = [r for r in result["runs"] if r["phase"] == "sweep"]
    assert [(r["method"], r["lr"]) for r in sweep] == [("lora", 1e-3), ("lora", 3e-2)]
    assert all(len(r["curve"]) == 2 for r in sweep)  # eval_steps=1 over 2 steps
    lr = result["chosen_lr"]["hyperbaton"]["lora"]
    assert lr == max(sweep, key=lambda r: (r["score"], -r["lr"]))["lr"]
    test = [r for r in result["runs"] if r["phase"] == "test"]
    assert [(r["seed"], r["method"], r["lr"]) for r in test] == [
        (0, "none", None), (0, "lora", lr), (0, "dora", lr), (1, "none", None), (1, "lora", lr), (1, "dora", lr)
    ]  # fmt: skip
    assert result["settings"]["lr_from"] == {"dora": "lora"}
    assert "dora from lora" in (tmp_path / "out" / "quality_suite.md").read_text()
    assert not result["partial"] and result["settings"]["jobs"] == 2
    assert (tmp_path / "out" / "quality_suite.md").is_file() and (
        tmp_path / "out" / "quality_suite_curves.png"
    ).is_file()
    run = tmp_path / "runs" / "test" / "hyperbaton" / f"lora-lr{lr:g}-s1"
    assert (run / "metrics.json").is_file() and (run / "adapter").is_dir()
    config = json.loads((run / "config.json").read_text())  # --set reaches every run
    assert (config["lr_scheduler"], config["warmup_steps"]) == ("cosine", 1)
    assert (
        "Every run also sets `lr_scheduler=cosine`, `warmup_steps=1`"
        in (tmp_path / "out" / "quality_suite.md").read_text()
    )
    assert not (run / "checkpoints").exists()  # weights a score does not need are not kept


def test_a_failed_run_stops_the_suite_with_its_error(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(qs.__file__)), "--model", "no-such-model", "--tasks", "hyperbaton",
           "--methods", "none", "--phases", "test", "--seeds", "0,1,2", "--jobs", "2",
           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode != 0 and res.stderr.count("run failed") == 1 and "no-such-model" in res.stderr
    assert not (tmp_path / "out" / "quality_suite.json").exists()  # nothing finished, nothing claimed


@pytest.mark.slow  # ~2.5 min; in .ci/run
def test_recorded_runs_are_taken_from_an_earlier_results_file_by_their_command(tmp_path):
    """--recorded: a run an earlier results file holds with the very same command is not run again
    (its folder stays absent), a run with another command is; the markdown says which are old."""
    import json
    import shutil
    import subprocess
    import sys

    def suite(methods: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(Path(qs.__file__)), "--model", "tiny-llama", "--tasks", "hyperbaton",
               "--methods", methods, "--phases", "test", "--seeds", "0", "--steps", "1", "--lrs", "1e-3",
               "--lrs-rows", "1e-3", "--train-examples", "16", "--eval-examples", "4",
               "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    assert suite("none,lora").returncode == 0
    first = tmp_path / "earlier.json"
    shutil.copy(tmp_path / "out" / "quality_suite.json", first)
    shutil.rmtree(tmp_path / "runs")
    earlier = json.loads(first.read_text())
    res = suite("none,lora,rows-random", "--recorded", str(first), "--set", "warmup_steps=0")
    assert res.returncode == 0, res.stderr[-2000:]
    # --set changes every command: nothing matches, everything runs
    assert sorted(p.name for p in (tmp_path / "runs" / "test" / "hyperbaton").iterdir()) == [
        "lora-lr0.001-s0", "none-s0", "rows-random-lr0.001-s0"
    ]  # fmt: skip
    shutil.rmtree(tmp_path / "runs")
    res = suite("none,lora,rows-random", "--recorded", str(first))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p.name for p in (tmp_path / "runs" / "test" / "hyperbaton").iterdir()] == [
        "rows-random-lr0.001-s0"
    ]
    result = json.loads((tmp_path / "out" / "quality_suite.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["none", "lora", "rows-random"]
    for old, new in zip(earlier["runs"], result["runs"][:2], strict=True):
        assert new == {**old, "recorded": earlier["date"]}
    assert "recorded" not in result["runs"][2]
    md = (tmp_path / "out" / "quality_suite.md").read_text()
    assert "2 of the 3 runs were taken from an earlier results file (`--recorded`)" in md
    (tmp_path / "bad.json").write_text("{not json")
    res = suite("none", "--recorded", str(tmp_path / "bad.json"))
    assert res.returncode != 0 and "--recorded" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "bad.json").write_text('{"runs": [{"score": 1.0}]}')  # JSON, but no commands to match
    res = suite("none", "--recorded", str(tmp_path / "bad.json"))
    assert res.returncode != 0 and "not a results file" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow  # ~50 s of tiny-model runs; a benchmark script's option, not the library
def test_a_data_file_is_a_task_of_the_suite(tmp_path):
    """Tasks kept apart come as data files (any file `neurontune finetune task=FILE` reads): each runs
    in its own folder, and the markdown says what the file holds; a bad file gets one clear error."""
    import json
    import subprocess
    import sys

    colours = ["red", "green", "blue"]
    rows = [
        {"prompt": f"Item {i}: which colour?", "choices": colours, "answer": colours[i % 3]}
        for i in range(40)
    ]
    data = tmp_path / "held out" / "colours.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def suite(task: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(Path(qs.__file__)), "--model", "tiny-llama", "--tasks", f"hyperbaton,{task}",
               "--methods", "none,rows-taylor", "--phases", "test", "--seeds", "0", "--steps", "1",
               "--lrs-rows", "1e-3", "--train-examples", "16", "--eval-examples", "4",
               "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    res = suite(str(data))
    assert res.returncode == 0, res.stderr[-2000:]
    folders = sorted(p.name for p in (tmp_path / "runs" / "test").iterdir())
    assert folders[1] == "hyperbaton" and folders[0].startswith("colours-")
    assert sorted(p.name for p in (tmp_path / "runs" / "test" / folders[0]).iterdir()) == [
        "none-s0", "rows-taylor-lr0.001-s0"
    ]  # fmt: skip
    result = json.loads((tmp_path / "out" / "quality_suite.json").read_text())
    assert {r["task"] for r in result["runs"]} == {"hyperbaton", str(data)}
    assert result["majority"][str(data)] is not None  # the file's answers are labels
    md = (tmp_path / "out" / "quality_suite.md").read_text()
    assert f"| {data} |" in md and "a data file: multiple choice, 36 training and 4 test examples" in md
    res = suite(str(tmp_path / "missing.jsonl"))
    assert res.returncode != 0 and "unknown tasks" in res.stderr and "Traceback" not in res.stderr
    data.write_text('{"question": "no known fields"}\n')
    res = suite(str(data))
    assert res.returncode != 0 and f"--tasks {data}: " in res.stderr and "unrecognised record" in res.stderr
    assert "Traceback" not in res.stderr
