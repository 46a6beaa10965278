"""Shared helpers of the scale benchmarks (bench_throughput, bench_naive, bench_overhead, bench_memory).

Every benchmark measures its pair side by side in one process, reports medians of repeats and the
ratio, and writes ``benchmarks/results/<name>.json`` with the exact command line that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "untrac_pl", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup(threads: Optional[int], seed: int = 0) -> None:
    quiet()
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)


def documents(n: int, sentences: int, seed: int = 0, group_names: bool = True) -> list[dict]:
    """``n`` grouped documents of ``sentences`` sentences each, from the quickstart generator."""
    from untrac_pl.data.embedded import quickstart_corpus

    per_group = max(24, (n * sentences) // 4 + 1)
    corpus = quickstart_corpus(seed=seed, n_per_group=per_group)["train"]
    by_group: dict[str, list[str]] = {}
    for record in corpus:
        by_group.setdefault(record["group"], []).append(record["text"])
    groups = sorted(by_group)
    docs = []
    for i in range(n):
        group = groups[i % len(groups)]
        pool = by_group[group]
        start = (i // len(groups)) * sentences
        text = " ".join(pool[(start + j) % len(pool)] for j in range(sentences))
        docs.append({"id": f"doc-{i}", "group": group if group_names else "all", "text": text})
    return docs


def gpt2_config(layers: int, width: int, heads: int, positions: int, dropout: float = 0.1, vocab: Optional[int] = None) -> dict:
    config = {"model_type": "gpt2", "n_layer": layers, "n_head": heads, "n_embd": width, "n_positions": positions,
              "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    if vocab:
        config["vocab_size"] = vocab
    return config


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median(values) -> float:
    return float(statistics.median(values))


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "device": device, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    try:  # the CPU model: these machines differ (Intel Xeon / AMD EPYC) and so do their figures
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # the C allocator's settings change CPU step times by 2x at GPT-2-small size (benchmarks/README.md)
    allocator = {k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")}
    info["allocator_env"] = allocator or "default"
    try:
        import subprocess

        git = ["git", "-C", str(HERE)]
        info["commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
        changed = subprocess.run(git + ["status", "--porcelain", "--", "../untrac_pl", "."],
                                 capture_output=True, text=True, timeout=10).stdout.splitlines()
        # code only (.py of the package or the benchmarks): result files and READMEs change with every run
        info["uncommitted_changes"] = any(line.rstrip().endswith(".py") for line in changed)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_result(name: str, result: dict, out_dir: Optional[str] = None) -> Path:
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent)] + sys.argv[1:]), **result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


class Stopwatch:
    def __init__(self, device: str = "cpu"):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def engine_trainer_kwargs(device: str, precision: str = "32-true", **extra) -> dict:
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    return {"accelerator": accelerator, "devices": 1, "precision": precision, "enable_progress_bar": False, "logger": False, **extra}


def autocast(device: str, precision: str):
    """The autocast a Lightning precision string implies, for the bare reference loops."""
    import contextlib

    kind = "cuda" if device.startswith("cuda") else "cpu"
    if precision.startswith("16-mixed") and kind == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if precision.startswith("bf16-mixed") or precision.startswith("16-mixed"):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()
