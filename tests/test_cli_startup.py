"""The command line answers at once (issue #31 item 6): ``--help``, ``--version`` and every option error
come before torch or transformers is imported; the torch-free name lists agree with what they name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
from neurontune.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out.append([rc, sorted(m for m in ("torch", "transformers", "peft", "accelerate", "numpy") if m in sys.modules)])
print("RESULT" + json.dumps(out))
"""

ARGVS = [
    ["--help"],
    ["--version"],
    ["finetune", "--help"],
    ["finetune", "stepz=4"],
    ["finetune", "steps=-1"],
    ["finetune", "scorer=taylr"],
    ["finetune", "method=lorra"],
    ["finetune", "lr_scheduler=cosin"],
    ["finetune", "method=gates", "gate_sparsity=1.5"],
    ["finetune", "method=gates", "spec=x"],
    ["finetune", "dtype=fp8"],
    ["select", "calib_examples=0"],
    ["eval", "quantization=nf5"],
    ["merge"],
    ["export", "--adapter", "a"],
    ["analyze"],
    ["frobnicate"],
]


def test_help_version_and_option_errors_never_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(ARGVS)], capture_output=True, text=True, timeout=120
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    results = json.loads(line.removeprefix("RESULT"))
    for argv, (rc, heavy) in zip(ARGVS, results, strict=True):
        assert rc == (0 if argv[-1] in ("--help", "--version") else 2), (argv, rc, proc.stderr)
        assert heavy == [], (argv, heavy)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("neurontune: error:")]
    assert len(errors) == 14 and "Traceback" not in proc.stderr, proc.stderr
    assert "did you mean 'steps'" in proc.stderr and "did you mean 'taylor'" in proc.stderr


EXIT = r"""
import atexit, sys
atexit.register(lambda: print("finalized"))
print("before the job")  # stdout into a pipe is block-buffered: run() must flush it
from neurontune.cli import run
run(sys.argv[1:])
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_one_process_of_several_exits_flushed_without_finalizing_the_interpreter(world_size):
    """A process launched as one of several ends by os._exit (gloo's threads can abort a finalizing
    interpreter: cli.run), its output flushed; a lone process exits normally, atexit handlers run."""
    proc = subprocess.run(
        [sys.executable, "-c", EXIT, "finetune", "stepz=4"],
        env={**os.environ, "WORLD_SIZE": world_size}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "neurontune: error: " in proc.stderr, proc.stderr
    assert "before the job" in proc.stdout
    assert ("finalized" in proc.stdout) == (world_size == "1"), proc.stdout


def test_the_torch_free_names_agree_with_what_they_name():
    from transformers import SchedulerType

    from neurontune import choices
    from neurontune.rowtune.layer import IMPLS
    from neurontune.scoring import SCORERS

    assert set(choices.SCHEDULERS) == {t.value for t in SchedulerType} - {"reduce_lr_on_plateau"}
    assert IMPLS == choices.IMPLS
    assert set(choices.BUILTIN_SCORERS) <= set(SCORERS)
    import neurontune.models as models

    assert set(models._DTYPES) == set(choices.DTYPE_NAMES)


def test_a_scorer_registered_from_python_is_a_choice():
    from neurontune import choices
    from neurontune.scoring import SCORERS, register

    @register("test-only-scorer")
    def _factory(**_):  # pragma: no cover - never called
        raise AssertionError

    try:
        assert "test-only-scorer" in choices.scorer_names()
    finally:
        SCORERS.pop("test-only-scorer")


def test_import_neurontune_is_light_and_its_names_still_resolve():
    code = (
        "import sys, neurontune; assert 'torch' not in sys.modules; "
        "from neurontune import NeuronSpec, get_rowtune_model, RowTuneConfig; "
        "assert 'torch' in sys.modules and NeuronSpec.__name__ == 'NeuronSpec'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
