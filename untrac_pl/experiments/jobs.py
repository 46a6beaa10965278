"""The jobs a reproduction hands to a :class:`~untrac_pl.experiments.pool.JobPool`.

* :func:`fit_job`: train the payload's model from its initialisation with one :class:`FitJob`'s spec
  (θ0 of a batch order, a leave-group-out model, an LDS model) and return its per-test-example losses.
* :func:`methods_job`: every method of one run on θ0 (:class:`MethodsJob`), score files written.

The payload (:func:`payload_for`) holds the tokenised training corpus (``train``), the test examples
(``queries``), the records the methods sample from, the tokenizer and the model recipe; a worker builds
its own :class:`~untrac_pl.lm.CausalLMModule` from the recipe (:func:`build_lm`).
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from untrac_pl.errors import MethodOptionError
from untrac_pl.experiments.methods import MethodContext, MethodSpec, run_method
from untrac_pl.lm import CausalLMModule, example_losses
from untrac_pl.methods import get_method
from untrac_pl.models import build_model
from untrac_pl.training import FitSpec, fit_lm, load_weights, save_weights


def lm_kwargs_of(cfg) -> dict:
    """The :class:`~untrac_pl.lm.CausalLMModule` arguments of a ReproduceConfig's ``lm:`` and ``fit:`` sections."""
    return {"optimizer": cfg.lm.optimizer, "lr_schedule": cfg.lm.lr_schedule, "warmup_steps": cfg.lm.warmup_steps,
            "max_steps": cfg.fit.max_steps, "grad_clip": cfg.lm.grad_clip}


def build_lm(model_spec, tokenizer, lm_kwargs: dict) -> dict:
    """A fresh module with the spec's model attached (its weights are each job's to load)."""
    lm = CausalLMModule(model=model_spec, **lm_kwargs)
    lm.attach(build_model(model_spec, tokenizer), tokenizer)
    return {"lm": lm}


def check_methods_reach_workers(methods, workers: int) -> None:
    """A method registered in ``__main__`` (a script, a notebook) is unknown to spawned workers: say so before any fit."""
    if workers <= 1:
        return
    for spec in methods:
        if type(get_method(spec.name)).__module__ == "__main__":
            raise MethodOptionError(f"methods[{spec.key}]: method '{spec.name}' is registered in __main__ (a script or notebook), which the "
                                    f"{workers} worker processes cannot import; define it in an importable module or set workers: 1")


def payload_for(lm: CausalLMModule, model_spec, tokenizer, lm_kwargs: dict, init_state: dict, train_corpus, query_corpus, *,
                train_records=None, query_records=None, max_length: int = 64, eval_batch_size: int = 64,
                trainer_kwargs: Optional[dict] = None, log: Optional[dict] = None) -> tuple[dict, dict]:
    """``(payload, local)`` for a :class:`~untrac_pl.experiments.pool.JobPool`: ``local`` is this process's built module."""
    payload = {"build": functools.partial(build_lm, model_spec, tokenizer, dict(lm_kwargs)), "model_spec": model_spec, "tokenizer": tokenizer,
               "init_state": init_state, "train": train_corpus, "queries": query_corpus, "train_records": train_records,
               "query_records": query_records, "max_length": max_length, "eval_batch_size": eval_batch_size,
               "trainer_kwargs": dict(trainer_kwargs or {}), "log": log}
    return payload, {"lm": lm}


@dataclass
class FitJob:
    """One model: trained from the payload's initialisation with ``spec`` on the payload's ``corpus``."""

    key: str
    spec: FitSpec
    corpus: str = "train"
    log_version: Optional[str] = None  # TensorBoard version under the payload's ``log`` (None: no logger)
    checkpoint_dir: Optional[str] = None  # θ0: ``spec.checkpoint_steps`` saved here (TracIn)
    weights_path: Optional[str] = None  # θ0: its final weights, for the methods


def _logger(log: Optional[dict], version: Optional[str]):
    if not log or version is None:
        return None
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=log["save_dir"], name=log["name"], version=version, default_hp_metric=False)


def fit_job(payload: dict, job: FitJob) -> dict:
    """``{"key", "losses" (per test example, float64 as a list), "info" (fit_lm's summary)}``."""
    lm = payload["lm"]
    lm.net.load_state_dict(copy.deepcopy(payload["init_state"]))
    info = fit_lm(lm, payload[job.corpus], job.spec, payload["trainer_kwargs"], logger=_logger(payload["log"], job.log_version),
                  checkpoint_dir=job.checkpoint_dir)
    losses = example_losses(lm.net, payload["queries"].examples, lm.tokenizer.pad_token_id, payload["eval_batch_size"])
    if job.weights_path:
        save_weights(lm.net, Path(job.weights_path))
    return {"key": job.key, "losses": losses.tolist(), "info": info}


@dataclass
class MethodsJob:
    """Every method of one run on θ0 (weights at ``theta0_path``), each table saved to ``out_dir/<key>.safetensors``."""

    methods: list[MethodSpec]
    out_dir: str
    theta0_path: str
    sample_seed: int
    checkpoints: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # stored in every table's metadata (setting, seed, run)
    skip_existing: bool = False
    may_fail: tuple = ()  # method keys whose divergence is recorded rather than raised (sweep cells)


def methods_job(payload: dict, job: MethodsJob) -> dict:
    """``{"seconds": {key: s}, "failed": {key: message}}``; a diverged method outside ``may_fail`` raises."""
    net = payload["lm"].net
    ctx = MethodContext(net=net, tokenizer=payload["tokenizer"], model_spec=payload["model_spec"], train_records=payload["train_records"],
                        query_records=payload["query_records"], seed=job.sample_seed, max_length=payload["max_length"],
                        eval_batch_size=payload["eval_batch_size"], trainer_kwargs=payload["trainer_kwargs"], checkpoints=list(job.checkpoints))
    out_dir = Path(job.out_dir)
    seconds, failed = {}, {}
    for method in job.methods:
        path = out_dir / f"{method.key}.safetensors"
        if job.skip_existing and path.exists():
            continue
        load_weights(net, Path(job.theta0_path))
        started = time.perf_counter()
        try:
            table = run_method(method, ctx)
        except FloatingPointError as exc:  # diverged ascent (NaN/inf loss): fatal, except for sweep cells
            if method.key not in job.may_fail:
                raise
            failed[method.key] = str(exc)
            continue
        seconds[method.key] = time.perf_counter() - started
        table.metadata.update({**job.metadata, "spec": asdict(method), "seconds": seconds[method.key]})
        table.save(path)
    load_weights(net, Path(job.theta0_path))
    return {"seconds": seconds, "failed": failed}
