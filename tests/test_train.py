"""The training loop: accumulation, checkpoint contents, resume after a real kill, and run-dir safety."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from neurontune import get_rowtune_model
from neurontune.cli import main
from neurontune.models import tiny_model
from neurontune.scoring import score_model
from neurontune.selection import select
from neurontune.tasks import Example, StepBatches, collate, encode
from neurontune.train import TrainArgs, list_checkpoints, train


def rows_model(seed=0):
    model = tiny_model("tiny-llama", seed=seed)
    return get_rowtune_model(model, select(model, score_model(model, "magnitude"), rows_per_module=3))


def deltas(model):
    return {n: layer.delta.detach().clone() for n, layer in model.rowtune_layers().items()}


class ListBatches:
    def __init__(self, batches):
        self.batches = batches

    def __getitem__(self, i):
        return self.batches[i]


def test_grad_accum_equals_one_big_batch_token_weighted(tokenizer):
    # micro-batches with different numbers of completion tokens: the step must weight every token equally
    exs = [Example("ab", " c"), Example("abcd", " efghij"), Example("x", " yz"), Example("q", " rstuvw")]
    enc = [encode(e, tokenizer, 32) for e in exs]
    micro = [collate(enc[:2], tokenizer.pad_token_id), collate(enc[2:], tokenizer.pad_token_id)]
    whole = collate(enc, tokenizer.pad_token_id)
    a, b = rows_model(), rows_model()
    train(a, ListBatches(micro), TrainArgs(steps=1, lr=1e-2, grad_accum=2), progress=False)
    train(b, ListBatches([whole]), TrainArgs(steps=1, lr=1e-2, grad_accum=1), progress=False)
    da, db = deltas(a), deltas(b)
    assert any(d.abs().sum() > 0 for d in da.values())
    for n in da:
        torch.testing.assert_close(da[n], db[n], rtol=0, atol=1e-6)


def test_checkpoint_holds_only_trainable_state(tmp_path, tokenizer):
    model = rows_model()
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(16)], tokenizer, 4, 16, seed=0)
    log = train(model, data, TrainArgs(steps=4, save_steps=2, save_total_limit=1), tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004"]  # older one pruned
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 5 and len(log) == 4
    tensors = load_file(tmp_path / "checkpoints" / "step-000004" / "state.safetensors")
    layers = model.rowtune_layers()
    for name, layer in layers.items():
        assert tensors[f"param.base_model.{name}.delta"].equal(layer.delta.detach())
    n_params = sum(layer.delta.numel() for layer in layers.values())
    moments = [t for k, t in tensors.items() if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert sum(t.numel() for t in moments) == 2 * n_params  # AdamW state for the selected rows only
    assert max(t.numel() for k, t in tensors.items() if k != "rng.cpu") < 64 * 32  # nothing full-size


def test_a_sharded_checkpoint_reads_whole(tmp_path):
    """read_checkpoint joins an FSDP2 checkpoint's per-process files (rows in rank order; AdamW's step
    once; each process's RNG state under its rank) into what a whole checkpoint holds."""
    from safetensors.torch import save_file

    from neurontune.train import read_checkpoint

    w, m = torch.randn(5, 3), torch.randn(5, 3)
    rng = [torch.get_rng_state(), torch.get_rng_state() + 1]
    for r, rows in enumerate((slice(0, 3), slice(3, 5))):
        save_file({"param.w": w[rows].contiguous(), "optim.0.exp_avg": m[rows].contiguous(),
                   "optim.0.step": torch.tensor(4.0), "rng.cpu": rng[r]},
                  tmp_path / f"state.rank0000{r}-of-00002.safetensors")  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps({"format": "neurontune.checkpoint/1", "shards": 2}))
    got = read_checkpoint(tmp_path)
    assert got.keys() == {"param.w", "optim.0.exp_avg", "optim.0.step", "rng.cpu", "rng.cpu.1"}
    assert got["param.w"].equal(w) and got["optim.0.exp_avg"].equal(m) and got["optim.0.step"] == 4
    assert got["rng.cpu"].equal(rng[0]) and got["rng.cpu.1"].equal(rng[1])


def test_a_zero3_partitioned_checkpoint_reads_whole(tmp_path):
    """read_checkpoint joins a ZeRO-3 checkpoint's per-process flat partitions (each process's range of
    the flattened tensor, the last one padded) into the tensors' shapes kept in state.json."""
    from safetensors.torch import save_file

    from neurontune.train import read_checkpoint

    w, m = torch.randn(5, 3), torch.randn(5, 3)
    padded_w, padded_m = (
        torch.cat([w.reshape(-1), torch.zeros(1)]),
        torch.cat([m.reshape(-1), torch.zeros(1)]),
    )
    for r in (0, 1):  # 15 elements in partitions of 8
        save_file({"param.w": padded_w[8 * r : 8 * r + 8].clone(), "optim.0.exp_avg": padded_m[8 * r : 8 * r + 8].clone(),
                   "optim.0.step": torch.tensor(4.0), "rng.cpu": torch.get_rng_state()},
                  tmp_path / f"state.rank0000{r}-of-00002.safetensors")  # fmt: skip
    state = {"format": "neurontune.checkpoint/1", "shards": 2, "shard_kind": "flat", "param_names": ["w"],
             "shapes": {"w": [5, 3]}}  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps(state))
    got = read_checkpoint(tmp_path)
    assert got["param.w"].equal(w) and got["optim.0.exp_avg"].equal(m) and got["optim.0.step"] == 4


def _cmd(out, method):
    extra = ["lora_dropout=0.2"] if method == "lora" else []
    return [
        "finetune", "model=tiny-llama", f"method={method}", "steps=60", "train_examples=48",
        "batch_size=4", "grad_accum=2", "eval_examples=4", "forgetting_examples=0", "eval_before=false",
        "save_steps=3", "lr=3e-3", "lr_scheduler=cosine", "warmup_steps=5", f"output_dir={out}", *extra,
    ]  # fmt: skip


def _adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")  # rows and LoRA: PEFT adapters


@pytest.mark.parametrize("method", ["rows", "lora"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, method):
    """SIGKILL a run mid-training, resume it: the final adapter equals an uninterrupted run's, bit for bit.

    LoRA runs with dropout, so this also checks that the RNG state travels with the checkpoint.
    """
    threads = str(torch.get_num_threads())  # this process's, MKL's too: the compare is bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neurontune.cli", *_cmd(killed, method)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list_checkpoints(killed)
        if done and int(done[-1].name.split("-")[1]) >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    reached = int(list_checkpoints(killed)[-1].name.split("-")[1])
    assert 6 <= reached < 60 and not (killed / "metrics.json").exists()

    assert main([*_cmd(killed, method), "--resume"]) == 0
    full = tmp_path / "full"
    assert main(_cmd(full, method)) == 0
    a, b = _adapter(killed), _adapter(full)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (killed / "train_log.csv").read_text().splitlines()
    assert len(log) == 61 and log[-1].startswith("60,")


def test_run_dir_is_never_clobbered(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["finetune", "model=tiny-llama", "steps=2", "train_examples=16", "eval_examples=4",
            "forgetting_examples=0", f"output_dir={out}"]  # fmt: skip
    assert main(base) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert main(base) == 2
    assert "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main([*base, "--resume", "lr=1e-3"]) == 2
    assert "cannot resume" in (err := capsys.readouterr().err) and "lr: 0.0003 -> 0.001" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert main([*base, "--overwrite", f"task={bad}"]) == 2
    assert "bad.jsonl:2: malformed JSON line" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # three refused commands, not a byte changed

    assert main([*base, "--resume"]) == 0  # a finished run resumes to the same result
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before[
        out / "adapter" / "adapter_model.safetensors"
    ]


def test_gradient_checkpointing_trains_the_same(tokenizer):
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(8)], tokenizer, 4, 16, seed=0)
    a, b = rows_model(), rows_model()
    train(a, data, TrainArgs(steps=2, lr=1e-2), progress=False)
    train(b, data, TrainArgs(steps=2, lr=1e-2, gradient_checkpointing=True), progress=False)
    for n, d in deltas(a).items():
        torch.testing.assert_close(d, deltas(b)[n], rtol=0, atol=1e-6)


def test_bf16_autocast_trains_fp32_deltas_close_to_fp32(tokenizer):
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(8)], tokenizer, 4, 16, seed=0)
    a, b = rows_model(), rows_model()
    train(a, data, TrainArgs(steps=2, lr=1e-2, precision="fp32"), progress=False)
    train(b, data, TrainArgs(steps=2, lr=1e-2, precision="bf16"), progress=False)  # CPU autocast
    for n, d in deltas(b).items():
        assert d.dtype == torch.float32 and d.abs().sum() > 0
        # Adam's first steps move each entry by about lr, so the sign pattern must mostly agree
        agree = (torch.sign(d) == torch.sign(deltas(a)[n])).float().mean()
        assert agree > 0.8, (n, agree)


def test_resume_treats_an_option_the_run_predates_as_its_default(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["finetune", "model=tiny-llama", "steps=2", "train_examples=16", "eval_examples=4",
            "forgetting_examples=0", "save_steps=1", f"output_dir={out}"]  # fmt: skip
    assert main(base) == 0
    (out / "metrics.json").unlink()
    cfg = json.loads((out / "config.json").read_text())
    del cfg["eval_split"]  # as written by a version without the option
    (out / "config.json").write_text(json.dumps(cfg))
    assert main([*base, "--resume"]) == 0
    assert main([*base, "--resume", "eval_split=validation"]) == 2
    assert "eval_split: 'test' -> 'validation'" in capsys.readouterr().err


def test_eval_steps_records_an_eval_curve_that_survives_a_resume(tmp_path):
    out = tmp_path / "run"
    base = ["finetune", "model=tiny-llama", "steps=6", "train_examples=32", "eval_examples=8", "lr=1e-2",
            "forgetting_examples=0", "save_steps=2", "eval_steps=2", "eval_split=validation", f"output_dir={out}"]  # fmt: skip
    assert main(base) == 0
    curve = json.loads((out / "eval_log.json").read_text())
    assert curve["metric"] == "accuracy" and [p["step"] for p in curve["points"]] == [2, 4, 6]
    final = json.loads((out / "metrics.json").read_text())["after"]
    assert curve["points"][-1]["accuracy"] == final["accuracy"]  # the last point is the final evaluation
    assert "accuracy on the validation examples" in (out / "report.html").read_text()  # the curve is drawn
    # resume from step 4: the points up to 4 stay, 6 is evaluated again (the same weights: the same value)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    (out / "metrics.json").unlink()
    assert main([*base, "--resume"]) == 0
    again = json.loads((out / "eval_log.json").read_text())
    assert again == curve


def test_eval_steps_under_a_sharded_launch_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "run"
    args = [
        "finetune",
        "model=tiny-llama",
        "steps=2",
        "eval_steps=1",
        "forgetting_examples=0",
        f"output_dir={out}",
    ]
    assert main(args) == 2
    assert "eval_steps: the model is sharded during FSDP/DeepSpeed training" in capsys.readouterr().err
    assert not out.exists()


def test_precision_auto_follows_the_accelerate_config(monkeypatch):
    from neurontune.errors import NeurontuneError
    from neurontune.train import mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # mixed_precision: bf16 in the config
    assert mixed_precision("auto") == "bf16" and mixed_precision("fp32") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # also a launch without any config
    assert mixed_precision("auto") == (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(NeurontuneError, match="fp16 needs a CUDA GPU"):
            mixed_precision("auto")


def _ema_run(tokenizer, steps, ema_decay, out=None, resume=False, stop_at=None, seen=None):
    model = rows_model()
    data = StepBatches([Example(f"p{i}", f" c{i} d{i}") for i in range(32)], tokenizer, 4, 16, seed=0)
    args = TrainArgs(steps=steps, lr=3e-2, ema_decay=ema_decay, save_steps=2)

    def on_step(row):  # what an evaluation along the training sees
        if seen is not None:
            seen.append(deltas(model))

    def stop_when(log):  # what early stopping keeps; stop_at: a run interrupted after that step
        if seen is not None:
            seen.append(deltas(model))
        return stop_at is not None and len(log) >= stop_at

    train(model, data, args, out, resume=resume, progress=False, on_step=on_step, stop_when=stop_when)
    return deltas(model)


def test_ema_decay_evaluates_keeps_and_returns_the_moving_average(tokenizer):
    raw = []  # without the average: each step's parameters, twice (on_step, stop_when)
    final = _ema_run(tokenizer, 8, 0.0, seen=raw)
    seen = []
    averaged = _ema_run(tokenizer, 8, 0.8, seen=seen)
    expected = {n: torch.zeros_like(t) for n, t in final.items()}  # the deltas start at zero
    for t, params in enumerate(raw[::2], start=1):
        d = min(0.8, (1 + t) / (10 + t))
        expected = {n: d * expected[n] + (1 - d) * params[n] for n in params}
        for got in seen[2 * (t - 1) : 2 * t]:  # the evaluation and early stopping see the average
            for n in got:
                torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-6)
    for n in final:
        torch.testing.assert_close(averaged[n], expected[n], rtol=0, atol=1e-6)
    assert any(not torch.allclose(averaged[n], final[n], atol=1e-4) for n in final)  # not the last step's


def test_ema_decay_resumes_to_the_same_average(tmp_path, tokenizer):
    whole = _ema_run(tokenizer, 8, 0.8)
    _ema_run(
        tokenizer, 8, 0.8, tmp_path, stop_at=4
    )  # stopped after step 4 (its checkpoint holds the average)
    resumed = _ema_run(tokenizer, 8, 0.8, tmp_path, resume=True)
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=0, atol=1e-6)


def test_ema_decay_cannot_resume_a_run_written_without_it(tmp_path, tokenizer):
    from neurontune.errors import NeurontuneError

    _ema_run(tokenizer, 8, 0.0, tmp_path, stop_at=2)
    with pytest.raises(NeurontuneError, match="no moving average"):
        _ema_run(tokenizer, 8, 0.8, tmp_path, resume=True)


def test_ema_decay_out_of_range_is_one_error_line(tmp_path, capsys):
    assert main(["finetune", "model=tiny-llama", "ema_decay=1.0", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["neurontune: error: ema_decay must be in [0, 1) (0: off), got 1.0"]
