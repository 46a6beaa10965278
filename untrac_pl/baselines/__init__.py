"""Gradient and Hessian baselines of the UnTrac paper, on ``torch.func``.

    from untrac_pl.baselines import graddot
    out = graddot(model, train_examples, query_examples, train_groups=groups, params="lora_", projection_dim=4096)
    out["example_scores"]  # [Q, N], query-major, positive = the training example helped the query
    out["group_scores"]    # [Qg, K] with train_groups (group gradient = mean of example gradients)

Scoring functions: ``graddot``, ``gradcos``, ``tracin`` (needs ``checkpoints=[(state_dict | path, lr), ...]``),
``hif_lissa``, ``hif_arnoldi``, ``ekfac`` (optional, via kronfluence). The methods that wrap them, with
their options and names, are :mod:`untrac_pl.methods.gradient` (``compute_baseline_scores(name, ...)``
dispatches by name through the method registry). Build Hugging Face models with
``attn_implementation="eager"`` so per-example gradients can use ``vmap`` (a per-example loop is the
fallback). See :mod:`untrac_pl.baselines.scores` for the definitions, signs and group-level rules,
:mod:`untrac_pl.baselines.hessian` for the damping default.
"""
from untrac_pl.baselines.ekfac import ekfac_scores as ekfac
from untrac_pl.baselines.gradients import (
    GradientComputer,
    ParamSpace,
    RandomProjector,
    batch_losses,
    eval_mode,
    select_params,
)
from untrac_pl.baselines.hessian import (
    Eigenpairs,
    HessianOperator,
    arnoldi,
    auto_damping,
    extreme_eigenvalues,
    lissa,
)
from untrac_pl.baselines.scores import (
    gradcos,
    graddot,
    hif_arnoldi,
    hif_lissa,
    tracin,
)

__all__ = [
    "graddot", "gradcos", "tracin", "hif_lissa", "hif_arnoldi",
    "ekfac", "GradientComputer", "ParamSpace", "RandomProjector", "select_params", "batch_losses",
    "eval_mode", "HessianOperator", "Eigenpairs", "arnoldi", "lissa", "auto_damping", "extreme_eigenvalues",
]
