"""Attribution methods: one registry, each method declared once.

Built in: ``untrac``, ``untrac_inv`` (:mod:`untrac_pl.methods.unlearning`), ``graddot``, ``gradcos``,
``tracin``, ``hif_lissa``, ``hif_arnoldi``, ``ekfac`` (:mod:`untrac_pl.methods.gradient`). A new method
is one class registered with :func:`register` (see docs/architecture.md, "How to add a method").
"""
# isort: off
# registration order is the order methods are listed in (help, errors, tables): the unlearning methods first
from untrac_pl.methods.base import DEFAULT_TARGET_UNIT, AttributionMethod, AttributionPlan, RunContext, query_targets, target_seed
from untrac_pl.methods.registry import canonical_name, display_name, get_method, method_names, methods_help, register, unregister
from untrac_pl.methods.options import accepted_options, check_options
from untrac_pl.methods.unlearning import UnlearningMethod, UnlearningOptions, UnTrac, UnTracInv
from untrac_pl.methods.gradient import GradientMethod, compute_baseline_scores, eager_attention
# isort: on

__all__ = [
    "DEFAULT_TARGET_UNIT", "AttributionMethod", "AttributionPlan", "RunContext", "query_targets", "target_seed",
    "canonical_name", "display_name", "get_method", "method_names", "methods_help", "register", "unregister",
    "accepted_options", "check_options", "UnlearningMethod", "UnlearningOptions", "UnTrac", "UnTracInv",
    "GradientMethod", "compute_baseline_scores", "eager_attention",
]
