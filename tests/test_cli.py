"""End-to-end CLI on a tiny model: seconds, checks the files produced and the printed counts."""

import json

import pytest
import torch

from neurontune import RowTuneModel
from neurontune.cli import main
from neurontune.models import tiny_model
from neurontune.spec import NeuronSpec


def test_finetune_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "finetune",
            "--model",
            "tiny-llama",
            "--output-dir",
            str(out),
            "steps=3",
            "train_examples=32",
            "eval_examples=16",
            "batch_size=4",
            "save_merged=true",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    spec = NeuronSpec.load(out / "neuron_spec.json")
    assert f"trainable params: {spec.num_params():,} ||" in printed
    assert (
        f"budget: {spec.num_params():,} row params vs {spec.provenance['lora_params']:,} for LoRA r=8"
        in printed
    )
    assert spec.provenance["scorer"] == "taylor" and spec.provenance["budget"]["match_lora_rank"] == 8
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 3 and cfg["model"] == "tiny-llama"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == spec.num_params()
    assert metrics["steps"] == 3 and metrics["first_loss"] > 0 and metrics["method"] == "rows"
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,grad_norm,tokens,seconds" and len(log) == 4
    assert {"accuracy", "forgetting_ppl"} <= set(metrics["after"]) and metrics["before"][
        "eval_examples"
    ] == 16
    assert (out / "report.md").read_text().startswith("# neurontune run")
    assert 0.0 <= metrics["after"]["accuracy"] <= 1.0
    assert metrics["saved_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    # the adapter reloads onto a fresh base and equals the merged export
    adapted = RowTuneModel.from_pretrained(tiny_model("tiny-llama"), out / "adapter")
    merged = type(adapted.base_model).from_pretrained(out / "merged")
    ids = torch.randint(0, 250, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stepz=3"], "unknown config key 'stepz'; did you mean 'steps'?"),
        (["steps=three"], "steps='three': expected int"),
        (["steps=0"], "steps must be positive"),
        (["budget=rows"], "budget 'rows': expected rows:K, ratio:P, lora:R or lora-global:R"),
        (["budget=ratio:abc"], "'abc' is not a number"),
        (["budget=lora:x"], "'x' is not an integer"),
        (["budget=lora:0"], "budget 'lora:0': 0 must be at least 1"),
        (["budget=lora-global:-2"], "budget 'lora-global:-2': -2 must be at least 1"),
        (["budget=ratio:1.5"], "budget 'ratio:1.5': 1.5 must be in (0, 1]"),
        (["scorer=nope"], "scorer='nope' is not one of: magnitude, random, taylor"),
        (["task=mnist"], "unknown task 'mnist'"),
        (["task=/nope/data.jsonl"], "data file not found: /nope/data.jsonl"),
        (["method=lorra"], "method='lorra' is not one of: rows, neft, lora, dora"),
        (
            ["lr_scheduler=wobbly", "forgetting_examples=0", "eval_before=false"],
            "lr_scheduler='wobbly' is not one of",
        ),
        (["precision=fp8"], "precision='fp8' is not one of: auto, fp32, bf16, fp16"),
        (["target_modules=qkv"], "'qkv' matches no linear layer"),
        (["budget=rows:500"], "rows_per_module=500 does not fit"),
        (["scorer_options=p"], "expected key=value"),
        (["scorer=activation", "scorer_options=mode=loud"], "activation mode must be"),
        (["model=/nonexistent/dir"], "model '/nonexistent/dir' is not a local directory"),
        (["method=rows", "spec=/nope/spec.json"], "/nope/spec.json: not a NeuronSpec file"),
        (["method=gates", "gate_sparsity=1.5"], "(gate_sparsity on the command line) must be in [0, 1)"),
        (["method=gates", "model=tiny-gpt2"], "structured gates need a Llama-style decoder"),
    ],
)
def test_finetune_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    rc = main(["finetune", "--model", "tiny-llama", "--output-dir", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("neurontune: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_select_command_writes_spec(tmp_path, capsys):
    out = tmp_path / "spec.json"
    rc = main(
        [
            "select",
            "--model",
            "tiny-gpt2",
            "--scorer",
            "taylor",
            "--budget",
            "ratio:0.1",
            "--output",
            str(out),
            "calib_examples=8",
            "min_per_module=1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    spec = NeuronSpec.load(out)
    assert spec.provenance["scorer"] == "taylor" and spec.provenance["budget"]["ratio"] == 0.1
    assert spec.provenance["calib_examples"] == 8 and spec.provenance["config"]["model"] == "tiny-gpt2"
    assert all(len(s.rows) >= 1 for s in spec.modules.values()) and len(spec.modules) == 8
    assert f"selected {spec.num_rows():,} rows ({spec.num_params():,} params)" in printed
    from safetensors.torch import load_file

    scores = load_file(tmp_path / "spec.scores.safetensors")
    assert set(scores) == set(spec.modules)
    for name, sel in spec.modules.items():  # the selected rows are the top-scored ones
        assert scores[name][sel.rows].min() >= scores[name].median()


def test_select_with_a_global_lora_budget(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert (
        main(["select", "model=tiny-llama", "budget=lora-global:4", "calib_examples=8", f"output={out}"]) == 0
    )
    spec = NeuronSpec.load(out)
    assert spec.provenance["budget"]["global_lora_rank"] == 4 and spec.provenance["scorer"] == "taylor"
    assert spec.provenance["lora_params"] - 64 < spec.num_params() <= spec.provenance["lora_params"]
    assert "for LoRA r=4 on the same" in capsys.readouterr().out


def _finetune(out, *extra):
    base = ["finetune", "model=tiny-llama", "steps=2", "train_examples=16", "eval_examples=8",
            "forgetting_examples=2", "batch_size=4", f"output_dir={out}"]  # fmt: skip
    return main([*base, *extra])


@pytest.mark.parametrize(
    ("method", "trainable", "saved"),
    [("lora", 8192, "adapter/adapter_model.safetensors"), ("full", 35168, "model/model.safetensors"),
     ("none", 0, None)],
)  # fmt: skip
def test_baseline_methods_end_to_end(tmp_path, capsys, method, trainable, saved):
    out = tmp_path / method
    assert _finetune(out, f"method={method}") == 0
    printed = capsys.readouterr().out
    assert f"trainable params: {trainable:,} ||" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["trainable_params"] == trainable
    assert (out / saved).is_file() if saved else not (out / "adapter").exists()
    assert not (out / "neuron_spec.json").exists()


def test_eval_and_merge_commands_agree_with_the_run(tmp_path, capsys):
    for method in ("rows", "lora"):
        out = tmp_path / method
        assert _finetune(out, f"method={method}", "lr=1e-2") == 0
        after = json.loads((out / "metrics.json").read_text())["after"]
        ev = tmp_path / f"{method}-eval.json"
        args = ["eval_examples=8", "forgetting_examples=2", f"output={ev}"]
        assert main(["eval", "--adapter", str(out / "adapter"), *args]) == 0
        got = json.loads(ev.read_text())
        assert got["adapter_kind"] == method and got["accuracy"] == after["accuracy"]
        assert got["forgetting_ppl"] == pytest.approx(after["forgetting_ppl"], rel=1e-5)
        merged = tmp_path / f"{method}-merged"
        assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
        assert main(["eval", "--model", str(merged), *args, "--overwrite"]) == 0  # replaces the adapter's
        assert json.loads(ev.read_text())["forgetting_ppl"] == pytest.approx(
            after["forgetting_ppl"], rel=1e-4
        )
    assert main(["eval", "--adapter", str(tmp_path / "nope")]) == 2
    assert "adapter directory not found" in capsys.readouterr().err


def test_yaml_config_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny-llama\nsteps: 5\nlr: 1e-3\nscorer: random\nbudget: rows:2\neval_before: no\n")
    out = tmp_path / "run"
    args = ["finetune", "--config", str(cfg), "train_examples=16", "eval_examples=4", "forgetting_examples=0"]
    assert main([*args, f"output_dir={out}", "--steps", "3"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["lr"] == 1e-3 and saved["scorer"] == "random"
    assert saved["eval_before"] is False and saved["budget"] == "rows:2"
    cfg.write_text("model: tiny-llama\nlearning_rate: 0.1\n")
    assert main([*args, f"output_dir={tmp_path / 'r2'}"]) == 2
    assert f"unknown config key 'learning_rate' in {cfg}" in capsys.readouterr().err
    cfg.write_text("- steps\n")
    assert main([*args, f"output_dir={tmp_path / 'r2'}"]) == 2
    assert "expected a mapping of key: value" in capsys.readouterr().err
    cfg.write_text("steps: many\n")
    assert main([*args, f"output_dir={tmp_path / 'r2'}"]) == 2
    assert "steps='many': expected int" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_generation_file_task_reports_bleu_chrf_rouge(tmp_path):
    data = tmp_path / "gen.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) + "\n" for w in "abcdefgh")
    )
    out = tmp_path / "gen"
    assert _finetune(out, f"task={data}", f"eval_file={data}", "eval_examples=4") == 0
    after = json.loads((out / "metrics.json").read_text())["after"]
    assert {"bleu", "chrf", "rougeL", "exact_match", "forgetting_ppl"} <= set(after)
    assert len(after["samples"]) == 4 and "prediction:" in (out / "report.md").read_text()  # up to 5


def test_each_method_has_its_own_default_learning_rate(tmp_path):
    from neurontune.config import FinetuneConfig

    # the quality suite's validation sweep: LoRA/DoRA train best near 1e-3, rows near 3e-4, full near 3e-5
    got = {m: FinetuneConfig(model="tiny-llama", method=m).lr for m in ("rows", "lora", "dora", "full")}
    assert got == {"rows": 3e-4, "lora": 1e-3, "dora": 1e-3, "full": 3e-5}
    assert FinetuneConfig(model="tiny-llama", method="lora", lr=2e-4).lr == 2e-4  # an explicit lr wins
    out = tmp_path / "run"
    args = ["finetune", "model=tiny-llama", "method=full", "steps=2", "train_examples=16", "eval_examples=4",
            "forgetting_examples=0", "eval_before=false", "save_steps=1", f"output_dir={out}"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-5  # the run records the rate it used
    assert main([*args, "steps=3", "--resume"]) == 2  # a different run is still refused, not resumed
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume"]) == 0  # no lr given again: the same default, the same run
