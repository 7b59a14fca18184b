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


def test_summary_intervals_and_comparisons_with_the_task_as_the_unit():
    tasks, seeds = ["a", "b", "c"], [0, 1, 2]
    lora = {(t, s): base + e for t, base in zip(tasks, (0.5, 0.3, 0.7), strict=True)
            for s, e in zip(seeds, (0.0, 0.02, -0.02), strict=True)}  # fmt: skip
    test = [{"task": t, "method": "lora", "seed": s, "score": v} for (t, s), v in lora.items()]
    # taylor: better on every task by 0.08-0.12 (a clear win); random: the same as LoRA give or take
    gain = {"a": 0.1, "b": 0.08, "c": 0.12}
    test += [
        {"task": t, "method": "rows-taylor", "seed": s, "score": v + gain[t]} for (t, s), v in lora.items()
    ]
    noise = [0.02, -0.01, 0.02, -0.02, 0.0, -0.01, 0.01, 0.0, -0.01]  # task means +0.01, -0.01, 0
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
    # the unit is the task: 3 per-task means (0.1, 0.08, 0.12), df 2, not 9 pooled pairs
    assert win["tasks"] == 3 and win["mean_diff"] == pytest.approx(0.1) and win["wins"] == 3
    assert win["ci95"] == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)
    assert [x["mean_diff"] for x in win["per_task"]] == pytest.approx([0.1, 0.08, 0.12])
    assert win["per_task"][0]["ci95"] == pytest.approx(0.0, abs=1e-9)  # the same gain on each seed
    from scipy import stats

    assert win["t_test_p"] == pytest.approx(stats.ttest_1samp([0.1, 0.08, 0.12], 0).pvalue)
    # three comparisons (taylor-lora, taylor-random, random-lora): Holm multiplies the smallest p by 3
    ps = sorted(r["t_test_p"] for r in out["paired"])
    assert min(r["holm_p"] for r in out["paired"]) == pytest.approx(min(1.0, 3 * ps[0]))
    assert win["significant"] == (win["holm_p"] < 0.05)
    tie = paired[("rows-random", "lora")]
    assert abs(tie["mean_diff"]) < 0.01 and not tie["significant"] and tie["t_test_p"] > 0.5
    assert paired[("rows-taylor", "rows-random")]["mean_diff"] == pytest.approx(0.1, abs=1e-9)
    assert ("rows-taylor", "full") not in paired  # no full runs: no comparison
    # one task with both methods is no across-task comparison
    assert qs.compare({("a", "x", 0): 1.0, ("a", "y", 0): 0.0}, "x", "y", ["a", "b"], [0]) is None


def test_precision_variants_are_compared_with_their_fp32_run_only():
    """rows-taylor-amp / -bf16 and lora-bf16 (the GPU's default precision paths) each against the same
    method in fp32; not against LoRA, full or random rows as the fp32 row methods are."""
    assert qs.METHODS["rows-taylor-bf16"] == [*qs.METHODS["rows-taylor"], "precision=bf16", "dtype=bfloat16"]
    assert qs.METHODS["lora-amp"] == [*qs.METHODS["lora"], "precision=bf16"]
    assert [qs.precision_base(m) for m in ("rows-taylor-amp", "lora-bf16", "rows-taylor", "rows-taylor-global")] == [
        "rows-taylor", "lora", None, None
    ]  # fmt: skip
    tasks, seeds = ["a", "b"], [0, 1]
    methods = ["lora", "lora-bf16", "rows-taylor", "rows-taylor-amp", "rows-random"]
    test = [{"task": t, "method": m, "seed": s, "score": 0.5 + 0.01 * i + 0.001 * s + (0.02 if t == "b" else 0)}
            for i, m in enumerate(methods) for t in tasks for s in seeds]  # fmt: skip
    pairs = [(r["method"], r["against"]) for r in qs.summarize(test, tasks, methods, seeds)["paired"]]
    assert sorted(pairs) == sorted([("lora-bf16", "lora"), ("rows-taylor", "lora"),
                                    ("rows-taylor", "rows-random"), ("rows-taylor-amp", "rows-taylor"),
                                    ("rows-random", "lora")])  # fmt: skip


def test_holm_adjusts_by_rank_and_keeps_the_order():
    assert qs.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert qs.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert qs.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1, non-decreasing by rank
    assert qs.holm([]) == []


def test_a_rate_chosen_at_an_end_of_its_grid_tries_one_step_beyond():
    def runs(task, method, scores):
        return [{"task": task, "method": method, "lr": lr, "score": v} for lr, v in scores.items()]

    sweep = (
        runs("t", "lora", {3e-4: 0.5, 1e-3: 0.6, 3e-3: 0.7})  # best at the top
        + runs("t", "rows-taylor", {1e-4: 0.8, 3e-4: 0.6, 1e-3: 0.5})  # best at the bottom
        + runs("t", "full", {3e-5: 0.6, 1e-4: 0.9, 3e-4: 0.7})  # interior
        + runs("t", "dora", {1e-3: 0.6})  # one rate: no grid to extend
    )
    assert sorted(qs.at_edge(sweep)) == [("t", "lora"), ("t", "rows-taylor")]
    assert sorted(qs.beyond_edges(sweep)) == [("t", "lora", 9e-3), ("t", "rows-taylor", 3.33e-5)]
    # once the step beyond is worse, the chosen rate is interior and nothing more runs
    sweep += runs("t", "lora", {9e-3: 0.4}) + runs("t", "rows-taylor", {3.33e-5: 0.7})
    assert qs.beyond_edges(sweep) == []


def test_every_seed_runs_on_the_split_seed_and_records_its_length():
    a = qs.argparse.Namespace(model="m", steps=60, epochs=None, batch_size=8, train_examples=480,
                              eval_examples=500, max_length=128, set=[], eval_steps=20, split_seed=0)  # fmt: skip
    o = qs.overrides(a, "hyperbaton", "lora", 3, 1e-3, "test")
    assert "seed=3" in o and "split_seed=0" in o and "steps=60" in o
    a.epochs, a.split_seed = 1.0, None
    o = qs.overrides(a, "hyperbaton", "lora", 3, 1e-3, "test")
    assert "num_train_epochs=1" in o and not [x for x in o if x.startswith(("steps=", "split_seed="))]


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
    test = [{"task": t, "method": m, "seed": s, "score": v + s / (50 if m.startswith("rows") else 100)}
            for t in "ab" for m, v in (("lora", 0.5), ("lora-r32", 0.6), ("rows-taylor-r32", 0.7))
            for s in range(3)]  # fmt: skip
    out = qs.summarize(test, ["a", "b"], ["lora", "lora-r32", "rows-taylor-r32"], [0, 1, 2])
    [r] = out["paired"]
    assert (r["method"], r["against"], round(r["mean_diff"], 6)) == ("rows-taylor-r32", "lora-r32", 0.11)


def test_a_global_budget_is_paired_with_the_same_scorer_spread_evenly():
    methods = ["lora", "rows-taylor", "rows-taylor-global"]
    test = [{"task": t, "method": m, "seed": s, "score": 0.5 + i / 10 + s / 100}
            for t in "ab" for i, m in enumerate(methods) for s in range(3)]  # fmt: skip
    out = qs.summarize(test, ["a", "b"], methods, [0, 1, 2])
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
           "--extend-grid", "1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "quality_suite.json").read_text())
    sweep = [r for r in result["runs"] if r["phase"] == "sweep"]
    # a two-rate grid always chooses an end, so --extend-grid 1 adds one rate beyond the chosen end
    # (ratio 30: 1e-3 -> 3.33e-5, 3e-2 -> 0.9) and no second round
    assert [(r["method"], r["lr"]) for r in sweep[:2]] == [("lora", 1e-3), ("lora", 3e-2)]
    first = qs.choose(sweep[:2])["hyperbaton"]["lora"]
    assert [(r["method"], r["lr"]) for r in sweep[2:]] == [("lora", 3.33e-5 if first == 1e-3 else 0.9)]
    assert result["settings"]["extend_grid"] == 1
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
    """--recorded: a run an earlier results file holds with the very same command and library code is
    not run again (its folder stays absent), a run with another command or other code is; the markdown
    says which are old."""
    import json
    import shutil
    import subprocess
    import sys

    from neurontune.bench import run_source

    if not (source := run_source()) or source.endswith("-dirty"):
        pytest.skip("a recorded run stands in only for committed library code (src/ has changes)")

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
        assert new == {**old, "recorded": earlier["date"]} and old["source"] == source
        assert old["config"]["seed"] == 0 and old["config"]["split_seed"] == 0  # every option, resolved
    assert "recorded" not in result["runs"][2]
    md = (tmp_path / "out" / "quality_suite.md").read_text()
    assert "2 of the 3 runs were taken from an earlier results file (`--recorded`)" in md
    # a run recorded at other library code is stale: it runs again
    earlier["runs"][1]["source"] = "0000000"
    first.write_text(json.dumps(earlier))
    shutil.rmtree(tmp_path / "runs")
    res = suite("none,lora", "--recorded", str(first))
    assert res.returncode == 0 and "recorded at other code (0000000), running it again" in res.stdout
    assert [p.name for p in (tmp_path / "runs" / "test" / "hyperbaton").iterdir()] == ["lora-lr0.001-s0"]
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
