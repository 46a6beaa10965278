"""GradDot, GradCos, TracIn, HIF (LiSSA, Arnoldi): query-major score matrices.

Conventions (docs/design.md): ``scores[query_unit, train_unit]``; positive = the training unit helped
the model produce the query. With ``g`` the gradient of the mean-token-NLL loss at the current weights:

* GradDot      ``g_q . g_t``   (an SGD step on ``t`` lowers the query loss by ``lr * g_q . g_t``)
* GradCos      ``g_q . g_t / (|g_q| |g_t|)``
* TracIn       ``sum_c lr_c * g_q^c . g_t^c / |g_t^c|`` over checkpoints ``c`` (the paper: "LR x dot
               product with normalised training gradients"); ``normalize_train=False`` gives the
               original TracInCP ``sum_c lr_c g_q^c . g_t^c`` (what captum computes)
* HIF          ``g_q^T (H + lambda I)^{-1} g_t``, ``H`` the Hessian of the mean training loss; the
               iHVP by LiSSA or through the top Arnoldi eigenpairs (``sum_i (g_q.v_i)(g_t.v_i)/(l_i+lambda)``)

Group level ("units" = groups): a group's loss is the MEAN loss of its examples, so its gradient is the
mean of its examples' gradients, and every method is applied to group gradients exactly as to example
gradients. For the bilinear methods (GradDot, HIF, and TracIn's query side) this equals the mean of the
example scores. GradCos and TracIn normalise the *training-set* gradient (paper: "training-set gradient
normalised"; the paper ran all baselines on whole datasets), so by default (``group_normalize="group"``)
the group's mean gradient is normalised; ``group_normalize="example"`` instead normalises each example
gradient and averages (the mean of the example-level scores over the group's members).

Group score matrices: with ``train_groups`` the columns are training groups (rows are query groups when
``query_groups`` is given, else query examples); with only ``query_groups`` the columns are training
examples; with neither, ``group_scores`` is ``None``.

Memory: query-side vectors (gradients, iHVPs, eigen-coordinates; ``[Q + Qg, D]``) are computed once and
reused for every training batch; training gradients are streamed a batch at a time (``[B, P]``), and
per training group only a running sum ``[K, D]`` is kept. ``D`` = number of selected parameters, or
the projection dimension, or ``top_k`` for Arnoldi.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from untrac_pl.baselines._inputs import (
    IndexTracker,
    _is_example,
    as_batches,
    group_map,
    mean_by_group,
)
from untrac_pl.baselines.gradients import (
    GradientComputer,
    RandomProjector,
    batch_losses,
    eval_mode,
    grad_enabled_scope,
    to_device,
)
from untrac_pl.baselines.hessian import (
    HessianOperator,
    arnoldi,
    auto_damping,
    extreme_eigenvalues,
    lissa,
)

Checkpoint = Tuple[Union[dict, str], float]


# --------------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------------
def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-20)


class _Setup:
    """Batches, groups, gradient computer and projector shared by every method."""

    def __init__(self, model, train, queries, *, train_groups, query_groups, params=None,
                 projection_dim: Optional[int] = None, projection_kind: str = "rademacher",
                 projection_seed: int = 0, batch_size: int = 8, pad_token_id: int = 0,
                 use_vmap: bool = True, vmap_chunk_size: Optional[int] = None,
                 group_normalize: str = "group", progress: Optional[Callable[[int, Optional[int]], None]] = None,
                 hessian_progress: Optional[Callable[[str, int, int], None]] = None, example_scores: bool = True):
        if group_normalize not in ("group", "example"):
            raise ValueError(f"group_normalize must be 'group' or 'example', got {group_normalize!r}")
        if not example_scores and (train_groups is None or query_groups is None):
            raise ValueError("example_scores=False scores groups against groups: it needs both train_groups and query_groups")
        self.model = model
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.train_raw, self.queries_raw = train, queries
        self.train = as_batches(train, batch_size=batch_size, pad_token_id=pad_token_id)
        self.queries = as_batches(queries, batch_size=batch_size, pad_token_id=pad_token_id)
        self.gc = GradientComputer(model, params, use_vmap=use_vmap, chunk_size=vmap_chunk_size)
        self.projector = (RandomProjector(self.gc.space.numel, projection_dim, seed=projection_seed,
                                          kind=projection_kind) if projection_dim else None)
        self.train_groups_raw = train_groups
        self.query_groups_raw = query_groups
        self.group_normalize = group_normalize
        self.progress = progress  # progress(batches done, batches per pass) after each training batch of a pass
        self.hessian_progress = hessian_progress  # hessian_progress(stage, done, total) in the HIF Hessian work
        self.info = {"n_params": self.gc.space.numel, "param_names": list(self.gc.space.names),
                     "projection_dim": projection_dim,
                     "projection_kind": projection_kind if projection_dim else None,
                     "projection_seed": projection_seed if projection_dim else None,
                     "group_normalize": group_normalize}
        # train group ids are indexed by training-example index; K known up front
        if train_groups is not None:
            self.train_gid, self.train_names = group_map(train_groups, len(list(train_groups)), "train")
        else:
            self.train_gid, self.train_names = None, None
        self.query_gid = self.query_names = None
        # example_scores=False: only the group matrix is wanted, and every method's group score is a function
        # of the groups' MEAN gradients (linear maps and a final normalisation), so those are taken directly:
        # one backward of each group's summed loss per batch instead of per-example gradients (vmap).
        # group_normalize="example" normalises each example gradient first and still needs them.
        self.example_scores = example_scores
        self.by_group_means = not example_scores and group_normalize == "group"
        if self.by_group_means:
            self.query_gid, self.query_names = group_map(query_groups, len(list(query_groups)), "query")
            self.info["group_gradients"] = "group mean gradients (one backward per group and batch)"

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        return self.projector(flat) if self.projector is not None else flat

    def query_grads(self) -> torch.Tensor:
        """Full (unprojected) per-example query gradients ``[Q, P]``, rows in query-index order
        (with ``by_group_means``: the query groups' mean gradients ``[Qg, P]``)."""
        if self.by_group_means:
            batches = self.grouped(self.queries_raw, self.queries, self.query_gid)
            return self.group_means(batches, self.query_gid, len(self.query_names), lambda g: g, "query")
        tracker = IndexTracker("query")
        rows = []
        for batch in self.queries:
            tracker.positions(batch)
            rows.append(self.gc.per_example(batch))
        order = tracker.finish()
        G = torch.cat(rows)
        out = torch.empty_like(G)
        out[order.to(G.device)] = G
        if self.query_groups_raw is not None and self.query_gid is None:
            self.query_gid, self.query_names = group_map(self.query_groups_raw, out.shape[0], "query")
        return out

    def query_group_rows(self, F: torch.Tensor) -> Optional[torch.Tensor]:
        """Rows used for the group-score matrix, from query example vectors ``F`` (linear: means)."""
        if self.by_group_means:  # F already holds one row per query group
            return F
        if self.query_gid is not None:
            return mean_by_group(F, self.query_gid, len(self.query_names))
        if self.train_gid is not None:
            return F
        return None

    def group_means(self, batches, gid: torch.Tensor, k: int, featurize: Callable, what: str,
                    progress: Optional[Callable[[int, Optional[int]], None]] = None) -> torch.Tensor:
        """``featurize`` of each group's mean gradient ``[k, D]``: per batch one forward and, for each group
        in it, one backward of that group's summed per-example loss (``featurize`` must be linear)."""
        tracker = IndexTracker(what)
        params = {n: p.detach().requires_grad_(True) for n, p in self.gc.params().items()}
        # the parameters outside the selection go in detached: autograd records only what it differentiates
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in params}
        total = len(batches) if hasattr(batches, "__len__") else None
        sums = None
        for done, batch in enumerate(batches, start=1):
            idx = tracker.positions(batch)
            if idx.max() >= len(gid):
                raise ValueError(f"{what}_groups is shorter than the {what} data")
            batch_gid = gid[idx]
            present = torch.unique(batch_gid).tolist()
            with torch.enable_grad():  # the methods run under no_grad (see grad_enabled_scope)
                losses = batch_losses(self.model, {**frozen, **params}, to_device(batch, self.gc.device))
                per_group = [losses[(batch_gid == g).to(losses.device)].sum() for g in present]
            for j, g in enumerate(present):
                grads = torch.autograd.grad(per_group[j], list(params.values()), retain_graph=j < len(present) - 1)
                row = featurize(self.gc.space.flatten(dict(zip(params, grads)))[None])[0]
                if sums is None:
                    sums = torch.zeros(k, row.shape[0], device=row.device, dtype=row.dtype)
                sums[g] += row
            if progress is not None:
                progress(done, total)
        n = tracker.finish().numel()
        if len(gid) != n:
            raise ValueError(f"{what}_groups has {len(gid)} entries for {n} {what} examples")
        counts = torch.bincount(gid, minlength=k).clamp_min(1).to(sums)
        return sums / counts[:, None]

    def stream(self, Qf: torch.Tensor, Qgf: Optional[torch.Tensor], featurize: Callable,
               normalize_train: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One pass over the training data: example scores ``[Q, N]`` (``None`` without
        ``example_scores``) and group scores (or None)."""
        if self.by_group_means:
            Gk = self.group_means(self.grouped(self.train_raw, self.train, self.train_gid), self.train_gid, len(self.train_names), featurize, "train", self.progress)
            return None, Qgf @ (_normalize(Gk) if normalize_train else Gk).T
        S, Sg = self._stream_examples(Qf, Qgf, featurize, normalize_train)
        return (S if self.example_scores else None), Sg

    def grouped(self, data, batches, gid: torch.Tensor):
        """Batches for :meth:`group_means`: the examples sorted by group (mostly one group per batch, so
        one backward per batch) when they were given as examples; ``batches`` as given otherwise."""
        if not (isinstance(data, Sequence) and len(data) > 0 and _is_example(data[0])):
            return batches
        if len(gid) != len(data):
            raise ValueError(f"{len(gid)} group entries for {len(data)} examples")
        index = [int(ex.get("index", pos)) for pos, ex in enumerate(data)]
        if sorted(index) != list(range(len(data))):
            raise ValueError(f"'index' values must be a permutation of 0..{len(data) - 1}")
        order = sorted(range(len(data)), key=lambda pos: int(gid[index[pos]]))
        examples = [{**data[pos], "index": index[pos]} for pos in order]
        return as_batches(examples, batch_size=self.batch_size, pad_token_id=self.pad_token_id)

    def _stream_examples(self, Qf: torch.Tensor, Qgf: Optional[torch.Tensor], featurize: Callable,
                         normalize_train: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        tracker = IndexTracker("train")
        cols, gcols = [], []
        gsum = None
        if self.train_gid is not None:
            gsum = torch.zeros(len(self.train_names), Qf.shape[1], device=Qf.device)
        total = len(self.train) if hasattr(self.train, "__len__") else None
        for done, batch in enumerate(self.train, start=1):
            idx = tracker.positions(batch)
            F = featurize(self.gc.per_example(batch))
            Fn = _normalize(F) if normalize_train else F
            cols.append(Qf @ Fn.T)
            if gsum is not None:
                if idx.max() >= len(self.train_gid):
                    raise ValueError("train_groups is shorter than the training data")
                use = Fn if (normalize_train and self.group_normalize == "example") else F
                gsum.index_add_(0, self.train_gid[idx].to(F.device), use)
            elif Qgf is not None:
                gcols.append(Qgf @ Fn.T)
            if self.progress is not None:
                self.progress(done, total)
        order = tracker.finish().to(Qf.device)
        n = order.numel()
        S = torch.empty(Qf.shape[0], n, device=Qf.device)
        S[:, order] = torch.cat(cols, dim=1)
        Sg = None
        if gsum is not None:
            if len(self.train_gid) != n:
                raise ValueError(f"train_groups has {len(self.train_gid)} entries for {n} training examples")
            counts = torch.bincount(self.train_gid, minlength=gsum.shape[0]).clamp_min(1).to(gsum)
            Gk = gsum / counts[:, None]
            if normalize_train and self.group_normalize == "group":
                Gk = _normalize(Gk)
            Sg = Qgf @ Gk.T
        elif Qgf is not None:
            Sg = torch.empty(Qgf.shape[0], n, device=Qf.device)
            Sg[:, order] = torch.cat(gcols, dim=1)
        return S, Sg

    def result(self, method: str, S: torch.Tensor, Sg: Optional[torch.Tensor], **info) -> dict:
        self.info.update(info)
        if Sg is None:
            unit_rows = unit_cols = None
        else:
            unit_rows = "query_group" if self.query_gid is not None else "query_example"
            unit_cols = "train_group" if self.train_gid is not None else "train_example"
        return {"method": method,
                "example_scores": None if S is None else S.detach().float().cpu(),
                "group_scores": None if Sg is None else Sg.detach().float().cpu(),
                "train_groups": self.train_names, "query_groups": self.query_names,
                "group_rows": unit_rows, "group_cols": unit_cols,
                "info": self.info}


# --------------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------------
@grad_enabled_scope
def graddot(model, train, queries, *, train_groups=None, query_groups=None, **opts) -> dict:
    """GradDot: ``g_q . g_t`` at the current weights (see module docstring for options/output)."""
    t0 = time.perf_counter()
    st = _Setup(model, train, queries, train_groups=train_groups, query_groups=query_groups, **opts)
    with eval_mode(model):
        Qf = st.project(st.query_grads())
        S, Sg = st.stream(Qf, st.query_group_rows(Qf), st.project, normalize_train=False)
    return st.result("graddot", S, Sg, seconds=time.perf_counter() - t0)


@grad_enabled_scope
def gradcos(model, train, queries, *, train_groups=None, query_groups=None, **opts) -> dict:
    """GradCos: cosine of query and training gradients (group level: see ``group_normalize``)."""
    t0 = time.perf_counter()
    st = _Setup(model, train, queries, train_groups=train_groups, query_groups=query_groups, **opts)
    with eval_mode(model):
        Gq = st.project(st.query_grads())
        Qf = _normalize(Gq)
        if st.group_normalize == "group":
            Qgf = st.query_group_rows(Gq)
            Qgf = None if Qgf is None else _normalize(Qgf)
        else:
            Qgf = st.query_group_rows(Qf)
        S, Sg = st.stream(Qf, Qgf, st.project, normalize_train=True)
    return st.result("gradcos", S, Sg, seconds=time.perf_counter() - t0)


def _load_checkpoint(ckpt, device) -> dict:
    if isinstance(ckpt, (str, bytes)) or hasattr(ckpt, "__fspath__"):
        from safetensors.torch import load_file
        return load_file(str(ckpt), device=str(device))
    if isinstance(ckpt, dict):
        return ckpt
    raise TypeError(f"a checkpoint is a state dict or a path to a .safetensors file, got {type(ckpt).__name__}")


@grad_enabled_scope
def tracin(model, train, queries, *, checkpoints: Sequence[Checkpoint], train_groups=None,
           query_groups=None, normalize_train: bool = True, **opts) -> dict:
    """TracIn: ``sum_c lr_c * g_q^c . g_t^c / |g_t^c|`` over ``checkpoints`` = ``[(state_dict | path, lr)]``.

    Each checkpoint is loaded into ``model`` (``load_state_dict(strict=False)``: a LoRA-only state dict
    is fine); the model's weights are restored afterwards. ``normalize_train=False``: TracInCP proper.
    """
    if not checkpoints:
        raise ValueError("tracin needs at least one (state_dict or path, lr) checkpoint")
    t0 = time.perf_counter()
    st = _Setup(model, train, queries, train_groups=train_groups, query_groups=query_groups, **opts)
    device = st.gc.device
    current = model.state_dict()
    saved = {}  # only the entries the checkpoints overwrite
    S_tot = Sg_tot = None
    try:
        with eval_mode(model):
            for ckpt, lr in checkpoints:
                sd = _load_checkpoint(ckpt, device)
                for k in sd:
                    if k in current and k not in saved:
                        saved[k] = current[k].detach().clone()
                res = model.load_state_dict(sd, strict=False)
                if res.unexpected_keys:
                    raise KeyError(f"checkpoint has keys the model lacks: {res.unexpected_keys[:5]}")
                Qf = st.project(st.query_grads())
                S, Sg = st.stream(Qf, st.query_group_rows(Qf), st.project, normalize_train=normalize_train)
                if S is not None:
                    S_tot = float(lr) * S if S_tot is None else S_tot + float(lr) * S
                if Sg is not None:
                    Sg_tot = float(lr) * Sg if Sg_tot is None else Sg_tot + float(lr) * Sg
    finally:
        with torch.no_grad():
            model.load_state_dict(saved, strict=False)
    return st.result("tracin", S_tot, Sg_tot, checkpoints=len(checkpoints),
                     learning_rates=[float(lr) for _, lr in checkpoints], normalize_train=normalize_train,
                     seconds=time.perf_counter() - t0)


def _hessian_op(st: _Setup, hessian_batches, hvp_mode: str) -> HessianOperator:
    if hessian_batches is None:
        batches = st.train
    else:
        batches = as_batches(hessian_batches, batch_size=st.batch_size, pad_token_id=st.pad_token_id)
    return HessianOperator(st.gc, list(batches), mode=hvp_mode)


def _stage(st, name: str):
    """``st``'s Hessian progress hook for one stage (``None`` without a hook)."""
    hook = st.hessian_progress
    return None if hook is None else (lambda done, total: hook(name, done, total))


def _damping(st, op, damping, damping_floor, damping_margin, damping_iterations, seed, lam=None):
    if lam is None:
        lam = extreme_eigenvalues(op, st.gc.space.numel, damping_iterations, seed=seed, progress=_stage(st, "eigenvalues"))
    lam_min, lam_max = lam
    d = float(damping) if damping is not None else auto_damping(lam_min, lam_max, floor=damping_floor,
                                                                margin=damping_margin)
    if damping is not None and lam_min + d <= 0:
        warnings.warn(f"damping {d:g} does not exceed the most negative curvature seen ({lam_min:g}): "
                      "H + damping*I is not positive definite and iHVP-based scores decorrelate.",
                      RuntimeWarning, stacklevel=3)
    return d, lam_min, lam_max


@grad_enabled_scope
def hif_lissa(model, train, queries, *, train_groups=None, query_groups=None, iterations: int = 10,
              scale: Optional[float] = None, damping: Optional[float] = None, damping_floor: float = 1e-3,
              damping_margin: float = 0.01, damping_iterations: int = 20, stochastic: bool = True,
              hessian_batches=None, seed: int = 0, hvp_mode: str = "fwd_rev", query_ihvp: str = "example",
              **opts) -> dict:
    """HIF with LiSSA iHVPs of the query gradients (paper: 10 iterations).

    ``scale=None``: ``1.5 * (lambda_max + damping)`` from the Lanczos estimate, which makes the
    recursion contract. With both ``damping`` and ``scale`` given, no eigenvalues are estimated, so the damping is
    not checked against the most negative curvature (no warning; ``lambda_*_est`` are ``None``). ``hessian_batches``: data of the Hessian (default: the training batches);
    ``stochastic``: one Hessian batch per iteration (cycled) instead of all of them. ``hvp_mode``:
    ``"fwd_rev"`` (jvp of grad, default) or ``"rev_rev"`` (vjp of grad), see
    :class:`~untrac_pl.baselines.hessian.HessianOperator`. A random
    projection, if asked for, is applied to the query iHVPs and the training gradients alike.
    ``query_ihvp="group"`` (needs ``query_groups``): only the query groups' mean gradients go through
    LiSSA (the map is linear, so the group scores equal those of ``"example"`` at a fraction of the
    cost); ``example_scores`` is then ``None``.
    """
    if query_ihvp not in ("example", "group"):
        raise ValueError(f"query_ihvp must be 'example' or 'group', got {query_ihvp!r}")
    if query_ihvp == "group" and query_groups is None:
        raise ValueError("query_ihvp='group' needs query_groups")
    t0 = time.perf_counter()
    st = _Setup(model, train, queries, train_groups=train_groups, query_groups=query_groups, **opts)
    with eval_mode(model):
        op = _hessian_op(st, hessian_batches, hvp_mode)
        if damping is not None and scale is not None:  # nothing to estimate
            d, lam_min, lam_max, s = float(damping), None, None, float(scale)
        else:
            d, lam_min, lam_max = _damping(st, op, damping, damping_floor, damping_margin, damping_iterations,
                                           seed)
            s = float(scale) if scale is not None else 1.5 * (abs(lam_max) + d)
        G = st.query_grads()
        if query_ihvp == "group":
            G = st.query_group_rows(G)  # group means; linear, so iHVP(mean) = mean(iHVPs)
        ihvp = lissa(op, G, damping=d, scale=s, iterations=iterations, stochastic=stochastic, progress=_stage(st, "LiSSA"))
        Qf = st.project(ihvp)
        if query_ihvp == "group":
            _, Sg = st.stream(Qf, Qf, st.project, normalize_train=False)
            S = None
        else:
            S, Sg = st.stream(Qf, st.query_group_rows(Qf), st.project, normalize_train=False)
    return st.result("hif_lissa", S, Sg, query_ihvp=query_ihvp, damping=d, lambda_min_est=lam_min, lambda_max_est=lam_max,
                     lissa_scale=s, lissa_iterations=iterations, lissa_stochastic=stochastic, hvp_mode=hvp_mode,
                     hvp_calls=op.calls, seconds=time.perf_counter() - t0)


@grad_enabled_scope
def hif_arnoldi(model, train, queries, *, train_groups=None, query_groups=None, iterations: int = 200,
                top_k: int = 100, damping: Optional[float] = None, damping_floor: float = 1e-3,
                damping_margin: float = 0.01, hessian_batches=None, seed: int = 0, select: str = "magnitude",
                hvp_mode: str = "fwd_rev", **opts) -> dict:
    """HIF through the top-``top_k`` Arnoldi eigenpairs (paper: 200 iterations, top 100).

    ``score = sum_i (g_q.v_i)(g_t.v_i) / (l_i + damping)``; eigenpairs by magnitude (``select="largest"``:
    algebraically largest, as captum does). The default damping uses the extreme Ritz values of the
    same Krylov space. Pairs with ``l_i + damping <= 0`` (possible only with an explicit, too small
    damping) are dropped with a warning. ``hvp_mode`` as in :func:`hif_lissa`.
    """
    if opts.get("projection_dim"):
        raise ValueError("hif_arnoldi already scores in the top_k-dimensional eigenbasis; drop projection_dim")
    t0 = time.perf_counter()
    st = _Setup(model, train, queries, train_groups=train_groups, query_groups=query_groups, **opts)
    with eval_mode(model):
        op = _hessian_op(st, hessian_batches, hvp_mode)
        eig = arnoldi(op, st.gc.space.numel, iterations, top_k, seed=seed, select=select, progress=_stage(st, "Arnoldi"))
        d, lam_min, lam_max = _damping(st, op, damping, damping_floor, damping_margin, 0, seed,
                                       lam=(eig.ritz_min, eig.ritz_max))
        keep = (eig.values + d) > 1e-12
        if not bool(keep.all()):
            warnings.warn(f"dropping {int((~keep).sum())} eigenpairs with eigenvalue + damping <= 0",
                          RuntimeWarning, stacklevel=2)
        V = eig.vectors[keep]
        w = 1.0 / (eig.values[keep] + d)
        Qf = (st.query_grads() @ V.T) * w
        S, Sg = st.stream(Qf, st.query_group_rows(Qf), lambda g: g @ V.T, normalize_train=False)
    return st.result("hif_arnoldi", S, Sg, damping=d, lambda_min_est=lam_min, lambda_max_est=lam_max,
                     arnoldi_iterations=eig.iterations, top_k=int(keep.sum()), select=select, hvp_mode=hvp_mode,
                     eigenvalues=eig.values[keep].tolist(), hvp_calls=op.calls,
                     seconds=time.perf_counter() - t0)
