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


# safetensors' names for torch's dtypes (its format's "dtype" field)
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL",
}  # fmt: skip


class StreamedWeights:
    """A model's weights written as transformers writes them (one ``model.safetensors``, or files of at
    most ``max_shard_bytes`` each, ``model-0000i-of-0000n.safetensors``, with
    ``model.safetensors.index.json``), a part of a tensor at a time, for a model no process holds whole.
    ``entries`` announce every tensor (name, dtype, shape) in the order its bytes will come; each file's
    header is written from them first, then :meth:`write` appends bytes: the next tensor whole, or its
    next rows (an embedding gathered piece by piece). :meth:`close` checks that every byte came. The
    safetensors library writes only from tensors it holds, so the format's header (a little-endian u64
    length, then JSON with each tensor's dtype, shape and byte range) is written here."""

    def __init__(
        self, directory: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = 50 * 10**9,
    ) -> None:  # fmt: skip
        import torch

        self.directory = Path(directory)
        sized = []
        for name, dtype, shape in entries:
            if str(dtype).removeprefix("torch.") not in _SAFETENSORS_DTYPES:
                raise NeurontuneError(f"{name}: safetensors has no dtype {dtype}")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            sized.append((name, dtype, tuple(shape), size))
        self.files: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        for entry in sized:  # a tensor larger than the limit gets a file of its own, as transformers does
            if self.files[-1] and sum(e[3] for e in self.files[-1]) + entry[3] > max_shard_bytes:
                self.files.append([])
            self.files[-1].append(entry)
        n = len(self.files)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        self._file, self._entry, self._left = -1, -1, 0
        self._fh: Any = None
        self.total_bytes = sum(e[3] for e in sized)

    def _next_entry(self) -> None:
        self._entry += 1
        if self._file < 0 or self._entry == len(self.files[self._file]):
            self._open_next_file()
        self._left = self.files[self._file][self._entry][3]

    def _open_next_file(self) -> None:
        import struct

        if self._fh is not None:
            self._fh.close()
        self._file, self._entry = self._file + 1, 0
        if self._file == len(self.files):
            raise NeurontuneError(f"{self.directory}: more data written than the tensors announced")
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, size in self.files[self._file]:
            code = _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
        self._fh = open(self.directory / self.names[self._file], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, t: torch.Tensor) -> None:
        """Append ``t``'s bytes: the next tensor, or the next part of the one being written (its dtype)."""
        import torch

        if self._left == 0:
            self._next_entry()
        name, dtype, _, _ = self.files[self._file][self._entry]
        if t.dtype != dtype:
            raise NeurontuneError(f"{name}: written as {t.dtype}, announced as {dtype}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() > self._left:
            raise NeurontuneError(f"{name}: {data.numel()} bytes written where {self._left} were left")
        self._fh.write(memoryview(data.numpy()))
        self._left -= data.numel()

    def abandon(self) -> None:
        """Close the file being written after a failure (its directory is the caller's to remove)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Check that every announced byte was written; write the index (several files)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        done = self._file == len(self.files) - 1 and self._entry == len(self.files[-1]) - 1
        if self._left or not done:
            raise NeurontuneError(f"{self.directory}: fewer bytes written than the tensors announced")
        if len(self.files) > 1:
            weight_map = {e[0]: f for f, entries in zip(self.names, self.files, strict=True) for e in entries}
            write_json(
                self.directory / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )


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
