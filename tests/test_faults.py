"""Fault injection: kills, a full disk, diverging training, corrupted files, bad input and the
overwrite rules. Every failure ends in exit code 2 and one ``neurontune: error:`` line, and the
outputs that existed before are byte-identical afterwards (or the behaviour is simply correct).

The long variants (more kill points and seeds) are marked ``slow``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neurontune.cli import main
from neurontune.train import list_checkpoints

TINY = ["model=tiny-llama", "train_examples=32", "eval_examples=4", "forgetting_examples=0", "batch_size=4"]


def run(out: Path, *extra: str) -> int:
    return main(["finetune", *TINY, "steps=4", f"output_dir={out}", *extra])


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def one_error_line(err: str, *expected: str) -> None:
    """stderr ends in exactly one error line (progress bars aside) holding every ``expected`` text."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("neurontune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for text in expected:
        assert text in errors[0], (text, errors[0])


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "run"
    assert run(out, "lr=1e-2") == 0
    return out


# ---- merge and --overwrite never lose work ---------------------------------------------------------
def test_merge_never_replaces_an_existing_path_without_overwrite(finished, tmp_path, capsys):
    adapter = str(finished / "adapter")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me too")
    before = snapshot(tmp_path)
    for out in (target, a_file, finished):
        assert main(["merge", "--adapter", adapter, "--output", str(out)]) == 2
        one_error_line(capsys.readouterr().err, str(out))
    assert main(["merge", "--adapter", adapter, "--output", adapter, "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, "would replace the adapter")
    assert snapshot(tmp_path) == before
    assert main(["merge", "--adapter", adapter, "--output", str(target), "--overwrite"]) == 0
    assert (target / "config.json").is_file() and not (target / "precious.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_overwrite_with_another_method_leaves_nothing_stale(finished, capsys):
    assert (finished / "adapter").is_dir() and (finished / "neuron_spec.json").is_file()
    assert run(finished, "method=full", "--overwrite") == 0
    names = {p.name for p in finished.iterdir()}
    assert "model" in names and not names & {"adapter", "neuron_spec.json", "neuron_spec.scores.safetensors"}
    capsys.readouterr()
    assert main(["eval", "--adapter", str(finished / "adapter")]) == 2  # the old adapter is gone
    one_error_line(capsys.readouterr().err, "adapter directory not found")


# ---- training that diverges -------------------------------------------------------------------------
def test_nan_loss_stops_at_once_keeps_the_last_good_checkpoint_and_saves_nothing(
    tmp_path, capsys, monkeypatch
):
    import neurontune.train as train_mod

    real, calls = train_mod.token_loss, {"n": 0}

    def poisoned(model, batch, n_tokens):
        calls["n"] += 1
        loss = real(model, batch, n_tokens)
        return loss * float("nan") if calls["n"] >= 5 else loss  # the 5th step's loss is NaN

    monkeypatch.setattr(train_mod, "token_loss", poisoned)
    out = tmp_path / "run"
    assert run(out, "steps=10", "save_steps=2", "eval_before=false") == 2
    one_error_line(capsys.readouterr().err, "training diverged at step 5", "step-000004", "is kept")
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    tensors = load_file(list_checkpoints(out)[-1] / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_a_huge_learning_rate_is_caught_not_saved(tmp_path, capsys):
    out = tmp_path / "run"
    rc = run(out, "steps=40", "lr=1e6", "max_grad_norm=0", "eval_before=false", "save_steps=0")
    err = capsys.readouterr().err
    assert rc == 2, "lr=1e6 did not diverge in 40 steps"
    one_error_line(err, "training diverged at step")
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_metrics_json_is_strict_json(tmp_path):
    from neurontune.io import write_json

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.5})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2.5}
    assert "NaN" not in text and "Infinity" not in text


def test_an_adapter_with_nan_values_is_refused(finished, capsys):
    f = finished / "adapter" / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith(".rowtune_delta"))
    t[key][0, 0] = float("nan")
    save_file(t, f)
    assert main(["eval", "--adapter", str(finished / "adapter"), "model=tiny-llama"]) == 2
    module = key.removeprefix("base_model.model.").removesuffix(".rowtune_delta")
    one_error_line(capsys.readouterr().err, "NaN or infinite", module)


# ---- data -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text,label\ngood film,pos\nbad film,\nfine,neg\n", "bad.csv:3: empty label"),
        ("text,label\na,\nb,\n", "bad.csv:2: empty label"),
        ("text,label\na,pos\nb,pos\nc,pos\n", "every label is 'pos'"),
    ],
)
def test_bad_labels_are_refused(tmp_path, capsys, content, expected):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    assert run(tmp_path / "r", f"task={f}") == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "r").exists()


def test_records_of_another_shape_later_in_the_file_are_refused(tmp_path, capsys):
    f = tmp_path / "mixed.jsonl"
    lines = [{"text": "plain text first"}] + [
        {"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(6)
    ]
    f.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert run(tmp_path / "r", f"task={f}") == 2
    one_error_line(capsys.readouterr().err, "mixed.jsonl:2: a 'classification' record in a 'text' file")


def test_resume_refuses_a_changed_data_file(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    assert run(out, f"task={f}", "save_steps=1") == 0
    before = snapshot(out)
    f.write_text(f.read_text().replace("a3", "changed"))
    assert run(out, f"task={f}", "save_steps=1", "--resume") == 2
    one_error_line(capsys.readouterr().err, "the data changed since the run started", str(f))
    assert snapshot(out) == before


# ---- one clear line for every kind of bad input -----------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["template={text} {oops"], "not a valid format string"),
        (["template=no placeholder"], "has no {text} placeholder"),
        (["lr=nan"], "lr must be a finite number"),
        (["lr=inf"], "lr must be a finite number"),
        (["weight_decay=-0.1"], "weight_decay must be >= 0"),
        (["method=lora", "lora_dropout=2"], "lora_dropout must be in [0, 1)"),
        (["lr_scheduler=reduce_lr_on_plateau"], "lr_scheduler='reduce_lr_on_plateau' is not one of"),
        (["scorer=neft", "scorer_options=probe_steps=-1"], "probe_steps must be a positive integer"),
        (["method=neft", "scorer=fisher"], "method=neft always scores with the NeFT probe"),
        # set to the default value is still set: the user asked for something the method will not do
        (["method=neft", "scorer=taylor"], "method=neft always scores with the NeFT probe"),
        (["method=lora", "--scorer", "taylor"], "scorer='taylor' is a selection (rows, neft) option"),
        (["method=lora", "spec=some_spec.json"], "spec='some_spec.json' is a rows, neft option"),
        (["method=lora", "scorer=fisher"], "scorer='fisher' is a selection (rows, neft) option; method=lora"),
        (["method=gates", "recover_steps=100"], "recover_steps is for recover=distill"),
        (["method=rows", "gate_sparsity=0.5"], "gate_sparsity=0.5 is a gates option; method=rows"),
        (["eval_fraction=1.5"], "eval_fraction must be between 0 and 1"),
    ],
)
def test_bad_options_fail_before_anything_is_written(tmp_path, capsys, args, expected):
    out = tmp_path / "r"
    assert run(out, *args) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not out.exists()


def test_non_utf8_yaml_config(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_bytes(b"steps: 3\nlr: \xff\xfe\n")
    assert main(["finetune", "--config", str(y), *TINY, f"output_dir={tmp_path / 'r'}"]) == 2
    one_error_line(capsys.readouterr().err, str(y))


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert run(out) == 2
        one_error_line(capsys.readouterr().err, str(f))
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run(ro / "run") == 2
        one_error_line(capsys.readouterr().err, str(ro))
    finally:
        ro.chmod(0o700)


def test_unknown_model_fails_fast_when_the_hub_is_unreachable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    assert main(["finetune", "model=no-such-org/no-such-model", f"output_dir={tmp_path / 'r'}"]) == 2
    assert time.perf_counter() - t0 < 10
    one_error_line(
        capsys.readouterr().err, "the Hugging Face Hub is unreachable", "no-such-org/no-such-model"
    )


# ---- a full disk ------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]) if len(args) > 1 else None)


def test_full_disk_while_checkpointing_keeps_the_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}

    def fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # spec scores, checkpoint 1 ... then the disk is full
            _enospc(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)  # neurontune.io's writer
    out = tmp_path / "run"
    assert run(out, "steps=4", "save_steps=2", "eval_before=false") == 2
    one_error_line(capsys.readouterr().err, "No space left on device")
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_full_disk_during_merge_keeps_the_old_output(finished, tmp_path, capsys, monkeypatch):
    target = tmp_path / "merged"
    assert main(["merge", "--adapter", str(finished / "adapter"), "--output", str(target)]) == 0
    before = snapshot(tmp_path / "merged")
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _enospc)
    assert (
        main(["merge", "--adapter", str(finished / "adapter"), "--output", str(target), "--overwrite"]) == 2
    )
    one_error_line(capsys.readouterr().err, "No space left on device")
    assert snapshot(target) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_real_full_disk_on_a_small_tmpfs(tmp_path, capsys):
    """With the right to mount (root, not in every container), a 300 KiB tmpfs really fills up: the
    full fine-tuning checkpoint of tiny-llama (weights + two AdamW moments) needs about 420 KiB."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        (mnt / "earlier.txt").write_text("earlier output")
        assert run(mnt / "run", "method=full", "eval_before=false", "save_steps=0") == 2
        one_error_line(capsys.readouterr().err, "No space left on device")
        assert (mnt / "earlier.txt").read_text() == "earlier output"
        assert not list((mnt / "run" / "checkpoints").iterdir())  # no half-written checkpoint left
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---- corrupted and truncated files ------------------------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


@pytest.mark.parametrize(
    ("target", "command", "expected"),
    [
        ("checkpoint-state", "resume", "checkpoint state"),
        ("checkpoint-tensors", "resume", "checkpoint tensors"),
        ("config", "resume", "run config"),
        ("spec", "spec", "not valid JSON"),
        ("adapter-config", "eval", "adapter config"),
        ("adapter-tensors", "eval", "adapter weights"),
    ],
)
def test_truncated_files_give_one_line(tmp_path, capsys, target, command, expected):
    out = tmp_path / "run"
    assert run(out, "save_steps=2", "lr=1e-2") == 0
    path = {
        "checkpoint-state": lambda: list_checkpoints(out)[-1] / "state.json",
        "checkpoint-tensors": lambda: list_checkpoints(out)[-1] / "state.safetensors",
        "config": lambda: out / "config.json",
        "spec": lambda: out / "neuron_spec.json",
        "adapter-config": lambda: out / "adapter" / "adapter_config.json",
        "adapter-tensors": lambda: out / "adapter" / "adapter_model.safetensors",
    }[target]()
    _truncate(path)
    before = snapshot(out)
    capsys.readouterr()
    if command == "resume":
        rc = run(out, "save_steps=2", "lr=1e-2", "--resume")
    elif command == "spec":
        rc = run(tmp_path / "other", f"spec={path}")
    else:
        rc = main(["eval", "--adapter", str(out / "adapter"), "model=tiny-llama"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, expected)
    assert snapshot(out) == before


def test_non_utf8_data_file(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "\xff"}\n')
    assert run(tmp_path / "r", f"task={f}") == 2
    one_error_line(capsys.readouterr().err, "d.jsonl")


# ---- file modes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_and_directory_written_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert run(out, "save_steps=2", "save_merged=true") == 0
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths) and (out / "checkpoints").is_dir()
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)))


# ---- checkpoints: save_steps=0, partial writes, kills ----------------------------------------------
def test_save_steps_zero_still_writes_the_final_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run(out, "save_steps=0") == 0
    assert [p.name for p in list_checkpoints(out)] == ["step-000004"]


CMD = ["finetune", *TINY, "steps=24", "save_steps=2", "lr=3e-3", "lr_scheduler=cosine", "eval_before=false"]
# the killed run's steps are compared bit for bit with steps run in this process: the same thread count,
# since CPU kernels split their reductions by thread (1 against 2 threads differ by ~1e-8 on tiny-llama);
# MKL's too (an MKL_NUM_THREADS=1 in the caller's environment made the child's matmuls differ)
THREADS = str(torch.get_num_threads())
ENV = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "TQDM_DISABLE": "1"}
# a run that kills itself (SIGKILL) inside the k-th checkpoint write, after the tensors are written and
# before the directory is renamed into place: what a power cut at that moment leaves
KILL_IN_CHECKPOINT = """
import os, signal, sys
import neurontune.train as t
real, seen = t.write_json, {"n": 0}
def write_json(path, obj):
    if str(path).endswith("state.json"):
        seen["n"] += 1
        if seen["n"] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, obj)
t.write_json = write_json
from neurontune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full") / "run"
    assert main([*CMD, f"output_dir={out}"]) == 0
    return _adapter(out)


def _resume_and_compare(out: Path, reference: dict[str, torch.Tensor]) -> None:
    assert main([*CMD, f"output_dir={out}", "--resume"]) == 0
    got = _adapter(out)
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), k
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("k", [1, 3])
def test_kill_inside_a_checkpoint_write_then_resume_is_exact(tmp_path, uninterrupted, k):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHECKPOINT, str(k), *CMD, f"output_dir={out}"],
        env=ENV,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert partial, "the kill left no half-written checkpoint to clean up"
    assert len(list_checkpoints(out)) == min(k - 1, 2)
    _resume_and_compare(out, uninterrupted)


def _newest_step(out: Path) -> int:
    done = list_checkpoints(out)
    return int(done[-1].name.split("-")[1]) if done else 0


def _kill_at_random(out: Path, seed: int) -> None:
    rng = random.Random(seed)
    proc = subprocess.Popen([sys.executable, "-m", "neurontune.cli", *CMD, f"output_dir={out}"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # wait for the first two checkpoints (steps 2 and 4: training runs, and one save interval's time is
    # known), then a random moment of the next 8 intervals (steps 4-20 of 24): a fixed window (0.6 s)
    # outlasted the whole rest of the run on a fast CPU, which then finished before the kill
    deadline, times = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None and len(times) < 2:
        if len(list_checkpoints(out)) > len(times):
            times.append(time.time())
        time.sleep(0.002)
    # ... and before the checkpoint of step 20 whatever the CPU's speed does meanwhile (other work that
    # slowed the measured interval and then stopped let the run finish before a kill)
    until = time.time() + rng.uniform(0.0, 8 * (times[-1] - times[0]) if len(times) == 2 else 0.0)
    while time.time() < until and proc.poll() is None and _newest_step(out) < 20:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(out) and not (out / "metrics.json").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_moment_then_resume_is_exact(tmp_path, uninterrupted, seed):
    out = tmp_path / "run"
    _kill_at_random(out, seed)
    _resume_and_compare(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 10))
def test_kill_at_a_random_moment_then_resume_is_exact_many_seeds(tmp_path, uninterrupted, seed):
    out = tmp_path / "run"
    _kill_at_random(out, seed)
    _resume_and_compare(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4, 6, 8, 12])
def test_kill_inside_every_checkpoint_write_slow(tmp_path, uninterrupted, k):
    test_kill_inside_a_checkpoint_write_then_resume_is_exact(tmp_path, uninterrupted, k)
