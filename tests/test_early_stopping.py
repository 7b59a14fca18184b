"""Training length that follows the data: ``num_train_epochs`` and early stopping on a validation split
(transformers' ``num_train_epochs`` / ``max_steps`` and ``EarlyStoppingCallback`` with
``load_best_model_at_end``)."""

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from neurontune.cli import main
from neurontune.config import FinetuneConfig
from neurontune.pipeline import training_steps
from neurontune.tasks import Example, StepBatches
from neurontune.train import TrainArgs, best_metric, early_stop, list_checkpoints, train
from tests.test_train import deltas, rows_model

RUN = ["finetune", "model=tiny-llama", "train_examples=40", "eval_examples=4", "forgetting_examples=0",
       "eval_before=false", "batch_size=4", "lr=1e-2"]  # fmt: skip


def _log(*losses):
    return [{"step": i + 1, **({} if v is None else {"val_loss": v})} for i, v in enumerate(losses)]


def test_early_stop_counts_measurements_without_improvement_as_transformers_does():
    assert early_stop(_log(None, 2.0, None, 1.5, None, 1.6), patience=2) == (False, 4)
    assert early_stop(_log(None, 2.0, None, 1.5, None, 1.6, None, 1.5), patience=2) == (True, 4)  # a tie
    assert early_stop(_log(2.0, 1.95, 1.9), patience=2, threshold=0.1) == (True, 1)  # too small to count
    assert early_stop(_log(2.0, 1.5, 1.0), patience=1) == (False, 3)
    assert early_stop(_log(None, None), patience=1) == (False, None)  # nothing measured yet
    assert early_stop(_log(3.0, 4.0, 5.0), patience=0) == (False, 1)  # off: the best is still known


def test_early_stop_on_a_metric_where_higher_is_better():
    acc = [{"step": i + 1, "val_accuracy": v} for i, v in enumerate([0.5, 0.75, 0.75, 0.5])]
    # a tie does not improve
    assert early_stop(acc, patience=2, key="val_accuracy", greater=True) == (True, 2)
    assert early_stop(acc, patience=3, key="val_accuracy", greater=True) == (False, 2)
    assert early_stop(acc, patience=1, key="val_accuracy", greater=True, threshold=0.3) == (True, 1)
    assert early_stop(acc, patience=0, key="val_accuracy") == (False, 1)  # greater_is_better=false
    assert early_stop(acc, patience=1) == (False, None)  # no val_loss in this log


def test_best_metric_follows_transformers_defaults():
    def cfg(**kw):
        return FinetuneConfig(early_stopping_patience=1, eval_steps=1, **kw)

    assert best_metric(cfg()) == ("loss", False)
    assert best_metric(cfg(metric_for_best_model="accuracy")) == ("accuracy", True)
    assert best_metric(cfg(metric_for_best_model="perplexity")) == ("perplexity", False)
    assert best_metric(cfg(metric_for_best_model="accuracy", greater_is_better=False)) == ("accuracy", False)


def test_num_train_epochs_sets_the_steps_and_an_explicit_steps_replaces_them(capsys):
    cfg = FinetuneConfig(num_train_epochs=2, batch_size=4, grad_accum=2)
    assert training_steps(cfg, 50, processes=1) == 12  # 12 full micro-batches an epoch, 2 a step, 2 epochs
    assert "num_train_epochs=2: 12 steps (50 training examples, 12 micro-batches of 4 an epoch" in (
        capsys.readouterr().out
    )
    assert training_steps(cfg, 50, processes=2) == 6
    assert training_steps(FinetuneConfig(num_train_epochs=0.5, batch_size=4), 50, 1) == 6
    assert training_steps(FinetuneConfig(batch_size=4), 50, 1) == 12  # by default one pass
    capsys.readouterr()
    # a given steps is the count, below or above the epochs' (max_steps in the HF Trainer): data repeats
    assert training_steps(FinetuneConfig(num_train_epochs=2, batch_size=4, steps=5), 50, 1) == 5
    assert training_steps(FinetuneConfig(batch_size=4, steps=40), 50, 1) == 40
    assert "num_train_epochs" not in capsys.readouterr().out


def test_num_train_epochs_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert main([*RUN, "num_train_epochs=1.5", "save_steps=0", f"output_dir={out}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 15  # 1.5 x 40 / 4
    default = tmp_path / "default"
    assert main([*RUN, "save_steps=0", f"output_dir={default}"]) == 0  # one pass: 40 / 4
    assert json.loads((default / "metrics.json").read_text())["steps"] == 10
    assert json.loads((default / "config.json").read_text())["steps"] is None  # as given, for --resume


@pytest.mark.parametrize(
    "extra,message",
    [
        (["early_stopping_patience=2"], "early_stopping_patience needs eval_steps"),
        (["num_train_epochs=0"], "num_train_epochs must be > 0"),
        (["early_stopping_patience=-1", "eval_steps=2"], "early_stopping_patience must be >= 0"),
        (["method=none", "early_stopping_patience=1", "eval_steps=2"], "method=none does not train"),
        (["metric_for_best_model=accuracy"], "metric_for_best_model=accuracy needs early_stopping_patience"),
        (
            ["metric_for_best_model=rougeL", "early_stopping_patience=1", "eval_steps=2"],
            "metric_for_best_model=rougeL: task rotten_tomatoes (classification) is measured by accuracy",
        ),
    ],
)
def test_bad_training_length_options_are_one_clear_error(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main([*RUN, *extra, f"output_dir={out}"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _stopping(out, *extra):
    return [*RUN, "steps=20", "eval_steps=2", "early_stopping_patience=2", "save_steps=2", f"output_dir={out}",
            *extra]  # fmt: skip


def test_early_stopping_stops_and_keeps_the_best_steps_weights(tmp_path, capsys):
    """A threshold no measurement can beat: the first (step 2) stays the best, steps 4 and 6 do not
    improve, so training stops at 6 and the result is step 2's weights, those of a run that ends at 2."""
    out, short = tmp_path / "run", tmp_path / "short"
    assert main(_stopping(out, "early_stopping_threshold=100")) == 0
    said = capsys.readouterr().out
    assert "early stopping: stopped at step 6 of 20; the result is step 2's weights" in said
    assert "4 held-out examples" in said  # the last eval_fraction (0.1) of the 40 training examples
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6
    stopping = metrics["early_stopping"]
    assert (
        stopping["stopped"] and stopping["best_step"] == 2 and sorted(stopping["val_loss"]) == ["2", "4", "6"]
    )
    with (out / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["val_loss"]] == ["2", "4", "6"]
    assert float(rows[1]["val_loss"]) == stopping["best_val_loss"]
    assert list_checkpoints(out)[-1].name == "step-000006"  # a checkpoint at the stop
    # the same held-out split and data order, 2 steps: the weights the stopped run returned
    assert main(_stopping(short, "steps=2")) == 0
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(short / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best = load_file(out / "checkpoints" / "best.safetensors")
    assert any(v.abs().sum() > 0 for v in best.values())
    # a higher step cap (the constant learning rate does not depend on it) takes the same steps to the same
    # stop: benchmarks/gates.py's unpruned reference is its teacher's run when that stopped before its cap
    longer = tmp_path / "longer"
    assert main(_stopping(longer, "early_stopping_threshold=100", "steps=40")) == 0
    c = load_file(longer / "adapter" / "adapter_model.safetensors")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    again = json.loads((longer / "metrics.json").read_text())
    assert again["early_stopping"] == stopping and again["after"]["accuracy"] == metrics["after"]["accuracy"]


def test_early_stopping_by_the_tasks_accuracy(tmp_path, capsys):
    """metric_for_best_model=accuracy: the held-out examples' accuracy by the task's own evaluation is what
    is measured (val_accuracy), higher is better, and the result is the best step's weights: with a
    threshold no accuracy can beat, step 2's, those of a run that ends there."""
    out, short = tmp_path / "run", tmp_path / "short"
    assert main(_stopping(out, "metric_for_best_model=accuracy", "early_stopping_threshold=1")) == 0
    said = capsys.readouterr().out
    assert (
        "early stopping: stopped at step 6 of 20; the result is step 2's weights (validation accuracy" in said
    )
    metrics = json.loads((out / "metrics.json").read_text())
    stopping = metrics["early_stopping"]
    assert set(stopping) == {"stopped", "best_step", "best_val_accuracy", "val_accuracy"}
    assert (
        stopping["stopped"]
        and stopping["best_step"] == 2
        and sorted(stopping["val_accuracy"]) == ["2", "4", "6"]
    )
    assert all(
        4 * v == int(4 * v) for v in stopping["val_accuracy"].values()
    )  # a share of 4 held-out examples
    with (out / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert "val_loss" not in rows[0] and float(rows[1]["val_accuracy"]) == stopping["best_val_accuracy"]
    assert main(_stopping(short, "steps=2")) == 0
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(short / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_accuracy_measured_is_the_held_out_examples_and_training_goes_on_in_training_mode(tokenizer):
    """EarlyStopping.measure with a metric: the task's evaluation of the held-out examples (not its eval
    split), and the model is left in the mode it was in."""
    from neurontune.evaluation import classification_accuracy
    from neurontune.tasks import Task
    from neurontune.train import EarlyStopping

    held = [
        Example(f"review {i}\nLabel:", " positive" if i % 2 else " negative", label=i % 2) for i in range(6)
    ]
    task = Task("t", "classification", held, [Example("other\nLabel:", " negative", label=0)],
                label_words=["negative", "positive"])  # fmt: skip
    model = rows_model().train()
    cfg = FinetuneConfig(
        metric_for_best_model="accuracy", early_stopping_patience=1, eval_steps=1, max_length=32
    )
    stopper = EarlyStopping(cfg, model, None, held, tokenizer, task=task)
    got = stopper.measure()
    assert model.training and 0 < got < 1  # 6 held-out examples, half of each label: not the eval split's one
    assert got == classification_accuracy(model, tokenizer, held, ["negative", "positive"], 32)
    assert stopper.on_step({"step": 1}) == {"val_accuracy": got}


def test_a_run_that_improves_to_the_end_runs_every_step_and_keeps_the_last(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "steps=4", "eval_steps=2", "early_stopping_patience=5", f"output_dir={out}"]) == 0
    assert "early stopping: ran all 4 steps" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_a_resumed_run_that_had_stopped_does_not_train_on(tmp_path, tokenizer):
    """Killed after early stopping's last checkpoint: the resumed run decides from the log it restores
    (stop_when is a function of the log) and takes no further step."""
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(16)], tokenizer, 4, 16, seed=0)
    args = TrainArgs(steps=10, save_steps=2, lr=1e-2)
    asked = []

    def stop_at_3(log):
        asked.append(len(log))
        return len(log) >= 3

    model = rows_model()
    log = train(model, data, args, tmp_path, progress=False, stop_when=stop_at_3)
    assert len(log) == 3 and asked == [1, 2, 3]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    again = rows_model()
    log2 = train(again, data, args, tmp_path, resume=True, progress=False, stop_when=stop_at_3)
    assert len(log2) == 3 and asked[-1] == 3  # asked once on resuming, and no step taken
    a, b = deltas(model), deltas(again)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_early_stopping_resumes_to_the_uninterrupted_result(tmp_path):
    """Resumed from a checkpoint before the stop, the run measures, stops and restores as it would have."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_stopping(whole, "early_stopping_threshold=100")) == 0
    assert main(_stopping(cut, "early_stopping_threshold=100")) == 0
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    (cut / "metrics.json").unlink()
    assert main([*_stopping(cut, "early_stopping_threshold=100"), "--resume"]) == 0
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert m1["early_stopping"] == m2["early_stopping"] and m2["steps"] == 6
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
