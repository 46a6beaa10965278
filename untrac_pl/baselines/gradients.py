"""Per-example gradients on ``torch.func``: parameter selection, flattening, random projection.

Per-example gradients use ``vmap(grad(loss_of_one_example))`` over a collated batch. Hugging Face
models must be built with ``attn_implementation="eager"`` for this: the SDPA / flash kernels and some
mask helpers take data-dependent branches that ``vmap`` cannot batch. When ``vmap`` fails anyway, the
computation falls back (once per :class:`GradientComputer`, with a warning) to a loop of
``torch.func.grad`` over the examples of the batch, which gives the same numbers, only slower.

Every loss here is :func:`untrac_pl.losses.per_example_loss`: mean token NLL over labels != -100.
The model should be in eval mode (dropout off); :func:`eval_mode` is the context the scorers use.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
from collections import OrderedDict
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch.func import functional_call, grad, vmap

from untrac_pl.losses import lm_inputs, per_example_loss

ParamFilter = Union[None, str, "re.Pattern[str]", Sequence[str], Callable[[str, torch.nn.Parameter], bool]]


# --------------------------------------------------------------------------------------------------
# parameter selection
# --------------------------------------------------------------------------------------------------
def select_params(model: torch.nn.Module, params: ParamFilter = None) -> "OrderedDict[str, torch.nn.Parameter]":
    """The parameters that gradients are taken with respect to, by name (model order).

    ``params``:
      * ``None``: every parameter with ``requires_grad`` (for a PEFT/LoRA model: the adapters);
      * a ``str`` or compiled regex: parameters whose name matches it (``re.search``), e.g. ``"lora_"``;
      * a list/tuple of module-name prefixes: ``"transformer.h.1"`` selects
        ``transformer.h.1.*`` but not ``transformer.h.10.*``;
      * a callable ``(name, param) -> bool``.
    Tied weights appear once (``named_parameters`` de-duplicates them). Raises if nothing matches.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params) and not isinstance(params, (str, re.Pattern)):
        chosen = [(n, p) for n, p in named if params(n, p)]
    elif isinstance(params, (str, re.Pattern)):
        rx = re.compile(params) if isinstance(params, str) else params
        chosen = [(n, p) for n, p in named if rx.search(n)]
    else:
        prefixes = [str(s).rstrip(".") for s in params]
        chosen = [(n, p) for n, p in named if any(n == s or n.startswith(s + ".") for s in prefixes)]
    if not chosen:
        raise ValueError(f"parameter filter {params!r} selected no parameters of {type(model).__name__}")
    return OrderedDict(chosen)


class ParamSpace:
    """Flat layout of a set of named parameters: ``flatten`` / ``unflatten`` with leading batch dims."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [int(p.numel()) for p in params.values()]
        self.numel = int(sum(self.numels))

    def flatten(self, tensors: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        parts = []
        for name in self.names:
            t = tensors[name]
            lead = t.shape[:batch_dims]
            parts.append(t.reshape(*lead, -1).float())
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor, like: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
        lead = flat.shape[:-1]
        out = {}
        for name, chunk, shape in zip(self.names, torch.split(flat, self.numels, dim=-1), self.shapes):
            t = chunk.reshape(*lead, *shape)
            if like is not None:
                t = t.to(like[name].dtype)
            out[name] = t
        return out


# --------------------------------------------------------------------------------------------------
# losses as functions of the selected parameters
# --------------------------------------------------------------------------------------------------
def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def batch_losses(model: torch.nn.Module, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example losses ``[B]`` of ``model`` with ``params`` substituted (others: the model's own)."""
    out = functional_call(
        model, dict(params), (), lm_inputs(model, batch)
    )
    return per_example_loss(_logits(out), batch["labels"])


def _single_loss(model: torch.nn.Module):
    def loss(params, input_ids, attention_mask, labels):
        batch = {"input_ids": input_ids[None], "attention_mask": attention_mask[None], "labels": labels[None]}
        return batch_losses(model, params, batch)[0]

    return loss


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring; the previous train/eval flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """Batch on ``device``; tensors made under ``torch.inference_mode`` (e.g. in a Lightning predict
    loop) are cloned into normal tensors, which autograd may save."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_inference():
                with torch.inference_mode(False):
                    v = v.clone()
        out[k] = v
    return out


def grad_enabled_scope(fn):
    """Decorator: run outside inference mode (torch.func needs it) and under ``no_grad`` (torch.func's
    transforms ignore an outer ``no_grad``; it only stops the model's own parameters being tracked)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------------
# random projection
# --------------------------------------------------------------------------------------------------
class RandomProjector:
    """Seeded Johnson-Lindenstrauss projection ``R`` of shape ``[P, d]`` scaled by ``1/sqrt(d)``.

    ``E[<Rx, Ry>] = <x, y>``, so dot products (GradDot, TracIn, LiSSA influence) are preserved in
    expectation with relative error ~ ``1/sqrt(d)``. The matrix is generated in row blocks of
    ``block_rows`` rows, block ``b`` from a CPU generator seeded with ``seed * 1_000_003 + b``: it depends
    only on ``(P, d, seed, kind, block_rows)``, not on the device or the batch, so train and query
    gradients are always projected by the same matrix. Blocks are cached while the whole matrix stays
    under ``cache_bytes``; past that they are regenerated on every call (memory-bounded, slower).
    """

    def __init__(self, in_dim: int, dim: int, *, seed: int = 0, kind: str = "rademacher",
                 block_rows: int = 65536, cache_bytes: int = 512 * 2**20):
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"projection kind must be 'gaussian' or 'rademacher', got {kind!r}")
        if dim < 1:
            raise ValueError(f"projection dim must be >= 1, got {dim}")
        self.in_dim, self.dim, self.seed, self.kind = int(in_dim), int(dim), int(seed), kind
        self.block_rows = int(block_rows)
        self.cache = in_dim * dim * 4 <= cache_bytes
        self._blocks: dict = {}

    def _block(self, b: int, rows: int, device: torch.device) -> torch.Tensor:
        key = (b, device)
        if key in self._blocks:
            return self._blocks[key]
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + b)
        if self.kind == "gaussian":
            mat = torch.randn(rows, self.dim, generator=gen)
        else:
            mat = torch.randint(0, 2, (rows, self.dim), generator=gen).float().mul_(2).sub_(1)
        mat = mat.mul_(1.0 / math.sqrt(self.dim)).to(device)
        if self.cache:
            self._blocks[key] = mat
        return mat

    @torch.no_grad()
    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.shape[-1] != self.in_dim:
            raise ValueError(f"projector built for dim {self.in_dim}, got {flat.shape[-1]}")
        lead = flat.shape[:-1]
        x = flat.reshape(-1, self.in_dim).float()
        out = torch.zeros(x.shape[0], self.dim, device=x.device)
        for b, start in enumerate(range(0, self.in_dim, self.block_rows)):
            stop = min(start + self.block_rows, self.in_dim)
            out += x[:, start:stop] @ self._block(b, stop - start, x.device)
        return out.reshape(*lead, self.dim)


# --------------------------------------------------------------------------------------------------
# per-example gradients
# --------------------------------------------------------------------------------------------------
class GradientComputer:
    """Per-example flat gradients ``[B, P]`` (float32) of the selected parameters.

    ``use_vmap``: ``True`` (default) tries ``vmap(grad)`` and falls back to a per-example loop on the
    first failure; ``False`` always loops. ``chunk_size`` is passed to ``vmap`` to bound memory.
    """

    def __init__(self, model: torch.nn.Module, params: ParamFilter = None, *, use_vmap: bool = True,
                 chunk_size: Optional[int] = None):
        self.model = model
        self.named = select_params(model, params)
        self.space = ParamSpace(self.named)
        self.use_vmap = use_vmap
        self.chunk_size = chunk_size
        self.device = next(iter(self.named.values())).device
        self._loss1 = _single_loss(model)

    def params(self) -> dict:
        """Detached current values of the selected parameters (re-read: checkpoints change them)."""
        return {n: p.detach() for n, p in self.named.items()}

    def _vmapped(self, params, batch):
        fn = vmap(grad(self._loss1), in_dims=(None, 0, 0, 0), chunk_size=self.chunk_size)
        return fn(params, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def _looped(self, params, batch):
        g1 = grad(self._loss1)
        rows = [g1(params, batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i])
                for i in range(batch["input_ids"].shape[0])]
        return {n: torch.stack([r[n] for r in rows]) for n in self.space.names}

    @grad_enabled_scope
    def per_example(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, self.device)
        params = self.params()
        if self.use_vmap:
            try:
                grads = self._vmapped(params, batch)
            except Exception as err:  # data-dependent control flow, unsupported op, ...
                warnings.warn(
                    f"vmap per-example gradients failed ({type(err).__name__}: {err}); falling back to a "
                    "per-example loop. Build Hugging Face models with attn_implementation='eager' to "
                    "keep the vectorised path.", RuntimeWarning, stacklevel=2)
                self.use_vmap = False
                grads = self._looped(params, batch)
        else:
            grads = self._looped(params, batch)
        return self.space.flatten(grads, batch_dims=1)
