"""Inputs that used to end in a traceback from deep inside torch or transformers (issue #31, TRACEBACK):
each now ends in one ``neurontune: error:`` line, with nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from neurontune.cli import main
from neurontune.train import list_checkpoints
from tests.test_faults import TINY, one_error_line, run, snapshot


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"rows": root / "rows", "full": root / "full"}
    assert run(out["rows"], "save_steps=2") == 0
    assert run(out["full"], "method=full") == 0
    return out


def test_merging_a_whole_model_says_there_is_nothing_to_merge(runs, tmp_path, capsys):
    target = tmp_path / "merged"
    assert main(["merge", "--adapter", str(runs["full"] / "model"), "--output", str(target)]) == 2
    one_error_line(capsys.readouterr().err, "is a whole model", "nothing to merge", "model=")
    assert not target.exists()


@pytest.mark.parametrize("where", ["model", "adapter"])
def test_a_run_directory_where_a_model_or_adapter_belongs_names_its_output(runs, capsys, where):
    rundir = str(runs["rows"])
    if where == "model":
        rc = main(["eval", f"model={rundir}", "eval_examples=2", "forgetting_examples=0"])
    else:
        rc = main(["eval", "--adapter", rundir, "eval_examples=2", "forgetting_examples=0"])
    assert rc == 2
    one_error_line(
        capsys.readouterr().err,
        f"{rundir} is a neurontune run directory, not {'an' if where == 'adapter' else 'a'} {where}",
        f"--adapter {rundir}/adapter",
    )


def test_a_model_directory_with_truncated_weights_or_unknown_type(tmp_path, capsys):
    from neurontune.models import tiny_model, tiny_tokenizer

    good = tmp_path / "m"
    tiny_model("tiny-llama").save_pretrained(good)
    tiny_tokenizer().save_pretrained(good)
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", f"model={good}", "eval_examples=2", "forgetting_examples=0"]) == 2
    one_error_line(capsys.readouterr().err, f"could not load model '{good}'")
    cfg = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-architecture"}))
    assert main(["eval", f"model={good}", "eval_examples=2", "forgetting_examples=0"]) == 2
    one_error_line(capsys.readouterr().err, f"could not load model '{good}'")


def test_a_checkpoint_whose_adam_moment_has_the_wrong_shape(runs, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["rows"], out)
    (out / "metrics.json").unlink()
    ckpt = list_checkpoints(out)[-1] / "state.safetensors"
    tensors = load_file(ckpt)
    key = next(k for k in tensors if k.startswith("optim.") and k.endswith("exp_avg"))
    tensors[key] = tensors[key].flatten()[:-1].clone()
    save_file(tensors, ckpt)
    before = snapshot(out)
    assert run(out, "save_steps=2", "--resume") == 2
    one_error_line(capsys.readouterr().err, "the optimizer's exp_avg of", "has shape")
    assert snapshot(out) == before


def test_a_tiny_model_quantized_on_a_process_other_than_rank_0(monkeypatch):
    """Each process loads the quantized tiny model from its own temporary directory; transformers'
    save_pretrained writes on rank 0 only, so rank 1 found an empty directory."""
    pytest.importorskip("bitsandbytes")
    import transformers.distributed.mixin as mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    from neurontune.models import load_model, model_quantization

    model, _ = load_model("tiny-llama", quantization="nf4")
    assert model_quantization(model) == "nf4"


def test_finetune_with_bad_data_leaves_no_directory(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    out = tmp_path / "never"
    assert main(["finetune", *TINY, f"task={bad}", f"output_dir={out}"]) == 2
    one_error_line(capsys.readouterr().err, "bad.jsonl:1")
    assert not out.exists()


def test_fsdp_version_1_is_refused_with_the_setting_to_change(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert run(tmp_path / "run") == 2
    one_error_line(capsys.readouterr().err, "FSDP version 1", "fsdp_version: 2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_ema_decay_under_fsdp_or_deepspeed_is_refused_before_the_model_loads(
    monkeypatch, tmp_path, capsys, kind
):
    import neurontune.pipeline

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    loaded = []
    monkeypatch.setattr(neurontune.pipeline, "_load", lambda *a, **k: loaded.append(a) or 1 / 0)
    assert run(tmp_path / "run", "ema_decay=0.9") == 2
    one_error_line(capsys.readouterr().err, "ema_decay: not under FSDP or DeepSpeed")
    assert not loaded and not (tmp_path / "run").exists()


def test_metrics_record_the_process_count_and_quantization(runs):
    m = json.loads((runs["rows"] / "metrics.json").read_text())
    assert m["num_processes"] == 1 and m["quantization"] == "none"


def test_accelerate_cpu_launch_of_several_processes_is_warned_about():
    """accelerate launch --cpu --num_processes 2 runs one process: the launcher's own command line says
    how many were asked for (here a parent process standing in for it)."""
    import os
    import subprocess
    import sys

    child = "from neurontune.train import asked_processes_not_started as f; print(f())"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    for flags, expected in ((["--num_processes", "2"], "2"), (["--num_processes=1"], "None")):
        out = subprocess.run([sys.executable, "-c", parent, "launch", "--cpu", *flags], capture_output=True,
                             text=True, env={**env, "ACCELERATE_USE_CPU": "True"}, timeout=120)  # fmt: skip
        assert out.stdout.strip() == expected, (flags, out.stdout, out.stderr[-2000:])
