"""Atomic output: every file is written to a temporary name and renamed into place.

A run builds its outputs in ``<output_dir>.partial`` and renames the directory when it completes,
so a crash never leaves a directory (or file) that looks whole.

Every byte goes through :func:`_sync` (flush + fsync) before the rename, so a full disk surfaces as
:class:`~untrac_pl.errors.OutputWriteError` here, with the temporary file removed, instead of a
truncated file under the final name. Safetensors files are written by :func:`write_safetensors`,
a deterministic writer (sorted header), so the same tensors and metadata give the same bytes.
Every file gets the mode a plain ``open()`` would give it (0644 under umask 022), not mkstemp's 0600.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from untrac_pl.errors import OutputWriteError
from untrac_pl.outputs import partial_dir
from untrac_pl.vocabulary import option

# errno values that mean "the disk (or quota) is full": reported as OutputWriteError.
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def _sync(handle) -> None:
    """Flush and fsync an open file (the single point where late write errors surface)."""
    handle.flush()
    os.fsync(handle.fileno())


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    if exc.errno in _FULL:
        reason = f"no space left on device ({exc.strerror or exc})"
    else:
        reason = f"{exc.strerror or exc}"
    error = OutputWriteError(f"could not write '{path}': {reason}")
    error.errno = exc.errno
    return error


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``: no window in which
    another thread would create files with a wrong mask); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would (0644 under umask 022),
        # like the run's PNGs and TensorBoard files, so colleagues on a shared server can read it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise _write_error(path, exc) from exc
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            _sync(handle)

    return _atomic(path, write)


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors readers' limit on the JSON header (ids live there: ~3 M examples)


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str]) -> None:
    """Write a safetensors file with a sorted header: identical inputs give identical bytes.

    (``safetensors.torch.save_file`` orders ``__metadata__`` by a per-process hash, so two runs
    with the same scores would otherwise differ byte-wise.) Readable by ``safetensors.safe_open``.
    """
    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}} if metadata else {}
    ordered, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot write tensor '{name}' of dtype {tensor.dtype} to safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        ordered.append(tensor)
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    if len(encoded) > SAFETENSORS_MAX_HEADER:  # readers refuse such a file: never write one
        raise ValueError(f"the safetensors header would be {len(encoded) / 1e6:.0f} MB (metadata: ids and groups of every row and "
                         f"column), over the format's {SAFETENSORS_MAX_HEADER / 1e6:.0f} MB limit; score fewer examples per run "
                         "(e.g. split the training corpus into several data sources and runs)")
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in ordered:  # in slices of rows: a memory-mapped score matrix is never copied whole
            for part in _row_slices(tensor):
                handle.write(part.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        _sync(handle)


def _row_slices(tensor: torch.Tensor, max_bytes: int = 1 << 24):
    """``tensor`` as consecutive slices along its first dimension, each of at most ~``max_bytes``."""
    if tensor.numel() == 0:
        return
    if tensor.dim() == 0:
        yield tensor.reshape(1)
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    step = max(1, max_bytes // row_bytes)
    for start in range(0, tensor.shape[0], step):
        yield tensor[start:start + step]


def save_safetensors_atomic(path: Path, tensors: dict, metadata: dict[str, str]) -> Path:
    return _atomic(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def save_figure_atomic(path: Path, figure, **savefig_kwargs) -> Path:
    """Save a matplotlib figure atomically; the format comes from the final name's suffix (``.png``)."""
    fmt = Path(path).suffix.lstrip(".") or "png"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            figure.savefig(handle, format=fmt, **savefig_kwargs)
            _sync(handle)

    return _atomic(path, write)


def append_line_durable(path: Path, line: str) -> None:
    """Append one line (JSONL) and fsync it. A torn last line after a crash is skipped by readers."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")
            _sync(handle)
    except OSError as exc:
        raise _write_error(Path(path), exc) from exc


class StagedDirectory:
    """``<final>.partial`` while a run is in progress; renamed to ``<final>`` on :meth:`commit`."""

    def __init__(self, final: Path, overwrite: bool = False):
        self.final = Path(final)
        self.partial = partial_dir(self.final)
        if self.final.exists() and not overwrite:
            raise FileExistsError(f"output directory '{self.final}' exists; set {option('overwrite', True)} or choose another {option('output_dir')}")
        self.overwrite = overwrite

    def open(self, fresh: bool = True) -> Path:
        if fresh and self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def commit(self) -> Path:
        if self.final.exists():
            old = self.final.with_name(self.final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
            os.replace(self.partial, self.final)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.final)
        return self.final

    def discard(self) -> None:
        if self.partial.exists():
            shutil.rmtree(self.partial)
