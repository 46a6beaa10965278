"""Small runtime helpers every layer shares; each exists once, here.

Library versions for provenance, JSON normalising, Lightning's banners silenced inside the engine,
Lightning's canonical precision names, a model's context length, device resolution and process memory.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import resource
import signal
import sys
import threading
import warnings
from dataclasses import asdict, is_dataclass
from typing import Any, Optional

import torch

from untrac_pl.console import is_verbose

# precisions that cast the whole module to another dtype (not autocast), in Lightning's canonical names
CASTING_PRECISIONS = {"16-true", "bf16-true", "64-true", "transformer-engine", "transformer-engine-float16"}
# Lightning 2.x's legacy aliases (lightning.fabric.plugins.precision.precision): "16" is 16-mixed, not 16-true
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def versions() -> dict:
    """The library versions that a result depends on (recorded next to every score file)."""
    import lightning  # heavy; only needed when a result is written
    import transformers

    return {"torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine_facts() -> dict:
    """The machine a result was computed on (every results.md names it: floats differ across CPUs)."""
    model = ""
    flags: list[str] = []
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in line.split(":", 1)[1].split()]
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cpu_flags": flags, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def json_safe(value: Any, drop_private: bool = False) -> Any:
    """``value`` as plain JSON: dataclasses as dicts, tuples as lists, non-finite floats as ``None``,
    numpy scalars as numbers, small tensors as lists (large ones by their shape), anything else as ``str``.
    ``drop_private`` leaves out dict keys that start with ``_``."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, drop_private) for k, v in value.items() if not (drop_private and str(k).startswith("_"))}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, drop_private) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist()) if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return json_safe(item(), drop_private)
    return str(value)


def canonical_precision(precision: Any) -> str:
    """Lightning's canonical name of a ``trainer.precision`` value (``16`` or ``"16"`` -> ``"16-mixed"``)."""
    text = str(precision if precision is not None else "32-true")
    return PRECISION_ALIASES.get(text, text)


def context_length(net) -> Optional[int]:
    """The model's maximum number of positions, if its config says (GPT-2 ``n_positions``, Llama/OPT
    ``max_position_embeddings``, ...)."""
    config = getattr(net, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(device: Optional[str]) -> str:
    """``"auto"``/``None``/``"gpu"`` → ``"cuda"`` when available, else ``"cpu"``; anything else unchanged
    (``"cpu"``, ``"cuda:1"``, ``"mps"``; also Lightning accelerator names)."""
    if device in (None, "", "auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C: a ``KeyboardInterrupt``, or the ``SystemExit`` into which Lightning's
    Trainer turns one (``sys.exit(1)`` while handling it)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)


def reenable_ctrl_c() -> None:
    """Lightning ignores SIGINT after handling a Ctrl-C; give it back its default handler (main thread only)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class quiet_lightning:
    """Silence Lightning's per-Trainer banners ("GPU available...", tips) and the warnings known to be
    harmless here inside the block (the engine builds one Trainer per target, which repeats them all).
    Under ``untrac-pl --verbose`` (:func:`untrac_pl.console.set_verbose`) the banners stay."""

    NAMES = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
    HARMLESS = (
        ".*does not have many workers.*",  # tiny per-target loaders; workers would cost more than they save
        ".*The number of training batches.*",
        ".*smaller than the logging interval.*",
        ".*Total length of `DataLoader` across ranks is zero.*",
        r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a deprecated torch API
        ".*custom batch sampler `(LengthSortedBatchSampler|GroupBatchSampler)`.*",  # both return every index by construction (tested)
    )

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        for message in self.HARMLESS:
            warnings.filterwarnings("ignore", message=message)
        self.levels = {} if is_verbose() else {n: logging.getLogger(n).level for n in self.NAMES}
        for name in self.levels:
            logging.getLogger(name).setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)
