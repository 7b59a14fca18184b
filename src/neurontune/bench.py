"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import threading
import time


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
