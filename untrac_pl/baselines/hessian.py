"""Hessian-vector products (forward-over-reverse), LiSSA, Arnoldi and the default damping.

The Hessian is that of the **mean** training loss over the Hessian data (every example weighs the same;
each example's loss is the mean token NLL), with respect to the selected parameters:
``H = (1/N) sum_i d^2 L_i / d theta^2``. An HVP is ``jvp(grad(f), (theta,), (v,))``: one forward-mode
pass through one reverse pass, no double backward. Several vectors at once go through ``vmap``
(a per-vector loop if that fails).

Damping (``damping=None``, the default): an influence function needs ``H + lambda I`` positive
definite, and the paper notes every iHVP method decorrelates when it is not. We estimate the extreme
eigenvalues with a short Lanczos/Arnoldi run (Ritz values; ``damping_iterations`` HVPs) and set

    lambda = max(damping_floor, max(0, -lambda_min) + damping_margin * |lambda_max|)

i.e. just past the most negative curvature seen, plus a small fraction of the top curvature (Ritz
values lie inside the spectrum, so ``-lambda_min`` is an under-estimate; the margin covers that).
An explicit ``damping=`` overrides all of this.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch.func import grad, jvp, vjp, vmap

from untrac_pl.baselines.gradients import (
    GradientComputer,
    batch_losses,
    grad_enabled_scope,
    to_device,
)


class HessianOperator:
    """``H @ v`` for the mean loss over ``batches``; accepts ``[P]`` or ``[m, P]`` float tensors.

    ``mode="fwd_rev"`` (default): ``jvp(grad(f))``, forward-over-reverse, no double graph kept in
    memory. ``mode="rev_rev"``: ``vjp(grad(f))``, reverse-over-reverse; it builds the double-backward
    graph of a batch once and applies it to every vector, which on CPU is often faster (see
    benchmarks/README.md) at the cost of holding that graph in memory.
    """

    def __init__(self, gc: GradientComputer, batches: Sequence[Mapping[str, torch.Tensor]], *,
                 mode: str = "fwd_rev"):
        if mode not in ("fwd_rev", "rev_rev"):
            raise ValueError(f"hvp mode must be 'fwd_rev' or 'rev_rev', got {mode!r}")
        self.mode = mode
        self.gc = gc
        self.batches = list(batches)  # moved to the device one batch at a time
        if not self.batches:
            raise ValueError("the Hessian needs at least one batch of data")
        self.sizes = [int(b["input_ids"].shape[0]) for b in self.batches]
        self.n_examples = sum(self.sizes)
        self.dim = gc.space.numel
        self.calls = 0  # number of single-vector, single-batch HVPs done (a cost counter)
        self._use_vmap = True

    def _batch_hvp_sum(self, batch, V: torch.Tensor) -> torch.Tensor:
        """HVP of the SUMMED loss over one batch, for each row of ``V`` ``[m, P]``."""
        params = self.gc.params()
        space = self.gc.space
        model = self.gc.model

        def f(p):
            return batch_losses(model, p, batch).sum()

        if self.mode == "fwd_rev":
            def hvp1(v):
                return jvp(grad(f), (params,), (v,))[1]
        else:  # reverse-over-reverse: one double graph per batch, re-used by every vector
            _, pullback = vjp(grad(f), params)

            def hvp1(v):
                return pullback(v)[0]

        tangents = space.unflatten(V, like=params)
        self.calls += V.shape[0]
        if self._use_vmap and V.shape[0] > 1:
            try:
                out = vmap(hvp1)(tangents)
                return space.flatten(out, batch_dims=1)
            except Exception as err:
                warnings.warn(f"vmap over HVPs failed ({type(err).__name__}: {err}); looping over vectors.",
                              RuntimeWarning, stacklevel=2)
                self._use_vmap = False
        rows = [space.flatten(hvp1({n: t[i] for n, t in tangents.items()})) for i in range(V.shape[0])]
        return torch.stack(rows)

    @staticmethod
    def _as_matrix(V: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        return (V[None], True) if V.dim() == 1 else (V, False)

    @grad_enabled_scope
    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """Full-data HVP (mean loss over every Hessian example)."""
        M, squeeze = self._as_matrix(V)
        M = M.to(self.gc.device).float()
        out = torch.zeros_like(M)
        for batch in self.batches:
            out += self._batch_hvp_sum(to_device(batch, self.gc.device), M)
        out /= self.n_examples
        return out[0] if squeeze else out

    @grad_enabled_scope
    def on_batch(self, i: int, V: torch.Tensor) -> torch.Tensor:
        """HVP of the mean loss over Hessian batch ``i % n_batches`` only (stochastic LiSSA)."""
        M, squeeze = self._as_matrix(V)
        M = M.to(self.gc.device).float()
        j = i % len(self.batches)
        out = self._batch_hvp_sum(to_device(self.batches[j], self.gc.device), M) / self.sizes[j]
        return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------------
# Arnoldi (Lanczos with full re-orthogonalisation: H is symmetric)
# --------------------------------------------------------------------------------------------------
@dataclass
class Eigenpairs:
    values: torch.Tensor   # [k], sorted by |value| (or value, select="largest") descending
    vectors: torch.Tensor  # [k, P], orthonormal rows
    ritz_min: float        # smallest Ritz value of the whole Krylov space
    ritz_max: float        # largest Ritz value of the whole Krylov space
    iterations: int        # Krylov dimension actually built


@grad_enabled_scope
def arnoldi(op, dim: int, n_iters: int, top_k: Optional[int] = None, *, seed: int = 0,
            tol: float = 1e-7, select: str = "magnitude", device=None, store_device=None,
            progress: Optional[Callable[[int, int], None]] = None) -> Eigenpairs:
    """Top-``top_k`` eigenpairs of ``op`` from an ``n_iters``-step Arnoldi iteration.

    ``select="magnitude"`` (default, Schioppa et al.) keeps the ``top_k`` largest ``|lambda|``, so strongly
    negative directions are kept too; ``"largest"`` keeps the algebraically largest (what captum's
    ``ArnoldiInfluenceFunction`` does).

    Follows Schioppa et al. (2022), the method the paper ran (200 iterations, top 100): build an
    orthonormal Krylov basis ``Q`` from a seeded random start, project ``op`` onto it, diagonalise the
    small matrix and lift the eigenvectors back to parameter space. Classical Gram-Schmidt is applied
    twice per step (numerically a full re-orthogonalisation). Memory: ``(n_iters + 1) * P`` floats on
    ``store_device`` (default: the op's device). Stops early when the Krylov space is exhausted.
    ``progress(done, total)`` is called after each Hessian-vector product.
    """
    n_iters = int(min(n_iters, dim))
    device = device if device is not None else getattr(getattr(op, "gc", None), "device", "cpu")
    store = store_device if store_device is not None else device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    q = torch.randn(dim, generator=gen).to(store)
    Q = torch.zeros(n_iters + 1, dim, device=store)
    Q[0] = q / q.norm()
    Hm = torch.zeros(n_iters + 1, n_iters, dtype=torch.float64)
    k_done = 0
    for k in range(n_iters):
        w = op(Q[k].to(device)).to(store).float()
        for _ in range(2):
            c = Q[: k + 1] @ w
            w = w - Q[: k + 1].T @ c
            Hm[: k + 1, k] += c.double().cpu()
        beta = float(w.norm())
        Hm[k + 1, k] = beta
        k_done = k + 1
        if progress is not None:
            progress(k_done, n_iters)
        if beta < tol:
            break
        Q[k + 1] = w / beta
    T = Hm[:k_done, :k_done]
    T = 0.5 * (T + T.T)
    evals, evecs = torch.linalg.eigh(T)
    if select not in ("magnitude", "largest"):
        raise ValueError(f"select must be 'magnitude' or 'largest', got {select!r}")
    order = torch.argsort(evals.abs() if select == "magnitude" else evals, descending=True)
    if top_k is not None:
        order = order[: int(top_k)]
    values = evals[order].float()
    vectors = (evecs[:, order].T.float().to(store)) @ Q[:k_done]
    return Eigenpairs(values=values.to(device), vectors=vectors.to(device), ritz_min=float(evals.min()),
                      ritz_max=float(evals.max()), iterations=k_done)


def extreme_eigenvalues(op, dim: int, iterations: int = 20, *, seed: int = 0,
                        progress: Optional[Callable[[int, int], None]] = None) -> Tuple[float, float]:
    """``(lambda_min, lambda_max)`` estimates: extreme Ritz values of a short Lanczos run."""
    eig = arnoldi(op, dim, iterations, top_k=0, seed=seed, progress=progress)
    return eig.ritz_min, eig.ritz_max


def auto_damping(lambda_min: float, lambda_max: float, *, floor: float = 1e-3, margin: float = 0.01) -> float:
    """``max(floor, max(0, -lambda_min) + margin * |lambda_max|)`` (see the module docstring)."""
    return float(max(floor, max(0.0, -lambda_min) + margin * abs(lambda_max)))


# --------------------------------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------------------------------
@grad_enabled_scope
def lissa(op: HessianOperator, V: torch.Tensor, *, damping: float, scale: float, iterations: int = 10,
          stochastic: bool = True, chunk: int = 64, progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """``(H + damping I)^{-1} V`` by the LiSSA recursion (Agarwal et al. 2017; Koh & Liang 2017).

    ``h_0 = v``, ``h_j = v + (I - (H_j + damping I) / scale) h_{j-1}``, result ``h_J / scale``: a
    truncated Neumann series, which converges when ``scale > lambda_max + damping`` and
    ``H + damping I`` is positive definite. ``H_j`` is the Hessian of Hessian batch ``j`` (cycled;
    ``stochastic=True``, the usual LiSSA) or of all Hessian data (``stochastic=False``). The same batch
    sequence is used for every vector, so the map ``V -> result`` is linear (group iHVPs = means of
    example iHVPs). Rows of ``V`` are processed ``chunk`` at a time. ``progress(done, total)`` is called
    after each iteration (``total`` = iterations x chunks).
    """
    V = V.float()
    single = V.dim() == 1
    M = V[None] if single else V
    outs = []
    total = int(iterations) * ((M.shape[0] + chunk - 1) // chunk)
    for start in range(0, M.shape[0], chunk):
        v = M[start:start + chunk].to(op.gc.device)
        h = v.clone()
        for j in range(int(iterations)):
            Hh = op.on_batch(j, h) if stochastic else op(h)
            h = v + h - (Hh + damping * h) / scale
            if progress is not None:
                progress((start // chunk) * int(iterations) + j + 1, total)
        outs.append(h / scale)
    out = torch.cat(outs)
    return out[0] if single else out
