"""Scaling experiment (the seed's ``scaling_experiment.py``): the same attribution across model sizes.

    from untrac_pl.compat import ScalingExperiment, ScalingExperimentConfig
    experiment = ScalingExperiment(ScalingExperimentConfig(models_to_test=["gpt2", "gpt2-medium"]))
    experiment.run_scaling_experiment()
    experiment.plot_results()

or ``untrac-pl scaling -c configs/scaling.yaml`` (GPT-2 small / medium / large from the Hub) and
``untrac-pl scaling -c configs/scaling_offline.yaml`` (random configs from tiny to GPT-2-small size).
For every model: load it once, attribute ``test_cases`` test texts against ``sample_size`` training
texts in one engine run (UnTrac-Inv: each test text is one target; θ0 losses computed once), and
record the parameter count, the runtime of the attribution (loading excluded) and the peak memory
from the engine's :class:`~untrac_pl.callbacks.memory.MemoryMonitor` report (CUDA:
``max_memory_allocated``; CPU: process RSS sampled every 16 batches and at each phase end, a lower bound that also counts
everything else the process holds, including earlier models' leftovers).

Output ``<output_dir>/scaling_experiment_results.json``: ``models{name: {...}}`` and
``summary.comparison[]`` of ``model``, ``parameters``, ``runtime_seconds``, ``memory_gb`` (GiB), plus
``scaling_results.png`` from :meth:`ScalingExperiment.plot_results`.
"""
from __future__ import annotations

import gc
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from untrac_pl.data.records import DataSource, read_records, records_from_list
from untrac_pl.errors import DataError
from untrac_pl.estimator import MemoryEfficientUnTracEstimator, UnTracConfig, top_k
from untrac_pl.experiments.toxicity import _seeded_sample
from untrac_pl.io import write_json_atomic
from untrac_pl.models import ModelSpec
from untrac_pl.runtime import current_rss_bytes, json_safe, resolve_device

log = logging.getLogger(__name__)

RESULTS_FILE = "scaling_experiment_results.json"
PLOT_FILE = "scaling_results.png"
DEFAULT_MODELS = ["gpt2", "gpt2-medium", "gpt2-large"]  # 124M, 355M, 774M


@dataclass
class ScalingExperimentConfig:
    """The seed's fields first (same names and defaults), then what the engine needs.

    ``models_to_test``: Hub ids / local directories, or dicts ``{name: ..., <ModelSpec fields>}``
    (e.g. ``{name: tiny, config: {model_type: gpt2, n_layer: 2, ...}, train_tokenizer_vocab: 512}``).
    ``use_quantization`` / ``quantization_bits``: load every model quantised (LoRA unlearning; see
    :class:`~untrac_pl.estimator.MemoryEfficientUnTracEstimator`). ``sample_size`` training texts and
    ``test_cases`` test texts: from ``train`` / ``queries`` data sources, else the generated quickstart
    corpus (``generator: quickstart``, enlarged to ``sample_size``: ``n_per_group = ceil(sample_size / 4)``)
    and its queries. ``untrac``: the unlearning settings of every
    model (default: the seed's — Adam here, lr 5e-5, one step, gradient checkpointing on).
    ``output_dir``: where the JSON and the plot are written (default ``runs/scaling``; not ``results/``,
    which in this repository holds the committed results).
    """

    models_to_test: Optional[list[Union[str, dict]]] = None
    use_quantization: bool = False
    quantization_bits: int = 4
    measure_memory: bool = True
    measure_runtime: bool = True
    sample_size: int = 100
    test_cases: int = 3
    untrac: Optional[UnTracConfig] = None
    train: Optional[list[DataSource]] = None
    queries: Optional[list[DataSource]] = None
    eval_batch_size: int = 4
    top_k: int = 10
    output_dir: str = "runs/scaling"
    continue_on_error: bool = True

    def __post_init__(self):
        if self.models_to_test is None:
            self.models_to_test = list(DEFAULT_MODELS)
        if self.quantization_bits not in (4, 8):
            raise ValueError(f"quantization_bits must be 4 or 8, got {self.quantization_bits}")
        if self.sample_size < 1 or self.test_cases < 1:
            raise ValueError("sample_size and test_cases must be >= 1")


def _model_entry(entry: Union[str, dict]) -> tuple[str, Optional[ModelSpec]]:
    """``(display name, ModelSpec or None)``; None: ``UnTracConfig.model_name = name``."""
    if isinstance(entry, str):
        return entry, None
    entry = dict(entry)
    name = entry.pop("name", None)
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise DataError(f"unknown ModelSpec fields {unknown}", field="models_to_test")
    spec = ModelSpec(**entry)
    if name is None:
        name = spec.name_or_path or f"{(spec.config or {}).get('model_type', 'model')}-config"
    return str(name), spec


def _phases(report: dict) -> dict:
    """The per-phase peaks of a MemoryMonitor report (it may also hold a static ``model`` footprint)."""
    return {k: v for k, v in report.items() if isinstance(v, dict) and "peak_gb" in v}


def _memory_now_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return current_rss_bytes() / 2**30


class ScalingExperiment:
    """Runs the attribution for every model of the config and compares parameters, runtime, memory."""

    def __init__(self, experiment_config: Optional[ScalingExperimentConfig] = None, command: Optional[str] = None):
        self.config = experiment_config or ScalingExperimentConfig()
        self.command = command or "python: ScalingExperiment(config).run_scaling_experiment()"
        self.results: dict = {"models": {}, "summary": {}}

    # -- data ------------------------------------------------------------------------------------
    def load_data(self) -> tuple[list[str], list[str]]:
        """``(training_texts, test_texts)``: ``sample_size`` and ``test_cases`` of them."""
        cfg = self.config
        seed = self._untrac().seed
        if cfg.train or cfg.queries:
            if not (cfg.train and cfg.queries):
                raise DataError("set both train and queries (or neither, for the generated quickstart data)", field="train")
            train_sources, test_sources = cfg.train, cfg.queries
        else:
            options = {"n_per_group": max(1, math.ceil(cfg.sample_size / 4))}
            train_sources, test_sources = ([DataSource(format="generated", generator="quickstart", split=split, options=options)]
                                           for split in ("train", "queries"))
        train = [r for s in train_sources for r in read_records(s)]
        tests = [r for s in test_sources for r in read_records(s)]
        train = _seeded_sample(train, cfg.sample_size, seed)
        tests = tests[: cfg.test_cases]
        if len(tests) < cfg.test_cases:
            log.warning("only %d test texts available (test_cases=%d)", len(tests), cfg.test_cases)
        text = lambda r: r["text"] if "text" in r else r["prompt"] + r["completion"]
        return [text(r) for r in train], [text(r) for r in tests]

    def _untrac(self) -> UnTracConfig:
        return self.config.untrac or UnTracConfig(gradient_checkpointing=True)

    # -- one model -------------------------------------------------------------------------------
    def test_model(self, model: Union[str, dict], training_texts: list[str], test_texts: list[str]) -> dict:
        """Attribute ``test_texts`` with one model; a dict of what was measured (``success`` False on error)."""
        cfg = self.config
        name, spec = _model_entry(model)
        log.info("=" * 60 + "\nTesting model: %s", name)
        untrac = replace(self._untrac(), model_name=name if spec is None else (spec.name_or_path or name),
                         max_train_samples=len(training_texts), max_test_samples=len(test_texts))
        device = torch.device(resolve_device(untrac.device))
        estimator = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mem_before = _memory_now_gb(device)
        try:
            t_load = time.perf_counter()
            estimator = MemoryEfficientUnTracEstimator(
                untrac,
                use_quantization=cfg.use_quantization,
                quant_bits=cfg.quantization_bits,
                model_spec=spec,
                tokenizer_texts=training_texts + test_texts,
            )
            load_seconds = time.perf_counter() - t_load
            mem_after_load = _memory_now_gb(device)
            start = time.perf_counter()
            matrix = self._attribute(estimator, test_texts, training_texts)
            runtime = time.perf_counter() - start
            report = estimator.last_result.memory
            phases = _phases(report)
            peak = max((phase["peak_gb"] for phase in phases.values()), default=None)
            influence_results = []
            for text, scores in zip(test_texts, matrix):
                finite = scores[np.isfinite(scores)]
                influence_results.append({
                    "test_text": text[:100],
                    "top_influences": [{"rank": r, "index": i, "score": s} for r, (i, s, _) in enumerate(top_k(scores, training_texts, cfg.top_k), start=1)],
                    "mean_influence": float(finite.mean()) if finite.size else None,
                    "std_influence": float(finite.std()) if finite.size else None,
                })
            result = {
                "model_name": name,
                "parameters": estimator.count_parameters(),
                "runtime_seconds": runtime if cfg.measure_runtime else None,
                "load_seconds": load_seconds if cfg.measure_runtime else None,
                "memory_before_gb": mem_before if cfg.measure_memory else None,
                "memory_after_load_gb": mem_after_load if cfg.measure_memory else None,
                "memory_peak_gb": peak if cfg.measure_memory else None,
                "memory_overhead_gb": (peak - mem_before) if cfg.measure_memory and peak is not None else None,
                "memory": report if cfg.measure_memory else None,
                "timings": estimator.last_result.timings,
                "device": str(estimator.device),
                "quantization": {"bits": cfg.quantization_bits} if cfg.use_quantization else None,
                "model_spec": asdict(estimator.model_spec),
                "failed_targets": dict(estimator.last_result.failed),
                "influence_results": influence_results,
                "success": True,
            }
            log.info("%s: %d parameters, %.2f s, peak %.3f GiB", name, result["parameters"], runtime, peak or float("nan"))
        except Exception as exc:
            if not cfg.continue_on_error:
                raise
            log.error("model %s failed: %s", name, exc)
            result = {"model_name": name, "success": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=5)}
        finally:
            del estimator
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return result

    def _attribute(self, estimator: MemoryEfficientUnTracEstimator, test_texts: list[str], training_texts: list[str]) -> np.ndarray:
        records = records_from_list([{"id": f"test-{j}", "group": "test", "text": t} for j, t in enumerate(test_texts)], name="test_texts")
        return estimator.attribute_records(records, training_texts, eval_batch_size=self.config.eval_batch_size)

    # -- the run ---------------------------------------------------------------------------------
    def run_scaling_experiment(self) -> dict:
        """Test every model, summarise, write the JSON; returns the results."""
        started = time.perf_counter()
        training_texts, test_texts = self.load_data()
        names = []
        for model in self.config.models_to_test:
            name, _ = _model_entry(model)
            if name in self.results["models"]:
                raise DataError(f"model name '{name}' appears twice; give dict entries distinct names", field="models_to_test")
            names.append(name)
            self.results["models"][name] = self.test_model(model, training_texts, test_texts)
        self.results["config"] = asdict(self.config)
        self.results["command"] = self.command
        self.results["data"] = {"sample_size": len(training_texts), "test_cases": len(test_texts)}
        self.results["total_seconds"] = time.perf_counter() - started
        self._generate_summary(names)
        self.save_results()
        return self.results

    def _generate_summary(self, names: list[str]) -> None:
        models = self.results["models"]
        comparison = []
        for name in names:
            result = models[name]
            if not result.get("success"):
                continue
            means = [r["mean_influence"] for r in result["influence_results"] if r["mean_influence"] is not None]
            comparison.append({
                "model": name,
                "parameters": result["parameters"],
                "runtime_seconds": result["runtime_seconds"],
                "memory_gb": result["memory_peak_gb"],
                "avg_influence_score": float(np.mean(means)) if means else None,
                "memory_measure": next(iter(_phases(result.get("memory") or {}).values()), {}).get("measure"),
                "device": result["device"],
            })
        self.results["summary"] = {
            "total_models_tested": len(names),
            "successful_models": len(comparison),
            "failed_models": {n: models[n]["error"] for n in names if not models[n].get("success")},
            "memory_unit": "GiB (2**30 bytes)",
            "comparison": comparison,
        }

    def save_results(self, filename: str = RESULTS_FILE) -> Path:

        path = Path(self.config.output_dir) / filename
        write_json_atomic(path, json_safe(self.results, drop_private=True))
        log.info("Results saved to %s", path)
        return path

    def plot_results(self, filename: str = PLOT_FILE) -> Optional[Path]:
        """Runtime and peak memory against parameter count (log x), one point per model; a PNG."""
        comparison = self.results.get("summary", {}).get("comparison") or []
        if not comparison:
            log.warning("No successful results to plot")
            return None
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        params = [c["parameters"] / 1e6 for c in comparison]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, label in ((axes[0], "runtime_seconds", "attribution runtime (s)"), (axes[1], "memory_gb", "peak memory (GiB)")):
            values = [c[key] for c in comparison]
            if any(v is None for v in values):
                ax.set_axis_off()
                ax.set_title(f"{label}: not measured")
                continue
            ax.plot(params, values, marker="o")
            for x, y, c in zip(params, values, comparison):
                ax.annotate(c["model"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
            ax.margins(x=0.25, y=0.15)
            ax.set_xlabel("parameters (millions)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        measure = comparison[0].get("memory_measure") or ""
        data = self.results.get("data", {})
        fig.suptitle(f"UnTrac-Inv scaling: {data.get('test_cases')} test texts x {data.get('sample_size')} training texts ({measure})", fontsize=9)
        fig.tight_layout()
        path = Path(self.config.output_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        log.info("Plot saved to %s", path)
        return path
