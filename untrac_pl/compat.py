"""The seed project's (UnTrac-TNLP's) Python API, by its names: thin aliases over the project's own API.

    from untrac_pl.compat import UnTracConfig, UnTracInfluenceEstimator, ToxicityAttributionExperiment
    estimator = UnTracInfluenceEstimator(UnTracConfig(model_name="gpt2"))
    scores = estimator.compute_influence_scores(test_text, training_texts)

Every name here is defined elsewhere (:mod:`untrac_pl.estimator`, :mod:`untrac_pl.experiments.toxicity`,
:mod:`untrac_pl.experiments.scaling`) on :func:`untrac_pl.attribute`; see the README section
"Coming from UnTrac-TNLP" for what differs from the seed (ascent is ascent, method names, optimizer).
"""
from untrac_pl.estimator import (
    MemoryEfficientUnTracEstimator,
    TracInBaseline,
    UnTracConfig,
    UnTracInfluenceEstimator,
    count_parameters,
    resolve_device,
    top_k,
)
from untrac_pl.experiments.scaling import ScalingExperiment, ScalingExperimentConfig
from untrac_pl.experiments.toxicity import ToxicityAttributionExperiment

__all__ = [
    "UnTracConfig",
    "UnTracInfluenceEstimator",
    "MemoryEfficientUnTracEstimator",
    "TracInBaseline",
    "ToxicityAttributionExperiment",
    "ScalingExperimentConfig",
    "ScalingExperiment",
    "resolve_device",
    "count_parameters",
    "top_k",
]
