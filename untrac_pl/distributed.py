"""Sharded scoring under DDP and index-based merging of the shards.

Under ``strategy: ddp`` every rank unlearns every target identically (same seed, same micro-batches:
the engine's loaders are never resharded by Lightning, ``use_distributed_sampler=False``), and the
evaluation pass is split by whole batches: rank ``r`` scores batches ``r, r+N, r+2N, ...`` of the
length-sorted batch list, so each example sits in exactly the batch it would have in one process and
its loss is computed identically. Ranks left without a batch repeat batch 0; the merge keeps, for
each evaluation index, the value of the lowest rank that has one, so repeats are dropped by index.

The ascent is replicated, not data-parallel: every rank computes the same full gradient. DDP would
average N identical gradients, which is exact only when N is a power of two (g/3 + g/3 + g/3 != g in
float32), so the unlearned weights would drift from a single process's by a few ulps per step. The
unlearning module therefore registers :func:`take_rank0_gradient` as the DDP communication hook:
every rank receives rank 0's gradient bit for bit, for any N, and ranks can never drift apart.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


def _broadcast_bucket_from_rank0(state, bucket):  # no annotations: DDP checks them literally
    work = torch.distributed.broadcast(bucket.buffer(), src=0, group=state, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def take_rank0_gradient(model: torch.nn.Module) -> bool:
    """Make a DDP-wrapped ``model`` use rank 0's gradient instead of the average (see module doc).

    Returns whether a hook was registered (False for an unwrapped model: nothing to synchronise).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return False
    try:
        model.register_comm_hook(state=None, hook=_broadcast_bucket_from_rank0)
    except RuntimeError as exc:  # the user's DDPStrategy(ddp_comm_hook=...) came first: keep it
        import logging

        logging.getLogger(__name__).warning(
            "keeping the DDP communication hook already registered (%s); gradients are then combined by it, "
            "which for an average is exact only when the world size is a power of two", exc)
        return False
    return True


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches ``rank, rank + world, ...`` of ``batches``; an empty shard gets a repeat of batch 0."""

    def __init__(self, batches: Sequence[Sequence[int]], rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        batches = [list(b) for b in batches]
        self.rank, self.world_size = rank, world_size
        self.batches = batches[rank::world_size] or batches[:1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The same loader restricted to this rank's batches (the loader itself when ``world_size`` is 1)."""
    if world_size <= 1:
        return loader
    if loader.batch_sampler is None:
        raise ValueError("shard_loader needs a DataLoader with a batch sampler")
    return DataLoader(
        loader.dataset,
        batch_sampler=ShardedBatchSampler(list(loader.batch_sampler), rank, world_size),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Merge per-rank partial results, NaN meaning "not computed here", by evaluation index.

    ``values``: ``[..., E]`` on any device, NaN where this rank has no value. Every rank receives
    the merged tensor in which each entry comes from the lowest rank that computed it (no
    arithmetic, so merged values are bit-identical to the computing rank's). A collective: all
    ranks must call it. Without an initialised process group it returns ``values`` unchanged.
    """
    if not dist_ready():
        return values
    device = values.device
    local = values.detach().to(_collective_device()).contiguous()
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    merged = gathered[0].clone()
    for other in gathered[1:]:
        merged = torch.where(torch.isnan(merged), other, merged)
    return merged.to(device)


def may_be_distributed(trainer_kwargs: Optional[dict] = None) -> bool:
    """Whether these Trainer arguments can start more than one process."""
    kwargs = dict(trainer_kwargs or {})
    strategy = kwargs.get("strategy", "auto")
    devices = kwargs.get("devices", "auto")
    single = strategy in (None, "auto", "single_device") and devices in (1, "1", None) or devices in ([0], "0,")
    return not single or kwargs.get("num_nodes", 1) not in (1, None)


def global_rank(trainer_kwargs: Optional[dict] = None) -> int:
    """This process's global rank as the Trainer will see it, known before any Trainer runs.

    Under Lightning's DDP launcher the child processes are started with ``LOCAL_RANK``/``NODE_RANK``;
    under torchrun or SLURM the cluster environment gives it. A throw-away Trainer resolves it
    exactly as the per-target Trainers will (no process is launched by building one).
    """
    import logging

    import lightning.pytorch as pl

    kwargs = dict(trainer_kwargs or {})
    keys = ("accelerator", "strategy", "devices", "num_nodes", "plugins")
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        probe = pl.Trainer(**{k: kwargs[k] for k in keys if k in kwargs}, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, enable_checkpointing=False)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return int(probe.global_rank)
