"""A run directory that is the run's alone: a manifest of what the run wrote, and a lock held for its life.

A directory is a run's only if its manifest (``neurontune_run.json``, written before anything else) says
so. ``finetune`` refuses a non-empty directory without one, ``--overwrite`` or not, and ``--overwrite``
removes exactly the names the manifest lists, so a user's own files next to a run survive. The lock
(``fcntl.flock`` on ``.neurontune.lock``, which records the holder's PID and host) is held by ``finetune``
(and ``--resume``) until it returns; the kernel releases it when the process dies, so the stale lock file
of a killed run never blocks. Needs no torch: it runs before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from neurontune.errors import NeurontuneError
from neurontune.io import make_dir, read_json, remove, write_json

MANIFEST = "neurontune_run.json"
LOCK = ".neurontune.lock"
MANIFEST_FORMAT = "neurontune-run-v1"


def _ours_temporary(name: str, names: Iterable[str]) -> bool:
    """A leftover of an interrupted atomic write of one of ``names`` (``.NAME.*.tmp``, ``.NAME.old``)."""
    return name.startswith(".") and any(
        name == f".{n}.old" or (name.startswith(f".{n}.") and name.endswith(".tmp")) for n in names
    )


def manifest(out: Path, legacy_names: Iterable[str] = ()) -> list[str] | None:
    """The names a run in ``out`` wrote, or ``None`` if ``out`` holds no run's manifest. A run of an older
    neurontune (a ``config.json`` it wrote, no manifest) counts as ours, with ``legacy_names`` present."""
    path = out / MANIFEST
    if path.is_file():
        data = read_json(path, "run manifest")
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise NeurontuneError(f"{path}: not a neurontune run manifest")
        return [str(n) for n in data.get("outputs", [])]
    cfg = out / "config.json"
    if cfg.is_file():
        try:
            old = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(old, dict) and "neurontune_version" in old:
            return [n for n in legacy_names if os.path.lexists(out / n)]
    return None


def foreign_entries(out: Path, owned: Iterable[str]) -> list[str]:
    """Entries of ``out`` that no run wrote (the manifest, the lock and our temporary files excepted)."""
    owned = set(owned)
    if not out.is_dir():
        return []
    return sorted(
        e
        for e in os.listdir(out)
        if e not in owned and e not in (MANIFEST, LOCK) and not _ours_temporary(e, owned)
    )


def refuse_run_dir(path: str | Path, what: str) -> None:
    """A run directory (:func:`manifest`) given where a model or adapter belongs: say which of its outputs
    to use instead."""
    path = Path(path)
    if not path.is_dir() or manifest(path) is None:
        return
    flags = {
        "adapter": "--adapter ",
        "merged": "model=",
        "model": "model=",
        "pruned": "model=",
        "recovered": "model=",
    }
    found = [f"{flag}{path / n}" for n, flag in flags.items() if (path / n).is_dir()]
    hint = f"; use {' or '.join(found)}" if found else " (it holds no model output yet)"
    raise NeurontuneError(f"{path} is a neurontune run directory, not {what}{hint}")


def check_run_dir(out: Path, names: Iterable[str], legacy_names: Iterable[str]) -> list[str] | None:
    """Refuse an ``output_dir`` that holds files no neurontune run wrote; returns its manifest's names
    (``None``: a new or empty directory). ``names``: what this run may write; one of them held by a file
    of the user's (next to a run) is refused too, so that nothing of the user's is ever replaced."""
    names = list(names)
    listed = manifest(out, legacy_names)
    foreign = foreign_entries(out, listed or [])
    if listed is None and foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise NeurontuneError(
            f"output_dir {out} is not empty and holds no neurontune run ({shown}); --overwrite only replaces "
            "a run's own files, so choose a new or empty output_dir (or move these away)"
        )
    if clash := [n for n in names if n in foreign]:
        raise NeurontuneError(
            f"output_dir {out}: {', '.join(clash)} was not written by the run there and this run would "
            "write it; move it away or choose another output_dir"
        )
    return listed


def clear_run(out: Path, listed: Iterable[str]) -> None:
    """``--overwrite``: remove exactly the names the run's manifest lists (and their temporary files)."""
    listed = list(listed)
    for name in listed:
        remove(out / name)
    for e in os.listdir(out):
        if _ours_temporary(e, listed):
            remove(out / e)
    remove(out / MANIFEST)


def write_manifest(out: Path, names: Iterable[str]) -> None:
    """The run's claim on ``names`` in ``out``: what it will write when it starts, what it wrote when it
    ends."""
    write_json(out / MANIFEST, {"format": MANIFEST_FORMAT, "outputs": sorted(set(names))})


def finished_outputs(out: Path, names: Iterable[str]) -> list[str]:
    """Of the names a run claimed, those it wrote (what the finished manifest lists)."""
    return [n for n in names if os.path.lexists(out / n)]


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s advisory lock for the block; a second holder gets one line naming the first.
    The lock file is removed when the block ends (it exists only while a run holds it)."""
    created = not out.exists()
    make_dir(out)
    path = out / LOCK
    fd = _lock(out, path)
    if fd is None:  # a filesystem without flock: run unlocked rather than not at all
        yield
        return
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no one waits on a file that is gone
        os.close(fd)
        if created:  # refused before writing anything: leave no empty directory behind
            with contextlib.suppress(OSError):
                out.rmdir()


def _lock(out: Path, path: Path) -> int | None:
    """The descriptor of ``path``, exclusively locked (``None``: the filesystem cannot lock)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NeurontuneError(
                f"output_dir {out} is in use by another neurontune run ({_holder(path)}); wait for it to end "
                "or choose another output_dir"
            ) from None
        except OSError as e:
            os.close(fd)
            print(f"warning: cannot lock {out} ({e.strerror}); nothing stops a second run there")
            return None
        try:  # the file we locked may have been removed by a holder that just ended: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"
