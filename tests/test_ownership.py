"""Output paths that are the user's stay the user's (issue #31 items 1-2): a run directory is ours only by
its manifest, ``--overwrite`` removes exactly what the manifest lists, one run holds a directory at a
time, and no command replaces an existing path without ``--overwrite`` -- checked at the final rename."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import neurontune.io as nio
from neurontune.cli import main
from neurontune.errors import NeurontuneError
from neurontune.rundir import LOCK, MANIFEST, run_lock
from tests.test_faults import TINY, one_error_line, run, snapshot


@pytest.fixture
def finished(tmp_path) -> Path:
    out = tmp_path / "run"
    assert run(out) == 0
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


# ---- run directories ------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_finetune_refuses_a_directory_of_user_files(tmp_path, capsys, overwrite):
    out = tmp_path / "u"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "a.bin").write_text("mine")
    (out / "report.md").write_text("my notes")
    before = snapshot(tmp_path)
    assert run(out, *(["--overwrite"] if overwrite else [])) == 2
    one_error_line(capsys.readouterr().err, f"output_dir {out} is not empty and holds no neurontune run")
    assert snapshot(tmp_path) == before


def test_output_dir_dot_in_a_project_deletes_nothing(tmp_path, capsys, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0" * 8)
    (tmp_path / "logs").mkdir()
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(["finetune", *TINY, "steps=2", "output_dir=.", "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, "holds no neurontune run", "logs, model")
    assert snapshot(tmp_path) == before


def test_the_manifest_lists_what_the_run_wrote(finished):
    m = _manifest(finished)
    on_disk = {p.name for p in finished.iterdir()} - {MANIFEST, LOCK}
    assert set(m["outputs"]) == on_disk
    assert {"config.json", "adapter", "metrics.json", "report.md", "report.html"} <= on_disk


def test_overwrite_removes_exactly_the_runs_files(finished, capsys):
    (finished / "notes.txt").write_text("the user's")
    old_adapter = (finished / "adapter" / "adapter_model.safetensors").read_bytes()
    assert run(finished, "lr=1e-2", "--overwrite") == 0
    assert (finished / "notes.txt").read_text() == "the user's"
    assert (finished / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert "notes.txt" not in _manifest(finished)["outputs"]


def test_a_user_file_where_the_run_would_write_is_refused(finished, capsys):
    (finished / "model").mkdir()  # the user's, in a rows run; method=full would write model/
    (finished / "model" / "mine.txt").write_text("keep")
    before = snapshot(finished)
    assert run(finished, "method=full", "--overwrite") == 2
    one_error_line(capsys.readouterr().err, "model was not written by the run there")
    assert snapshot(finished) == before


def test_a_run_of_an_older_version_without_manifest_is_still_ours(finished, capsys):
    (finished / MANIFEST).unlink()
    assert run(finished) == 2
    one_error_line(capsys.readouterr().err, "already holds a run")
    assert run(finished, "method=full", "--overwrite") == 0
    names = {p.name for p in finished.iterdir()}
    assert "model" in names and "adapter" not in names and "neuron_spec.json" not in names


# ---- one run per directory ------------------------------------------------------------------------
def test_a_held_directory_is_refused_naming_the_holder(finished, capsys):
    before = snapshot(finished)
    assert not (finished / LOCK).exists()  # only while a run holds it
    with run_lock(finished):
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert run(finished, *extra) == 2
            one_error_line(
                capsys.readouterr().err, "is in use by another neurontune run", f"pid {os.getpid()}"
            )
    assert snapshot(finished) == before and not (finished / LOCK).exists()
    assert run(finished, "--overwrite") == 0  # released: the next run goes ahead


def test_a_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "since": "long ago"}))
    assert run(out) == 0


@pytest.mark.slow
def test_two_runs_started_together_one_is_refused(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "neurontune.cli", "finetune", *TINY, "steps=2", f"output_dir={out}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "in use by another neurontune run" in err or "already holds a run" in err, err
    config = json.loads((out / "config.json").read_text())
    assert (out / "metrics.json").is_file() and config["output_dir"] == str(out)


# ---- select / eval / analyze / export never replace without --overwrite ----------------------------
def test_select_never_replaces_an_existing_file(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("precious\n")
    args = ["select", "model=tiny-llama", "calib_examples=4", "scorer=magnitude", f"output={data}"]
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, f"{data} already exists", "--overwrite")
    assert data.read_text() == "precious\n"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(data.read_text())["modules"]


def test_eval_output_and_analyze_never_replace_without_overwrite(finished, tmp_path, capsys):
    taken = tmp_path / "metrics.json"
    taken.write_text("mine")
    assert main(["eval", "--adapter", str(finished / "adapter"), "eval_examples=2", "forgetting_examples=0",
                 "--output", str(taken)]) == 2  # fmt: skip
    one_error_line(capsys.readouterr().err, f"{taken} already exists")
    assert taken.read_text() == "mine"
    report = tmp_path / "analysis"
    report.mkdir()
    (report / "report.html").write_text("mine")
    spec = str(finished / "neuron_spec.json")
    assert main(["analyze", "--specs", spec, "--output", str(report)]) == 2
    one_error_line(capsys.readouterr().err, "report.html already exists")
    assert (report / "report.html").read_text() == "mine"
    assert main(["analyze", "--specs", spec, "--output", str(report), "--overwrite"]) == 0
    assert "<html>" in (report / "report.html").read_text()


def test_export_onto_a_dangling_link_keeps_the_link(finished, tmp_path, capsys):
    link = tmp_path / "lora"
    link.symlink_to(tmp_path / "nowhere")
    assert main(["export", "--adapter", str(finished / "adapter"), "--output", str(link), "check=false"]) == 2
    one_error_line(capsys.readouterr().err, f"{link} already exists")
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "nowhere")


# ---- the final rename: a path that appears meanwhile is not replaced -------------------------------
class _Racing:
    """A model whose save_pretrained lets another process create the target first (two merges at once)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def save_pretrained(self, path: str) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"ours")
        self.target.mkdir()
        (self.target / "model.safetensors").write_bytes(b"theirs")


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
def test_the_final_rename_never_replaces_what_appeared_meanwhile(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr(nio, "_libc", False)
    target = tmp_path / "merged"
    with pytest.raises(NeurontuneError, match="already exists"):
        nio.save_pretrained_atomic(target, _Racing(target), replace=False)
    assert (target / "model.safetensors").read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary leftovers
    file = tmp_path / "spec.json"
    with pytest.raises(NeurontuneError, match="already exists"), nio.atomic_path(file, replace=False) as tmp:
        tmp.write_text("ours")
        file.write_text("theirs")
    assert file.read_text() == "theirs"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(NeurontuneError, match="already exists"):
        nio.write_json(dangling, {}, replace=False)
    assert dangling.is_symlink()
    nio.write_json(tmp_path / "new.json", {"a": 1}, replace=False)
    assert json.loads((tmp_path / "new.json").read_text()) == {"a": 1}
    with nio.atomic_dir(tmp_path / "newdir", replace=False) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "newdir" / "x").read_text() == "x"
