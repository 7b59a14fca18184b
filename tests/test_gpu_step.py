"""The step-time benchmarks (benchmarks/gpu_step.py, benchmarks/finetune_speed.py) on a CPU at tiny shapes:
failed cells are recorded rather than fatal, --append re-measures cells in place, and the end-to-end
finetune comparison writes its table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow  # ~1.3 min; in .ci/run
def test_a_failed_cell_is_recorded_and_append_replaces_a_cell_measured_again(tmp_path):
    common = [
        "--precisions",
        "fp32",
        "--repeats",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(tmp_path),
    ]
    res = _bench("gpu_step.py", "--models", "tiny-llama", "nope", "--methods", "rows-fused", "lora", *common)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    first = json.loads((tmp_path / "gpu_step.json").read_text())
    assert len(first["runs"]) == 4
    failed = [r for r in first["summary"] if r.get("failed")]
    assert {r["model"] for r in failed} == {"nope"} and len(failed) == 2
    md = (tmp_path / "gpu_step.md").read_text()
    assert "| nope | | fp32 | no | lora | | KeyError: 'nope' |" in md
    old = next(r for r in first["runs"] if r["model"] == "tiny-llama" and r["method"] == "rows-fused")

    res = _bench("gpu_step.py", "--models", "tiny-llama", "--methods", "rows-fused", "--append", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    second = json.loads((tmp_path / "gpu_step.json").read_text())
    assert len(second["runs"]) == 4  # the re-measured cell replaced, the others kept
    new = next(r for r in second["runs"] if r["model"] == "tiny-llama" and r["method"] == "rows-fused")
    assert new["step_times"] != old["step_times"]
    assert "` then `" in second["meta"]["command"]


@pytest.mark.slow  # about 20 s: three finetune runs
def test_finetune_speed_end_to_end_on_a_cpu(tmp_path):
    res = _bench("finetune_speed.py", "--steps", "2", "--max-length", "32", "--batch-size", "2",
                 "--runs", str(tmp_path / "runs"), "--out", str(tmp_path))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "finetune_speed.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["rows", "lora", "full"]
    rows, lora, full = result["runs"]
    assert (
        rows["trainable_params"] < full["trainable_params"]
        and lora["trainable_params"] < full["trainable_params"]
    )
    assert all(r["train_seconds"] > 0 and r["tokens_per_second"] > 0 for r in result["runs"])
    md = (tmp_path / "finetune_speed.md").read_text()
    assert md.count("\n| rows |") == 1 and "tiny-llama" in md
