"""Fitting a causal LM on grouped corpora: mixture sampling, fixed step counts, checkpoints with lr.

* :class:`MixtureBatchSampler` draws exactly ``num_steps`` batches from the allowed groups (seeded
  shuffled passes over the pooled examples, so each group is sampled in proportion to its size).
  Leaving a group out keeps the number of steps — the paper's modified leave-dataset-out.
* :class:`StepCheckpoint` saves the weights (safetensors) and ``{"step", "lr"}`` (JSON) at
  configured steps; ``lr`` is the learning rate in force for the steps that led to the checkpoint's
  weights (what TracIn multiplies by).
* :func:`fit_lm` runs one deterministic ``Trainer.fit`` and returns what happened.
* :class:`LMDataModule` serves grouped records for ``untrac-pl fit``.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch.utils.data import DataLoader, Sampler

from untrac_pl.callbacks.progress import StepProgress
from untrac_pl.data.collate import ExampleDataset, PadCollator
from untrac_pl.data.records import DataSource, check_unique_ids, read_records
from untrac_pl.data.tokenize import TokenizedCorpus, sample_per_group, tokenize_records
from untrac_pl.errors import DataError
from untrac_pl.io import write_json_atomic
from untrac_pl.quantization import refuse_plan_trainer_options
from untrac_pl.runtime import quiet_lightning


@dataclass
class FitSpec:
    """How θ0 (and every leave-group-out model) is trained.

    ``max_steps`` optimizer steps of ``batch_size`` examples drawn from the mixture of the training
    groups not in ``exclude_groups``; ``checkpoint_steps`` (global steps) are saved with their lr.
    ``order_seed`` (default: ``seed``) seeds the batch order alone, so a ground truth can be retrained
    with another batch order from the same initialisation (its test-retest reliability).
    """

    max_steps: int = 512
    batch_size: int = 2
    seed: int = 0
    order_seed: Optional[int] = None
    exclude_groups: list[str] = field(default_factory=list)
    checkpoint_steps: list[int] = field(default_factory=list)
    log_every_n_steps: int = 10


class MixtureBatchSampler(Sampler[list[int]]):
    """Exactly ``num_steps`` batches of positions from ``allowed`` (seeded; passes reshuffled).

    Coupled batch order: every pass shuffles the whole ``universe`` (default: ``allowed``) with the
    same seeded stream and skips what is not allowed, so a leave-group-out model sees θ0's batches
    with that group's examples taken out and the rest in the same order (less noise in the ground
    truth than an unrelated order).
    """

    def __init__(self, allowed: Sequence[int], batch_size: int, num_steps: int, seed: int, universe: Optional[Sequence[int]] = None):
        if not allowed:
            raise ValueError("no training examples left to sample from (every group excluded?)")
        if batch_size < 1 or num_steps < 1:
            raise ValueError(f"batch_size and num_steps must be >= 1, got {batch_size}, {num_steps}")
        rng = random.Random(f"mixture:{seed}")
        keep = set(allowed)
        pool = list(universe) if universe is not None else list(allowed)
        batches, stream = [], []
        while len(batches) < num_steps:
            while len(stream) < batch_size:
                order = pool[:]
                rng.shuffle(order)
                stream.extend(i for i in order if i in keep)
            batches.append(stream[:batch_size])
            stream = stream[batch_size:]
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def mixture_dataloader(corpus: TokenizedCorpus, spec: FitSpec, pad_token_id: int) -> DataLoader:
    excluded = set(spec.exclude_groups)
    unknown = excluded - set(corpus.groups)
    if unknown:
        raise ValueError(f"exclude_groups {sorted(unknown)} are not training groups ({corpus.groups})")
    allowed = [i for i, r in enumerate(corpus.records) if r["group"] not in excluded]
    order_seed = spec.seed if spec.order_seed is None else spec.order_seed
    sampler = MixtureBatchSampler(allowed, spec.batch_size, spec.max_steps, order_seed, universe=range(len(corpus.records)))
    return DataLoader(ExampleDataset(corpus.examples), batch_sampler=sampler, collate_fn=PadCollator(pad_token_id))


def save_weights(net: torch.nn.Module, path: Path) -> Path:
    """Weights as safetensors (tied tensors handled by ``save_model``), written atomically."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    save_model(net, str(tmp))
    tmp.replace(path)
    return path


def load_weights(net: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(net, str(path))


class LearningRateInForce(pl.Callback):
    """The learning rate of the optimizer step being taken (after ``fit``: the last step's), which
    TracIn weights a checkpoint by; the scheduler has already moved on once the step is done."""

    def __init__(self):
        self.lr: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr = float(trainer.optimizers[0].param_groups[0]["lr"])


class StepCheckpoint(LearningRateInForce):
    """Saves ``<dirpath>/step-<N>/model.safetensors`` and ``checkpoint.json`` at the given global steps.

    ``checkpoint.json``: ``{"step", "lr", "seed", "excluded_groups"}``; ``<dirpath>/checkpoints.json``
    lists them all (``[{"path", "step", "lr"}, ...]``), the input TracIn takes.
    """

    def __init__(self, dirpath: str | Path, steps: Sequence[int], seed: int = 0, excluded: Sequence[str] = ()):
        self.dirpath = Path(dirpath)
        self.steps = sorted(set(int(s) for s in steps))
        self.seed, self.excluded = seed, list(excluded)
        self.saved: list[dict] = []
        super().__init__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and not any(s["step"] == step for s in self.saved):
            folder = self.dirpath / f"step-{step}"
            weights = save_weights(pl_module.net, folder / "model.safetensors")
            info = {"step": step, "lr": self.lr, "seed": self.seed, "excluded_groups": self.excluded}
            write_json_atomic(folder / "checkpoint.json", info)
            self.saved.append({"path": str(weights), "step": step, "lr": self.lr})
            write_json_atomic(self.dirpath / "checkpoints.json", self.saved)


def fit_lm(
    module,
    corpus: TokenizedCorpus,
    spec: FitSpec,
    trainer_kwargs: Optional[dict] = None,
    logger=None,
    checkpoint_dir: Optional[str | Path] = None,
) -> dict:
    """Train ``module.net`` in place for exactly ``spec.max_steps`` steps; returns a summary dict."""

    refuse_plan_trainer_options(trainer_kwargs or {}, f"would change the training length, which is fit.max_steps ({spec.max_steps} steps of fit.batch_size examples)")
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    module.max_steps = spec.max_steps
    loader = mixture_dataloader(corpus, spec, module.tokenizer.pad_token_id)
    last_lr = LearningRateInForce()
    callbacks = list((trainer_kwargs or {}).get("callbacks") or []) + [last_lr]
    ckpt = None
    if checkpoint_dir is not None and spec.checkpoint_steps:
        ckpt = StepCheckpoint(checkpoint_dir, spec.checkpoint_steps, spec.seed, spec.exclude_groups)
        callbacks.append(ckpt)
    kwargs = {k: v for k, v in (trainer_kwargs or {}).items() if k not in ("callbacks", "logger", "max_steps", "max_epochs")}
    # one bar over the steps on stderr (untrac_pl.callbacks.progress), never Lightning's "Training: / Epoch 0:" bar
    if kwargs.pop("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        excluded = f" without {', '.join(spec.exclude_groups)}" if spec.exclude_groups else ""
        callbacks.append(StepProgress(f"train{excluded}", spec.max_steps))
    kwargs["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)  # a user's own bar still works
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("log_every_n_steps", spec.log_every_n_steps)  # an explicit trainer.log_every_n_steps wins
    started = time.perf_counter()
    with quiet_lightning():  # θ0 and every leave-group-out model: one Trainer each, no banners
        trainer = pl.Trainer(max_steps=spec.max_steps, max_epochs=1, logger=logger if logger is not None else False, callbacks=callbacks, **kwargs)
        trainer.fit(module, train_dataloaders=loader)
    if logger is not None:
        logger.finalize("success")
    loss = trainer.callback_metrics.get("train/loss")
    return {
        "steps": int(trainer.global_step),
        "excluded_groups": list(spec.exclude_groups),
        "final_train_loss": float(loss) if loss is not None else None,
        "seconds": time.perf_counter() - started,
        "last_lr": last_lr.lr,
        "checkpoints": ckpt.saved if ckpt else [],
    }


# --------------------------------------------------------------------------------------------------
# Long documents -> blocks
# --------------------------------------------------------------------------------------------------
def block_records(records: Sequence[dict], tokenizer, block_size: int) -> list[dict]:
    """Split each text record into consecutive blocks of ``block_size`` tokens (decoded back to text).

    Pretraining-style data: a document longer than a block yields several records (``<id>#<j>``),
    each in the document's group; a final piece shorter than a quarter block is dropped unless it is
    the whole document. Prompt/completion records are kept as they are.
    """
    out = []
    texts = [r["text"] for r in records if "text" in r]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    for record in records:
        if "text" not in record:
            out.append(record)
            continue
        ids = next(encoded)
        pieces = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
        for j, piece in enumerate(pieces):
            if j > 0 and len(piece) < max(2, block_size // 4):
                break
            text = tokenizer.decode(piece)
            if len(piece) < 2 or not text.strip():
                continue
            out.append({"id": f"{record['id']}#{j}", "group": record["group"], "text": text})
    return out


# --------------------------------------------------------------------------------------------------
# DataModule for `untrac-pl fit`
# --------------------------------------------------------------------------------------------------
class LMDataModule(pl.LightningDataModule):
    """Grouped training records for ``untrac-pl fit``.

    Args:
        train: data sources (each record's ``group`` is its corpus / task): files, datasets or
            generated corpora, e.g. the four training tasks of synthetic dataset A,
            ``[{format: generated, generator: synthetic, split: train, options: {dataset: A, n_per_task: 256}}]``,
            or the eight look-alike corpora, ``[{format: generated, generator: pretraining, split: train}]``.
        block_size: split long texts into blocks of this many tokens (``None``: keep records whole,
            truncated to ``max_length``).
        max_length: tokens per sequence.
        samples_per_group: equal-size seeded sample of each group (``None``: all).
    """

    def __init__(
        self,
        train: Optional[list[DataSource]] = None,
        block_size: Optional[int] = None,
        max_length: int = 128,
        samples_per_group: Optional[int] = None,
        sample_seed: int = 0,
    ):
        super().__init__()
        self.train_sources = list(train or [])
        self.block_size = block_size
        self.max_length = max_length
        self.samples_per_group = samples_per_group
        self.sample_seed = sample_seed
        self.records: Optional[list[dict]] = None
        self.corpus: Optional[TokenizedCorpus] = None

    def load_records(self) -> list[dict]:
        if self.records is None:
            if not self.train_sources:
                raise DataError("no training data: set data.train (data sources: files, or e.g. "
                                "[{format: generated, generator: synthetic, split: train, options: {dataset: A}}])", field="data.train")
            records = [r for s in self.train_sources for r in read_records(s)]
            check_unique_ids(records, "training data")
            self.records = sample_per_group(records, self.samples_per_group, self.sample_seed)
        return self.records

    def all_texts(self) -> list[str]:
        return [r.get("text") or r["prompt"] + r["completion"] for r in self.load_records()]

    def tokenize(self, tokenizer) -> TokenizedCorpus:
        records = self.load_records()
        if self.block_size:
            records = block_records(records, tokenizer, self.block_size)
        self.corpus = tokenize_records(records, tokenizer, self.max_length, "training data")
        return self.corpus


def read_checkpoints(dirpath: str | Path) -> list[tuple[str, float]]:
    """``[(weights path, lr), ...]`` from a :class:`StepCheckpoint` folder (TracIn's input)."""
    entries = json.loads((Path(dirpath) / "checkpoints.json").read_text())
    return [(e["path"], float(e["lr"])) for e in entries]
