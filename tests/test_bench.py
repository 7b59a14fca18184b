"""The helpers every benchmark shares: the command it records and how it writes its results."""

import json
import shlex
import sys

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
