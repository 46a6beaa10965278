"""Independent jobs of one experiment (model fits, method runs) in worker processes.

A reproduction trains dozens of small models that do not depend on each other: θ0 per batch order,
the leave-group-out models, the LDS models, θ0 per planted dose; and the methods' runs on θ0 are
independent too. Such models are too small for two torch threads to pay: on the 2-core Intel Xeon, 600 steps
of the real-data model took 28.5 s with two threads, 36 s with one, and about 40 s each for two 1-thread
processes side by side (about 1.4x the fits per second); method runs gain less (synthetic A as a whole: 8.8 ->
8.0 min, README). ``workers: 2`` (with ``threads: 2``) runs them that way.

Every job of a pool runs with the same thread count (θ0 included), so a ground-truth difference
``L(θ_-k) − L(θ0)`` never mixes two rounding regimes, and a job gives bit-identical results whether it
runs in a worker or in this process with that thread count (tested). ``workers: 1`` runs every job here,
in order, as before.

Jobs are module-level functions ``fn(payload, job)``; the payload (the experiment's data, tokenizer and
model recipe) is pickled once and unpickled once per worker, which builds its own model from the recipe.
"""
from __future__ import annotations

import importlib
import io
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, Callable, Optional, Sequence

import torch

from untrac_pl.methods.registry import defining_modules

_PAYLOAD: dict = {}  # a worker's payload (set once by ``_init_worker``)


def fit_threads(threads: Optional[int], workers: int) -> int:
    """Torch threads of each job: ``threads`` (default: this process's) shared out over ``workers``."""
    total = threads or torch.get_num_threads()
    return max(1, total // max(1, workers))


def _init_worker(blob: bytes, threads: int, modules: Sequence[str] = ()) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    for name in modules:  # methods registered outside untrac_pl (their modules register them on import)
        importlib.import_module(name)
    payload = torch.load(io.BytesIO(blob), weights_only=False)
    build = payload.get("build")
    if build is not None:  # the worker's own model, from the recipe (its weights are loaded by each job)
        payload.update(build())
    _PAYLOAD.clear()
    _PAYLOAD.update(payload)


def _call(fn: Callable, job: Any) -> Any:
    return fn(_PAYLOAD, job)


class JobPool:
    """Run ``fn(payload, job)`` for many jobs, in ``workers`` spawned processes of ``threads`` threads each.

    ``payload``: what every job reads; ``payload["build"]`` (picklable, e.g. a ``functools.partial``)
    returns the entries a worker builds itself (a model), which this process passes in ``local``
    instead (its already-built ones). With ``workers == 1`` jobs run here, with ``threads`` threads.
    """

    def __init__(self, payload: dict, workers: int = 1, threads: Optional[int] = None, local: Optional[dict] = None):
        if workers < 1:
            raise ValueError(f"workers={workers}: at least 1 (1 = every job in this process)")
        self.payload, self.workers, self.threads = payload, workers, threads or torch.get_num_threads()
        self.local = {**payload, **(local or {})}
        self._executor: Optional[ProcessPoolExecutor] = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            buffer = io.BytesIO()
            torch.save(self.payload, buffer)  # plain pickle of tensors (no shared-memory handles across processes)
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(buffer.getvalue(), self.threads, defining_modules()))
        return self._executor

    def map(self, fn: Callable, jobs: Sequence[Any]) -> list:
        """``[fn(payload, job) for job in jobs]``, in the jobs' order (the first failure is raised)."""
        jobs = list(jobs)
        if not jobs:
            return []
        if self.workers == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return [fn(self.local, job) for job in jobs]
            finally:
                torch.set_num_threads(before)
        futures = [self._pool().submit(_call, fn, job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:  # the first failure at once: the queued jobs are dropped, not run to the end first
            for f in futures:
                f.cancel()
            raise failed.exception()
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "JobPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
