"""Resumable runs: per-target results persisted as they complete, and a manifest with a config hash.

A run with ``write=True`` builds its outputs in ``<output_dir>.partial/`` (see
:class:`untrac_pl.io.StagedDirectory`). That directory is also the resume state::

    <output_dir>.partial/
      manifest.json              format, config hash, the hashed fingerprint, versions (written once)
      progress/
        .lock                    flock held by the writing process (released by the OS on any death)
        base_losses.safetensors  θ0 losses of the evaluation set
        targets/<key>.safetensors  one per finished target: its score row + status/step/reason
        completed.jsonl          append-only list of finished targets (human-readable index)

Every file is atomic (temp + fsync + rename), so a SIGKILL at any instant leaves either a whole
target file or none. Re-running the same command finds the manifest, checks the config hash, loads
the finished targets and unlearns only the rest. The per-target files, not ``completed.jsonl``, are
the source of truth (each carries the config hash and its target id), so a torn index line or a
file written by another rank (DDP) is never a problem. On success the directory is renamed to
``<output_dir>`` and ``progress/`` is removed; ``manifest.json`` stays as provenance.

The **config hash** covers everything that changes a score: method, target unit, global seed,
model spec, optimizer, unlearning schedule, the tokenised data of both sides (ids, groups, token
ids, labels: covers data files, sampling, tokenizer and max_length), the evaluation batch size and
the score-relevant Trainer settings (precision, step limits). It leaves out what does not (output
paths, top_k, snippet length, logging, progress bars, number of devices). θ0 losses are stored too
and compared on resume, which catches a changed checkpoint behind an unchanged path.

DDP: the engine opens the resume state on rank 0 only (it takes the lock and writes the manifest,
the target files and ``completed.jsonl``); the other ranks receive the finished targets and the θ0
baseline by broadcast. (The ``rank`` argument and ``completed.rank<r>.jsonl`` exist for a caller that
opens a state per rank; the engine does not.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from untrac_pl.distributed import dist_ready
from untrac_pl.errors import ResumeConflictError
from untrac_pl.io import append_line_durable, save_safetensors_atomic, write_json_atomic
from untrac_pl.outputs import MANIFEST, PROGRESS
from untrac_pl.runtime import canonical_precision, json_safe

log = logging.getLogger(__name__)

FORMAT = 1
# Trainer arguments that change what is computed (not just how it is shown).
SCORE_TRAINER_KEYS = ("precision", "max_steps", "max_epochs", "min_steps", "min_epochs", "limit_train_batches", "limit_predict_batches", "deterministic")


def corpus_digest(corpus) -> str:
    """sha256 of a tokenised corpus: ids, groups, token ids and labels of every example, in order."""
    digest = hashlib.sha256()
    for record, example in zip(corpus.records, corpus.examples):
        digest.update(json.dumps([record["id"], record["group"]], ensure_ascii=False).encode())
        digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(example["labels"], dtype=np.int64).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


def score_trainer_settings(trainer_kwargs: dict, keys=SCORE_TRAINER_KEYS) -> dict:
    """The Trainer options among ``keys`` that are set, as plain values; precision by its canonical
    name ("16" and "16-mixed" are one run)."""
    settings = {k: json_safe(trainer_kwargs[k]) for k in keys if trainer_kwargs.get(k) is not None}
    if "precision" in settings:
        settings["precision"] = canonical_precision(trainer_kwargs["precision"])
    return settings


def run_fingerprint(config, module, datamodule, plan, trainer_kwargs: Optional[dict] = None) -> dict:
    """Everything that affects the scores of a run, as plain JSON (see the module docstring)."""
    trainer_kwargs = dict(trainer_kwargs or {})
    trainer = {**score_trainer_settings(trainer_kwargs), "precision": canonical_precision(trainer_kwargs.get("precision"))}
    return {
        "format": FORMAT,
        "method": plan.method,
        "target_unit": plan.target_unit,
        "seed": config.seed,
        "model": json_safe(module.model_spec),
        "optimizer": json_safe(module.optimizer_spec),
        "unlearning": json_safe(module.schedule),
        "data": {
            "max_length": datamodule.max_length,
            "eval_batch_size": datamodule.eval_batch_size,
            "training data": {"examples": len(datamodule.train_corpus), "sha256": corpus_digest(datamodule.train_corpus)},
            "queries": {"examples": len(datamodule.query_corpus), "sha256": corpus_digest(datamodule.query_corpus)},
        },
        "trainer": trainer,
        # K targets stepped together round differently from one at a time (and draw other dropout masks)
        **({"parallel_targets": config.parallel_targets} if getattr(config, "parallel_targets", 1) > 1 else {}),
    }


def config_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def fingerprint_diff(old: dict, new: dict, limit: int = 6) -> str:
    """``key (old -> new)`` for the first ``limit`` differing leaves."""
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]

    def short(v):
        text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
        return text if len(text) <= 24 else text[:10] + "…" + text[-6:]

    parts = [f"{k} ({short(a.get(k, '<absent>'))} -> {short(b.get(k, '<absent>'))})" for k in changed[:limit]]
    if len(changed) > limit:
        parts.append(f"and {len(changed) - limit} more")
    return ", ".join(parts) or "no visible field (format change)"


def target_key(target_id: str) -> str:
    """A file-system-safe, collision-free file stem for a target id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", target_id)[:40].strip("._") or "target"
    return f"{safe}-{hashlib.sha256(target_id.encode()).hexdigest()[:12]}"


class ResumeState:
    """The resume state of one run directory (``<output_dir>.partial``); see the module docstring."""

    def __init__(self, run_dir: Path, fingerprint: dict, rank: int = 0):
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.hash = config_hash(fingerprint)
        self.rank = rank
        self.progress = self.run_dir / PROGRESS
        self.targets_dir = self.progress / "targets"
        self._lock_fd: Optional[int] = None
        self.resumed = False

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: Path, fingerprint: dict, *, resume: bool = True, restart: bool = False, rank: int = 0, versions: Optional[dict] = None) -> "ResumeState":
        """Lock ``run_dir`` and decide: continue (same hash, ``resume``), start over (``restart``, or
        no manifest) or refuse (:class:`ResumeConflictError`). Nothing is deleted before the lock
        is held and the decision is made."""
        state = cls(run_dir, fingerprint, rank)
        state.run_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            state._acquire_lock()
        try:
            state._decide(resume, restart, versions or {})
        except BaseException:
            state.close()
            raise
        return state

    def _acquire_lock(self) -> None:
        import fcntl

        self.progress.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.progress / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ResumeConflictError(
                f"another run is writing to '{self.run_dir}' (its lock is held); wait for it to finish or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _clear(self) -> None:
        """Delete everything in the run directory except the lock we hold."""
        for entry in self.run_dir.iterdir():
            if entry == self.progress:
                for sub in entry.iterdir():
                    if sub.name != ".lock":
                        shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _decide(self, resume: bool, restart: bool, versions: dict) -> None:
        manifest_path = self.run_dir / MANIFEST
        if restart:
            if any(p.name != PROGRESS for p in self.run_dir.iterdir()) or self._finished_files():
                log.warning("restart: discarding the partial results in %s", self.run_dir)
            self._clear()
        elif manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                old_hash = manifest["config_hash"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ResumeConflictError(
                    f"'{manifest_path}' is unreadable ({exc}); set attribution.restart: true to discard '{self.run_dir}'"
                ) from None
            done = len(self._finished_files())
            if old_hash != self.hash:
                raise ResumeConflictError(
                    f"'{self.run_dir}' holds {done} finished targets of a different configuration "
                    f"(config hash {old_hash} != {self.hash}; changed: {fingerprint_diff(manifest.get('fingerprint', {}), self.fingerprint)}); "
                    "refusing to mix results: set attribution.restart: true to discard them, or choose another output_dir"
                )
            if not resume:
                raise ResumeConflictError(
                    f"'{self.run_dir}' holds {done} finished targets of this configuration and attribution.resume is false; "
                    "set resume: true to continue them or restart: true to discard them"
                )
            old_versions = manifest.get("versions", {})
            if versions and old_versions and old_versions != versions:
                log.warning("resuming with different library versions (%s -> %s): resumed scores may not be bit-identical", old_versions, versions)
            self.resumed = True
            log.info("resuming %s: %d finished targets found", self.run_dir, done)
        else:
            if self._finished_files() or any(p.name != PROGRESS for p in self.run_dir.iterdir()):
                log.warning("%s has no manifest.json (not a resumable run); starting over", self.run_dir)
            self._clear()
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and not self.resumed:
            write_json_atomic(manifest_path, {
                "format": FORMAT,
                "config_hash": self.hash,
                "fingerprint": self.fingerprint,
                "versions": versions,
                "note": "per-target results are in progress/targets/ while the run is unfinished",
            })

    def _finished_files(self) -> list[Path]:
        return sorted(self.targets_dir.glob("*.safetensors")) if self.targets_dir.is_dir() else []

    # -- θ0 losses ---------------------------------------------------------------------------------
    def base_losses(self) -> Optional[torch.Tensor]:
        path = self.progress / "base_losses.safetensors"
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("config_hash") != self.hash:
                    return None
                return handle.get_tensor("losses")
        except Exception as exc:  # a corrupt file is recomputed
            log.warning("ignoring unreadable %s (%s)", path, exc)
            return None

    def save_base_losses(self, losses: torch.Tensor) -> None:
        if self.rank == 0:
            save_safetensors_atomic(self.progress / "base_losses.safetensors", {"losses": losses.float()}, {"config_hash": self.hash})

    # -- targets -----------------------------------------------------------------------------------
    def load_finished(self, target_ids: list[str], num_eval: int) -> dict[str, tuple[torch.Tensor, dict]]:
        """``{target_id: (score row, info)}`` for every target with a valid file; bad files are removed."""
        from safetensors import safe_open

        finished = {}
        for target_id in target_ids:
            path = self.targets_dir / f"{target_key(target_id)}.safetensors"
            if not path.exists():
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    meta = handle.metadata() or {}
                    row = handle.get_tensor("scores")
                info = json.loads(meta["info"])
                if meta.get("config_hash") != self.hash or meta.get("target_id") != target_id or tuple(row.shape) != (num_eval,):
                    raise ValueError("it belongs to another configuration or target")
            except Exception as exc:  # corrupt or foreign: recompute this target
                log.warning("target '%s': ignoring unreadable result file %s (%s); it will be recomputed", target_id, path.name, exc)
                path.unlink(missing_ok=True)
                continue
            finished[target_id] = (row, info)
        return finished

    def record(self, target_id: str, row: torch.Tensor, info: dict) -> Path:
        """Persist one finished (or failed) target atomically, then index it in completed.jsonl."""
        key = target_key(target_id)
        path = save_safetensors_atomic(
            self.targets_dir / f"{key}.safetensors",
            {"scores": row.detach().float().cpu()},
            {"format": str(FORMAT), "config_hash": self.hash, "target_id": target_id, "info": json.dumps(info, sort_keys=True)},
        )
        index = self.progress / ("completed.jsonl" if self.rank == 0 else f"completed.rank{self.rank}.jsonl")
        append_line_durable(index, json.dumps({"target_id": target_id, "file": f"targets/{key}.safetensors", **info}, ensure_ascii=False))
        return path

    # -- closing -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._lock_fd is not None:
            try:
                os.close(self._lock_fd)  # releases the flock
            finally:
                self._lock_fd = None

    @staticmethod
    def cleanup(final_dir: Path) -> None:
        """After the rename: drop ``progress/`` (per-target files and index; the outputs hold the
        results). A crash before this only leaves that folder behind in a finished run."""
        shutil.rmtree(Path(final_dir) / PROGRESS, ignore_errors=True)

    def num_finished(self) -> int:
        return len(self._finished_files())


def broadcast_from_rank0(tensor: torch.Tensor, obj):
    """``(tensor, obj)`` as rank 0 has them, on every rank (unchanged without a process group).

    Under DDP every rank must skip the same finished targets (the scoring pass is a collective)
    and score against rank 0's θ0 baseline; only rank 0 reads the resume state.
    """
    if not dist_ready():
        return tensor, obj
    box = [obj, tensor.detach().cpu()]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[1].to(tensor.device), box[0]


def reconcile_base_losses(state: ResumeState, computed: torch.Tensor) -> torch.Tensor:
    """The θ0 losses to score against: the stored ones of an interrupted run (compared with the fresh
    ones: a mismatch means the model or data changed behind an unchanged configuration, refused; a
    tiny difference from other hardware is accepted with a warning), else the fresh ones, stored."""
    stored = state.base_losses()
    if stored is None:
        state.save_base_losses(computed)
        return computed
    if not torch.equal(stored, computed):
        diff = float((stored - computed).abs().max())
        if not torch.allclose(stored, computed, rtol=1e-4, atol=1e-5):
            raise ResumeConflictError(
                f"the θ0 losses differ from those of the interrupted run in '{state.run_dir}' (max |Δ| = {diff:.3g}): "
                "the model weights or numerics changed behind an unchanged configuration; set attribution.restart: true"
            )
        log.warning("θ0 losses differ slightly (max |Δ| = %.3g) from the interrupted run's; keeping the stored ones", diff)
    return stored


def resume_targets(state: Optional[ResumeState], computed: torch.Tensor, target_ids: list[str], num_eval: int) -> tuple[torch.Tensor, dict]:
    """θ0 losses to score against and ``{target_id: (score row | None, info)}`` of the finished targets.

    Under DDP rank 0 decides and every rank gets the same answer (rows only on rank 0, which alone
    writes outputs; the others only skip those targets); a refusal on rank 0 is raised on every rank
    at once, so none waits on a collective.
    """
    finished: dict = {}
    base = computed
    refusal: Optional[BaseException] = None
    if state is not None:
        try:
            base = reconcile_base_losses(state, computed)
            if state.resumed:
                finished = state.load_finished(target_ids, num_eval)
        except ResumeConflictError as exc:
            refusal = exc
    base, (finished_ids, message) = broadcast_from_rank0(base, (sorted(finished), str(refusal) if refusal else None))
    if refusal is not None:
        raise refusal
    if message is not None:
        raise ResumeConflictError(f"rank 0 refused to resume: {message}")
    if finished:
        log.info("resuming: %d of %d targets already finished", len(finished), len(target_ids))
    if state is None:
        finished = {i: (None, {"optimizer_steps": 0}) for i in finished_ids}
    return base, finished
