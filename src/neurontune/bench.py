"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import functools
import subprocess
import threading
import time
from pathlib import Path


class PeakRSS:
    """Peak resident set size of this process while the ``with`` block runs (a 2 ms sampling thread).

    On CPU torch keeps no allocator statistics, so RSS is what we can measure; subtract a baseline
    taken before the work to get the work's own peak.
    """

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def run_worker(cmd: list[str]) -> dict:
    """Run a benchmark worker subprocess; its last stdout line is a JSON object. Exits on failure."""
    import json
    import subprocess
    import sys

    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def finetune_run(overrides: list[str], out: Path, reuse: bool = False, threads: int | None = None) -> dict:
    """``neurontune finetune <overrides> output_dir=<out>`` in a fresh subprocess; returns its metrics
    (plus ``wall_seconds``, None when reused, and ``source``, the code it ran: :func:`run_source`). With
    ``reuse``, a finished run in ``out`` made with the same overrides and the same library code
    (:func:`same_source`) is read instead of run again; one made with other code runs again. ``threads`` caps the subprocess's CPU threads (for
    several runs at once). Exits with the run's stderr if it fails."""
    import json
    import os
    import sys

    cmd = [
        sys.executable,
        "-m",
        "neurontune.cli",
        "finetune",
        *overrides,
        f"output_dir={out}",
        "overwrite=true",
    ]
    stamp = out / "source.json"  # the code the run in ``out`` ran (run_source), written after it finished
    if reuse and (out / "metrics.json").is_file() and _same_run(out, overrides):
        made_at = json.loads(stamp.read_text()).get("source") if stamp.is_file() else None
        if same_source(made_at):
            m = json.loads((out / "metrics.json").read_text())
            m["wall_seconds"], m["source"] = None, made_at
            m["command"] = finetune_command(overrides, out)
            return m
        print(f"{out}: made with other code ({made_at or 'not on record'}); running it again", flush=True)
    source = run_source()
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"], m["source"] = time.perf_counter() - t0, source
    stamp.write_text(json.dumps({"source": source}) + "\n")
    m["command"] = finetune_command(overrides, out)
    return m


def finetune_command(overrides: list[str], out: Path) -> str:
    """The command line a :func:`finetune_run` records for its run (one string, to match runs by)."""
    return "neurontune finetune " + " ".join([*overrides, f"output_dir={out}"])


def _same_run(out: Path, overrides: list[str]) -> bool:
    """Whether ``out/config.json`` agrees with every ``key=value`` override."""
    import json

    saved = json.loads((out / "config.json").read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        if str(saved.get(key)).lower() != value.lower() and not _num_eq(saved.get(key), value):
            return False
    return True


def _num_eq(a: object, b: str) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def add_run_args(p, runs: str, out: Path, name: str, also_rendered: str = "") -> None:
    """The options every finetune-running benchmark shares (data sizes, run and result folders,
    --reuse, --render of ``<name>.md``, and of ``also_rendered`` files, from ``<name>.json``)."""
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--forgetting-examples", type=int, default=32)
    p.add_argument("--runs", type=Path, default=Path(runs))
    p.add_argument("--out", type=Path, default=out)
    p.add_argument(
        "--reuse", action="store_true", help="keep finished runs in --runs made with the same settings"
    )
    rebuilt = f"{name}.md" + (f" and {also_rendered}" if also_rendered else "")
    p.add_argument("--render", action="store_true", help=f"only rebuild {rebuilt} from {name}.json")


def command_line(script: str) -> str:
    """How this benchmark was started, as a line a shell can run again (arguments with spaces quoted)."""
    import os
    import shlex
    import sys

    return shlex.join(["python", os.path.relpath(script), *sys.argv[1:]])


REPO = Path(__file__).resolve().parents[2]  # the checkout this package runs from (src/neurontune/bench.py)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)


def code_commit() -> str:
    """The short hash of the checked-out commit (``git rev-parse --short HEAD``), for a result's header."""
    return _git("rev-parse", "--short", "HEAD").stdout.strip()


def run_source() -> str | None:
    """The code a run made now runs: the checked-out commit, ``<commit>-dirty`` when ``src/`` has
    uncommitted changes (as ``git describe --dirty`` marks them), None outside a git checkout."""
    commit = code_commit()
    if not commit:
        return None
    return f"{commit}-dirty" if _git("status", "--porcelain", "--", "src").stdout.strip() else commit


@functools.lru_cache(maxsize=64)
def _src_unchanged_since(commit: str) -> bool:
    return _git("diff", "--quiet", commit, "--", "src").returncode == 0


def same_source(source: str | None) -> bool:
    """Whether a run made at ``source`` (:func:`run_source`) ran the library code checked out now: a
    commit whose ``src/`` equals today's working tree. A dirty or unknown source never does: its code is
    not on record. What decides whether an earlier run may stand in for a new one."""
    return bool(source) and not source.endswith("-dirty") and _src_unchanged_since(source)


def machine() -> str:
    """The CPU and its core count, for a result's header."""
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def write_results(out: Path, name: str, result: dict, render, echo: bool = True) -> None:
    """``out/<name>.json`` and ``out/<name>.md`` (``render(result)``), each replaced atomically (a
    benchmark stopped mid-write keeps its previous results), and print the table."""
    import json

    from neurontune.io import atomic_path

    md = render(result)  # before writing anything: a render error leaves both old files in place
    for path, text in ((out / f"{name}.json", json.dumps(result, indent=2) + "\n"), (out / f"{name}.md", md)):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    if echo:
        print(md)


def render_only(out: Path, name: str, render) -> None:
    """Rebuild ``out/<name>.md`` from ``out/<name>.json`` with ``render``."""
    import json

    (out / f"{name}.md").write_text(render(json.loads((out / f"{name}.json").read_text())))
