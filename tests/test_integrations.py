"""Fitting the tools people already use: experiment trackers (TensorBoard read back) and torch.compile."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from neurontune.cli import main
from tests.test_faults import one_error_line

TINY = ["model=tiny-llama", "train_examples=16", "eval_examples=4", "forgetting_examples=0", "batch_size=4",
        "steps=3", "lr=1e-2"]  # fmt: skip


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f))
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return out


def test_tensorboard_logs_steps_evaluations_and_the_config(tmp_path):
    out = tmp_path / "run"
    assert main(["finetune", *TINY, "report_to=tensorboard", f"output_dir={out}"]) == 0
    got = scalars(out / "logs")
    with open(out / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    for key in ("loss", "lr", "grad_norm"):
        assert [s for s, _ in got[f"train/{key}"]] == [1, 2, 3]
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([float(r[key]) for r in log], rel=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert got["eval/accuracy"] == [(3, pytest.approx(metrics["after"]["accuracy"]))]
    assert got["eval_before/accuracy"] == [(0, pytest.approx(metrics["before"]["accuracy"]))]
    hparams = yaml.safe_load(next((out / "logs").rglob("hparams.yml")).read_text())
    assert hparams["lr"] == 1e-2 and hparams["method"] == "rows" and hparams["report_to"] == "tensorboard"


def test_gates_sparsity_reaches_the_tracker(tmp_path):
    out = tmp_path / "gates"
    args = ["method=gates", "gate_sparsity=0.3", "gate_force=true"]
    assert main(["finetune", *TINY, *args, "report_to=tensorboard", f"output_dir={out}"]) == 0
    assert any(tag.startswith("train/") and "sparsity" in tag for tag in scalars(out / "logs"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("neptune", "unknown tracker 'neptune'"), ("wandb", "report_to=wandb needs the wandb package")],
)
def test_bad_or_missing_tracker_is_one_error_line(tmp_path, capsys, value, expected):
    if value == "wandb":
        pytest.importorskip("tensorboard")  # any installed tracker would do; wandb must be the missing one
        if __import__("importlib").util.find_spec("wandb"):
            pytest.skip("wandb is installed here")
    assert main(["finetune", *TINY, f"report_to={value}", f"output_dir={tmp_path / 'r'}"]) == 2
    one_error_line(capsys.readouterr().err, expected)


def _train(out, *extra) -> tuple[list[float], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    assert main(["finetune", *TINY, "eval_before=false", f"output_dir={out}", *extra]) == 0
    with open(out / "train_log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return losses, load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # 45-80 s of compiling; in .ci/run (the compiled layer is checked in test_rowtune_precision)
def test_torch_compile_trains_what_eager_trains(tmp_path, monkeypatch):
    """aot_eager: the graph capture and the compiled autograd, without inductor's C++ build (slow variant below)."""
    compiled = []
    real = torch.compile

    def spy(model, **kw):
        compiled.append(kw.get("backend"))
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    eager_loss, eager = _train(tmp_path / "eager")
    assert compiled == []
    comp_loss, comp = _train(tmp_path / "compiled", "torch_compile=true", "torch_compile_backend=aot_eager")
    assert compiled == ["aot_eager"]
    assert comp_loss == pytest.approx(eager_loss, rel=1e-5)
    for k, v in eager.items():
        assert torch.allclose(comp[k].float(), v.float(), atol=1e-5), k


@pytest.mark.slow
def test_torch_compile_inductor_trains_what_eager_trains(tmp_path):
    eager_loss, eager = _train(tmp_path / "eager")
    comp_loss, comp = _train(tmp_path / "compiled", "torch_compile=true")
    assert comp_loss == pytest.approx(eager_loss, rel=1e-4)
    for k, v in eager.items():
        assert torch.allclose(comp[k].float(), v.float(), atol=1e-4), k


# ---- lm-evaluation-harness from the command line ---------------------------------------------------
MC = [("1 + 1 =", [" 2", " 3"], 0), ("2 + 2 =", [" 5", " 4"], 1), ("3 + 1 =", [" 4", " 7"], 0),
      ("5 - 2 =", [" 3", " 1"], 0), ("4 + 4 =", [" 9", " 8"], 1)]  # fmt: skip


def _custom_task(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in MC))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


def test_eval_runs_a_custom_lm_eval_task_on_the_adapted_model(tmp_path):
    from neurontune.pipeline import load_adapted

    out = tmp_path / "run"
    assert main(["finetune", *TINY, "lr=5e-2", "eval_before=false", f"output_dir={out}"]) == 0
    tasks = _custom_task(tmp_path)
    res = tmp_path / "res.json"
    args = [f"--adapter={out / 'adapter'}", "task=none", "lm_eval_tasks=tiny_mc", f"lm_eval_include={tasks}"]
    assert main(["eval", *args, f"output={res}"]) == 0
    got = json.loads(res.read_text())["lm_eval"]["tiny_mc"]["acc,none"]

    model, tok, kind = load_adapted(str(out / "adapter"))
    assert kind == "rows"

    def loglik(context: str, cont: str) -> float:
        ctx, c = tok(context)["input_ids"], tok(cont)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + c])).logits[0].float(), -1)
        return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(c))

    expected = sum(max(range(2), key=lambda i, q=q, c=c: loglik(q, c[i])) == g for q, c, g in MC) / len(MC)
    assert got == pytest.approx(expected)


def test_unknown_lm_eval_task_is_one_error_line(tmp_path, capsys):
    tasks = _custom_task(tmp_path)
    args = ["model=tiny-llama", "task=none", "lm_eval_tasks=no_such_task", f"lm_eval_include={tasks}"]
    assert main(["eval", *args]) == 2
    one_error_line(capsys.readouterr().err, "lm-eval knows no task 'no_such_task'")
