"""Safe file I/O: atomic writes, and loading that only ever reads JSON or safetensors."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurontune.errors import NeurontuneError

if TYPE_CHECKING:  # imported where used: the command line reads this module before torch is imported
    import torch


def cache_dir() -> Path:
    """Where converted models and extracted datasets live: ``$NEURONTUNE_CACHE`` or ``~/.cache/neurontune``."""
    return Path(os.environ.get("NEURONTUNE_CACHE", Path.home() / ".cache" / "neurontune"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def respect_umask(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes ``open()`` / ``mkdir()`` would have given it.

    Temporary files and directories are created 0600 / 0700, and safetensors writes 0600 whatever the
    umask: without this, a shared adapter or checkpoint would be unreadable to other users.
    """
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def exists_error(path: str | os.PathLike) -> NeurontuneError:
    return NeurontuneError(f"{path} already exists; choose another path or pass --overwrite to replace it")


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """The early check of a command's output (before any work): ``path`` must be new unless ``overwrite``.
    The final rename checks again (:func:`rename_new`), so a path that appears meanwhile is not replaced."""
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100
_libc: Any = None


def rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist (not even as a dangling link), in one
    step: Linux's ``renameat2(RENAME_NOREPLACE)``. Where the kernel or filesystem lacks it, a hard link
    (files; fails if ``dst`` exists) or a check just before the rename (directories) stands in."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise exists_error(dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        if os.path.lexists(dst):
            raise exists_error(dst)
        os.rename(src, dst)
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise exists_error(dst) from None
    src.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` in one step
    (``replace=False``: only if ``path`` does not exist by then, else :class:`NeurontuneError`).

    A crash or exception leaves the previous file (if any) untouched and removes the temporary one.
    """
    path = Path(path)
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        respect_umask(tmp_path)
        if replace:
            os.replace(tmp_path, path)
        else:
            rename_new(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_dir(path: Path) -> None:
    """``mkdir -p`` that says which path is in the way when a file sits where a directory should be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NeurontuneError(f"{path} exists and is not a directory") from None
    except NotADirectoryError:
        bad = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise NeurontuneError(f"{bad} is a file, not a directory (needed for {path})") from None


def save_pretrained_atomic(
    path: str | os.PathLike, model: Any, tokenizer: Any = None, replace: bool = True
) -> Path:
    """``model.save_pretrained`` (and the tokenizer's) into ``path`` in one atomic step."""
    from safetensors import SafetensorError

    with atomic_dir(path, replace) as tmp:
        try:
            model.save_pretrained(tmp)
        except SafetensorError as e:  # e.g. "No space left on device", raised by safetensors as its own type
            raise NeurontuneError(f"could not write {path}: {e}") from None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (an existing one is swapped out last;
    ``replace=False``: it is renamed to ``path`` only if nothing is there by then)."""
    path = Path(path)
    make_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        swap_in(tmp, path, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, path: Path, replace: bool = True) -> None:
    """Rename the finished directory ``tmp`` to ``path`` (an existing one is swapped out last;
    ``replace=False``: only if nothing is there by then)."""
    respect_umask(tmp)
    if not replace:
        rename_new(tmp, path)
    elif path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old")
        remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file, link or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike, obj: Any, replace: bool = True) -> None:
    """Strict JSON: a NaN or infinity is written as ``null`` (bare ``NaN`` is not JSON)."""
    with atomic_path(path, replace) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise NeurontuneError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeurontuneError(f"{what} {path} is not valid JSON: {e}") from None


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], replace: bool = True
) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path, replace) as tmp:
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
            )
        except SafetensorError as e:  # e.g. "No space left on device", raised by safetensors as its own type
            raise NeurontuneError(f"could not write {path}: {e}") from None


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise NeurontuneError(f"{what} not found: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise NeurontuneError(f"{what} {path} is corrupted or not a safetensors file: {e}") from None
