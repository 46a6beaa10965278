"""Atomic output: every file is written to a temporary name and renamed into place.

A run builds its outputs in ``<output_dir>.partial`` and renames the directory when it completes,
so a crash never leaves a directory (or file) that looks whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return _atomic(path, write)


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def save_safetensors_atomic(path: Path, tensors: dict, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return _atomic(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


class StagedDirectory:
    """``<final>.partial`` while a run is in progress; renamed to ``<final>`` on :meth:`commit`."""

    def __init__(self, final: Path, overwrite: bool = False):
        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + ".partial")
        if self.final.exists() and not overwrite:
            raise FileExistsError(f"output directory '{self.final}' exists; set overwrite: true or choose another output_dir")
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
