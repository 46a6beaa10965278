"""Toxicity attribution (the seed's experiment): generate from toxicity prompts, attribute each completion.

    from untrac_pl.compat import UnTracConfig, ToxicityAttributionExperiment
    ToxicityAttributionExperiment(UnTracConfig(model_name="gpt2", max_test_samples=5)).run_experiment()

or ``untrac-pl toxicity -c configs/toxicity.yaml``. Steps:

1. training texts and prompts: the Hub sources the seed used (OpenWebText, RealToxicityPrompts;
   streamed) when online; offline sources through :class:`ToxicityExperimentConfig` (``train`` /
   ``prompts`` data sources, e.g. the ToxiGen statements of ``../shared/data/tests/toxigen.jsonl``,
   or the generated quickstart corpus ``{format: generated, generator: quickstart, split: train}`` /
   ``split: queries``, whose ``insults`` group stands in for a toxic source). With
   ``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1`` and no sources configured, those generated quickstart
   sources are used, with a warning, and the JSON's ``source`` names them;
2. one completion per prompt from the model (seeded sampling: prompt ``i`` uses seed
   ``seed + i`` in a forked RNG, so completions do not depend on order or on the global RNG);
3. every completion is attributed in **one** engine run (UnTrac-Inv: each completion is one target,
   the θ0 losses of the training texts are computed once; ``method: untrac`` instead unlearns each
   training text and measures the completions' losses, the JSON's ``sign`` says which); the loss is
   taken on the completion tokens only (``attribute: completion``), or on prompt + completion
   (``attribute: full``);
4. optionally each completion is scored by an offline toxicity classifier (``detoxify`` when it is
   importable and its weights load, or a local ``transformers`` sequence-classification model);
5. ``<output_dir>/untrac_toxicity_results.json``: ``test_cases[]`` of ``test_case_id``, ``prompt``,
   ``completion``, ``toxicity``, ``top_influences[]`` (``rank``, ``index``, ``score``, ``text``,
   ``id``, ``group``) and ``group_scores`` (mean score per training group: the paper's dataset level).
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch

from untrac_pl.data.records import DataSource, read_records
from untrac_pl.data.tokenize import tokenize_records
from untrac_pl.errors import DataError
from untrac_pl.estimator import UnTracConfig, UnTracInfluenceEstimator, top_k
from untrac_pl.io import write_json_atomic
from untrac_pl.lm import CausalLMModule
from untrac_pl.methods import get_method, method_names
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.runtime import json_safe
from untrac_pl.training import FitSpec, fit_lm

log = logging.getLogger(__name__)

RESULTS_FILE = "untrac_toxicity_results.json"


@dataclass
class GenerationConfig:
    """Sampling of one completion per prompt (``model.generate``; the seed: sampling, temperature 1,
    Hugging Face's default top-k 50, 50 tokens in total)."""

    max_new_tokens: int = 30
    min_new_tokens: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass
class PretrainConfig:
    """Optional warm-up fit of the model on the training texts before generating (offline demos: a
    random tiny model otherwise generates noise). Uses :func:`untrac_pl.training.fit_lm`."""

    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3


@dataclass
class ToxicityExperimentConfig:
    """Where the data comes from and what to write (the model and unlearning are in UnTracConfig).

    Args:
        train: training-text sources, e.g. ``[{format: generated, generator: quickstart, split: train}]``
            (``None``: the Hub source ``hub_train``; with the Hub offline, that generated quickstart source).
        prompts: prompt sources (``None``: ``hub_prompts``, or offline the quickstart's ``split: queries``);
            a record's ``prompt`` is used as it is, a ``text`` record gives its first ``prompt_words``
            words (e.g. ToxiGen statements).
        prompt_groups: keep only prompts of these groups (e.g. ``[insults]``).
        hub_train / hub_prompts: Hub datasets streamed when no source is given and the Hub is online.
        min_train_chars / max_train_chars: the seed's filter of Hub texts (> 50 chars, cut to 1,000).
        model: a full ModelSpec instead of ``UnTracConfig.model_name`` (e.g. a tiny random config).
        attribute: ``completion`` (loss on the generated tokens only) or ``full`` (prompt + completion).
        toxicity_classifier: ``auto`` (alt-profanity-check if installed, else detoxify if importable and loadable, else none), ``alt-profanity-check``, ``detoxify``,
            ``none``, or a local directory / Hub id of a transformers sequence-classification model.
        toxicity_label: that model's label to read (default: the label whose name says toxic).
        snippet_chars: training texts are cut to this many characters in the JSON (the seed: 200).
        output_dir: where ``untrac_toxicity_results.json`` is written (the seed: ``/mnt/user-data/outputs/``;
            not ``results/``, which in this repository holds the committed results).
    """

    train: Optional[list[DataSource]] = None
    prompts: Optional[list[DataSource]] = None
    prompt_groups: Optional[list[str]] = None
    prompt_words: int = 8
    hub_train: str = "Skylion007/openwebtext"
    hub_prompts: str = "allenai/real-toxicity-prompts"
    min_train_chars: int = 50
    max_train_chars: int = 1000
    model: Optional[ModelSpec] = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    attribute: Literal["completion", "full"] = "completion"
    toxicity_classifier: Optional[str] = "auto"
    toxicity_label: Optional[str] = None
    output_dir: str = "runs/toxicity"
    snippet_chars: int = 200
    show_progress: bool = False


def _hub_offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _seeded_sample(records: list, n: int, seed: int) -> list:
    """At most ``n`` records, a seeded random subset kept in the original order."""
    if n is None or len(records) <= n:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


# --------------------------------------------------------------------------------------------------
# toxicity classifiers (optional; nothing is installed for them)
# --------------------------------------------------------------------------------------------------
def load_toxicity_scorer(spec: Optional[str], label: Optional[str] = None, device: str = "cpu") -> tuple[Optional[Callable[[list[str]], list[float]]], dict]:
    """A function texts → toxicity probabilities, and a description for the JSON (``name`` null if none)."""
    if spec is None or str(spec).lower() in ("none", "off", "null", "false"):
        return None, {"name": None, "reason": "disabled in the config"}
    spec = str(spec)
    if spec.lower() in ("auto", "profanity-check", "alt-profanity-check"):
        try:
            from profanity_check import predict_prob  # optional (alt-profanity-check ships its model in the wheel)
        except ImportError:
            if spec.lower() != "auto":
                raise DataError("toxicity_classifier: alt-profanity-check is not installed (pip install alt-profanity-check)",
                                field="toxicity_classifier") from None
        else:
            return (lambda texts: [float(x) for x in predict_prob(list(texts))]), {"name": "alt-profanity-check", "label": "profanity"}
    if spec.lower() in ("auto", "detoxify"):
        try:
            from detoxify import Detoxify  # optional, never installed by this package
        except ImportError:
            if spec.lower() == "detoxify":
                raise DataError("toxicity_classifier: detoxify is not installed (pip install detoxify)", field="toxicity_classifier") from None
            return None, {"name": None, "reason": "no offline toxicity classifier: detoxify is not installed"}
        try:
            model = Detoxify("original", device=device)
        except Exception as exc:  # weights not cached and no network, ...
            if spec.lower() == "detoxify":
                raise DataError(f"toxicity_classifier: detoxify could not load its weights ({exc})", field="toxicity_classifier") from None
            return None, {"name": None, "reason": f"detoxify is installed but could not load its weights: {exc}"}
        return (lambda texts: [float(x) for x in model.predict(list(texts))["toxicity"]]), {"name": "detoxify:original", "label": "toxicity"}
    return _hf_classifier(spec, label, device)


def _hf_classifier(path: str, label: Optional[str], device: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as exc:
        raise DataError(f"toxicity_classifier: could not load '{path}' ({exc})", field="toxicity_classifier") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    if label is not None:
        matches = [i for i, name in id2label.items() if name.lower() == label.lower()]
    else:
        matches = [i for i, name in id2label.items() if "toxic" in name.lower() and not any(n in name.lower() for n in ("non", "not", "neutral"))]
        if not matches and len(id2label) == 2:
            matches = [1]
    if len(matches) != 1:
        raise DataError(f"toxicity_classifier: cannot tell which label of {sorted(id2label.values())} is 'toxic'; set toxicity_label", field="toxicity_label")
    index = matches[0]
    multi_label = model.config.problem_type == "multi_label_classification" or model.config.num_labels == 1

    @torch.no_grad()
    def score(texts: list[str]) -> list[float]:
        out = []
        for start in range(0, len(texts), 16):
            enc = tokenizer(list(texts[start : start + 16]), return_tensors="pt", padding=True, truncation=True, max_length=512).to(device)
            logits = model(**enc).logits.float()
            probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
            out.extend(float(p) for p in probs[:, index].cpu())
        return out

    return score, {"name": str(path), "label": id2label[index]}


def sample_completion(model, tokenizer, prompt: str, gen: GenerationConfig, seed: int, context: int, device=None,
                      max_length: Optional[int] = None) -> str:
    """One continuation of ``prompt`` (the generated text only), sampled with ``seed`` in a forked RNG (the
    global RNG state is left as it was, and completions do not depend on the order prompts come in).
    ``max_length`` (prompt + completion tokens) overrides ``gen.max_new_tokens``; ``context`` caps both."""
    device = torch.device(device or "cpu")
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    if input_ids.shape[1] == 0:
        raise DataError("the prompt encodes to no tokens", field="prompt")
    new_tokens = gen.max_new_tokens if max_length is None else max(1, max_length - input_ids.shape[1])
    new_tokens = max(1, min(new_tokens, context - input_ids.shape[1]))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=min(gen.min_new_tokens, new_tokens), do_sample=gen.do_sample,
                  pad_token_id=tokenizer.pad_token_id)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    if gen.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = gen.repetition_penalty
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=enc["attention_mask"].to(device), **kwargs)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------------
class ToxicityAttributionExperiment:
    """The seed's experiment class: ``ToxicityAttributionExperiment(config).run_experiment()``.

    ``config`` is an :class:`~untrac_pl.estimator.UnTracConfig` (model, unlearning, sample sizes,
    ``top_k_influences``, seed); ``experiment`` says where the data comes from and what to write.
    The seed's methods are kept: :meth:`load_training_data`, :meth:`load_test_data_toxic`,
    :meth:`generate_completion`, :meth:`run_experiment`, :meth:`save_results`. ``results`` holds the
    JSON written (a dict with ``test_cases``).
    """

    def __init__(self, config: Optional[UnTracConfig] = None, experiment: Optional[ToxicityExperimentConfig] = None, command: Optional[str] = None):
        self.config = config or UnTracConfig()
        self.experiment = experiment or ToxicityExperimentConfig()
        self.command = command or "python: ToxicityAttributionExperiment(config).run_experiment()"
        self.results: dict = {"test_cases": []}
        self._estimator: Optional[UnTracInfluenceEstimator] = None
        self._train_records: Optional[list[dict]] = None
        self._data_info: dict = {}

    # -- model (loaded on first use: a tokenizer trained on the run's texts needs the data first) --
    @property
    def estimator(self) -> UnTracInfluenceEstimator:
        if self._estimator is None:
            texts = None
            if self.experiment.model is not None and self.experiment.model.train_tokenizer_vocab:
                texts = [r["text"] for r in self._training_records()] + [c["prompt"] for c in self.load_test_data_toxic()]
            self._estimator = UnTracInfluenceEstimator(self.config, model_spec=self.experiment.model, tokenizer_texts=texts)
        return self._estimator

    # -- data ------------------------------------------------------------------------------------
    def _sources(self, configured: Optional[list[DataSource]], split: str, what: str) -> Optional[list[DataSource]]:
        """The sources of one side: the configured ones; with none configured and the Hub offline, the
        generated quickstart corpus's ``split`` (with a warning); ``None``: stream from the Hub."""
        if configured:
            return list(configured)
        if _hub_offline():
            log.warning(
                "the Hugging Face Hub is offline and no %s source is configured: using the generated quickstart "
                "corpus (set experiment.%s, e.g. [{format: generated, generator: quickstart, split: %s}], to silence this)",
                what, "train" if split == "train" else "prompts", split,
            )
            return [DataSource(format="generated", generator="quickstart", split=split)]
        return None

    def _training_records(self) -> list[dict]:
        if self._train_records is None:
            exp, n = self.experiment, self.config.max_train_samples
            sources = self._sources(exp.train, "train", "training")
            if sources is not None:
                records = [r for source in sources for r in read_records(source)]
                records = _seeded_sample(records, n, self.config.seed)
                source = [s.label for s in sources]
            else:
                records = self._hub_training_records(n)
                source = f"hub:{exp.hub_train}"
            for r in records:
                if "text" not in r:
                    r["text"] = r["prompt"] + r["completion"]
            self._train_records = records
            groups: dict[str, int] = {}
            for r in records:
                groups[r["group"]] = groups.get(r["group"], 0) + 1
            self._data_info["training_data"] = {"source": source, "num_texts": len(records), "groups": groups}
        return self._train_records

    def _hub_training_records(self, n: int) -> list[dict]:
        exp = self.experiment
        stream = _stream_hub(exp.hub_train, "training data")
        records = []
        for example in stream:
            if len(records) >= n:
                break
            text = str(example.get("text", "")).strip()
            if len(text) > exp.min_train_chars:
                records.append({"id": f"owt-{len(records)}", "group": exp.hub_train, "text": text[: exp.max_train_chars]})
        if not records:
            raise DataError("no training texts read", source=exp.hub_train)
        return records

    def load_training_data(self) -> list[str]:
        """Training texts (at most ``max_train_samples``), as the seed returned them."""
        return [r["text"] for r in self._training_records()]

    def load_test_data_toxic(self) -> list[dict]:
        """Prompts ``[{"prompt", "type", "group", "id"}, ...]`` (at most ``max_test_samples``)."""
        exp, n = self.experiment, self.config.max_test_samples
        if "prompts" in self._data_info:
            return [dict(p) for p in self._data_info["_prompts"]]
        sources = self._sources(exp.prompts, "queries", "prompt")
        if sources is not None:
            records = [r for source in sources for r in read_records(source)]
            source = [s.label for s in sources]
        else:
            records, source = None, f"hub:{exp.hub_prompts}"
        if records is None:
            cases = self._hub_prompts(n)
        else:
            if exp.prompt_groups:
                records = [r for r in records if r["group"] in set(exp.prompt_groups)]
                if not records:
                    raise DataError(f"no prompts left after prompt_groups={exp.prompt_groups}", field="prompt_groups")
            records = _seeded_sample(records, n, self.config.seed)
            cases = [{"id": r["id"], "group": r["group"], "prompt": self._prompt_of(r), "type": "toxic_prompt"} for r in records]
        self._data_info["prompts"] = {"source": source, "num_prompts": len(cases)}
        self._data_info["_prompts"] = cases
        return [dict(c) for c in cases]

    def _prompt_of(self, record: dict) -> str:
        if "prompt" in record:
            return record["prompt"]
        words = record["text"].split()
        return " ".join(words[: max(1, self.experiment.prompt_words)])

    def _hub_prompts(self, n: int) -> list[dict]:
        cases = []
        for example in _stream_hub(self.experiment.hub_prompts, "prompts"):
            if len(cases) >= n:
                break
            prompt = example["prompt"]["text"] if isinstance(example.get("prompt"), dict) else example.get("prompt")
            if prompt:
                cases.append({"id": f"rtp-{len(cases)}", "group": "real-toxicity-prompts", "prompt": prompt, "type": "toxic_prompt"})
        return cases

    # -- generation ------------------------------------------------------------------------------
    def _pretrain(self) -> Optional[dict]:
        spec = self.experiment.pretrain
        if spec.steps <= 0:
            return None
        est = self.estimator
        corpus = tokenize_records(self._training_records(), est.tokenizer, est._max_length(), "training data")
        module = CausalLMModule(model=est.model_spec, optimizer=OptimizerSpec(name="adamw", lr=spec.lr))
        module.attach(est.model, est.tokenizer)
        est.model.train()  # Lightning keeps the modules' train/eval flags in fit
        kwargs = {k: v for k, v in self.config.trainer_kwargs().items() if k != "logger"}
        info = fit_lm(module, corpus, FitSpec(max_steps=spec.steps, batch_size=spec.batch_size, seed=self.config.seed), kwargs)
        est._to_device()
        est.model.eval()
        return info

    def generate_completion(self, prompt: str, max_length: Optional[int] = None, seed: Optional[int] = None) -> str:
        """One sampled continuation of ``prompt`` (the generated text only, without the prompt).

        ``max_length`` (the seed's argument: prompt + completion tokens) overrides
        ``generation.max_new_tokens`` when given. Sampling is seeded with ``seed`` (default
        ``config.seed``) in a forked RNG: the global RNG state is left as it was.
        """
        est, gen = self.estimator, self.experiment.generation
        est._to_device()
        new_tokens = None if max_length is None else max_length  # prompt + completion tokens, the seed's argument
        return sample_completion(est.model, est.tokenizer, prompt, gen, self.config.seed if seed is None else seed,
                                 context=est._max_length(), device=est.device, max_length=new_tokens)

    # -- the run ---------------------------------------------------------------------------------
    def run_experiment(self) -> dict:
        """Load data, generate, attribute, score toxicity, write the JSON; returns the results."""
        started = time.perf_counter()
        exp = self.experiment
        training = self._training_records()
        cases = self.load_test_data_toxic()
        if not cases:
            raise DataError("no prompts", field="prompts")
        est = self.estimator
        pretrain = self._pretrain()
        log.info("generating %d completions", len(cases))
        t_gen = time.perf_counter()
        for i, case in enumerate(cases):
            case["completion"] = self.generate_completion(case["prompt"], seed=self.config.seed + i)
        gen_seconds = time.perf_counter() - t_gen
        targets, target_cases = [], []
        for i, case in enumerate(cases):
            if not case["completion"].strip():
                case["skipped"] = "the completion is empty (nothing to attribute)"
                continue
            if exp.attribute == "completion":
                targets.append({"id": f"case-{i}", "group": "completions", "prompt": case["prompt"], "completion": case["completion"]})
            else:
                targets.append({"id": f"case-{i}", "group": "completions", "text": case["prompt"] + case["completion"]})
            target_cases.append(i)
        texts = [r["text"] for r in training]
        t_attr = time.perf_counter()
        matrix = est.attribute_records(targets, texts, show_progress=exp.show_progress) if targets else np.zeros((0, len(texts)))
        attr_seconds = time.perf_counter() - t_attr
        scorer, classifier = load_toxicity_scorer(exp.toxicity_classifier, exp.toxicity_label, str(est.device))
        toxicity = scorer([c["completion"] for c in cases]) if scorer else [None] * len(cases)
        rows = dict(zip(target_cases, matrix))
        test_cases = []
        for i, case in enumerate(cases):
            entry = {
                "test_case_id": i,
                "prompt": case["prompt"],
                "completion": case["completion"],
                "toxicity": toxicity[i],
                "prompt_id": case.get("id"),
                "prompt_group": case.get("group"),
            }
            if i in rows:
                scores = rows[i]
                entry["top_influences"] = [
                    {"rank": rank, "index": idx, "score": score, "text": self._snippet(text), "id": training[idx]["id"], "group": training[idx]["group"]}
                    for rank, (idx, score, text) in enumerate(top_k(scores, texts, self.config.top_k_influences), start=1)
                ]
                entry["group_scores"] = _group_means(scores, [r["group"] for r in training])
            else:
                entry["top_influences"], entry["group_scores"] = [], {}
                entry["skipped"] = case["skipped"]
            test_cases.append(entry)
        result = self.estimator.last_result
        self.results = {
            "experiment": "toxicity_attribution",
            "command": self.command,
            "method": self.config.method,
            "sign": score_formula(self.config.method),
            "attributed": "completion tokens only (prompt masked)" if exp.attribute == "completion" else "prompt + completion",
            "config": asdict(self.config),
            "experiment_config": asdict(exp),
            "model": {"name": exp.model.name_or_path if exp.model else self.config.model_name, "parameters": est.count_parameters(), "device": str(est.device)},
            "training_data": self._data_info.get("training_data"),
            "prompts": self._data_info.get("prompts"),
            "pretrain": pretrain,
            "toxicity_classifier": classifier,
            "failed_targets": dict(result.failed) if result is not None and targets else {},
            "memory": result.memory if result is not None and targets else {},
            "timings": {"generation_s": gen_seconds, "attribution_s": attr_seconds, "total_s": time.perf_counter() - started},
            "test_cases": test_cases,
        }
        self.save_results()
        return self.results

    def _snippet(self, text: str) -> str:
        n = self.experiment.snippet_chars
        return text if n is None or len(text) <= n else text[:n]

    def save_results(self, filename: str = RESULTS_FILE) -> Path:
        """Write ``results`` to ``<output_dir>/<filename>`` (atomically); returns the path."""
        path = Path(self.experiment.output_dir) / filename
        write_json_atomic(path, json_safe(self.results, drop_private=True))
        log.info("Results saved to %s", path)
        return path


def score_formula(method: str) -> str:
    """The ``sign`` line of the results JSON: what a score is for ``method`` (an unlearning method)."""
    target = get_method(method)
    if not target.formula:
        raise ValueError(f"no score formula for method {method!r}; choose one of {', '.join(method_names('unlearning'))}")
    return target.formula.format(query="completion")


def _group_means(scores: np.ndarray, groups: list[str]) -> dict:
    out: dict[str, list[float]] = {}
    for score, group in zip(scores, groups):
        if np.isfinite(score):
            out.setdefault(group, []).append(float(score))
    return {g: float(np.mean(v)) for g, v in out.items()}


def _stream_hub(name: str, what: str):
    import datasets

    if _hub_offline():
        raise DataError(f"the {what} source is the Hub dataset '{name}', but the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
                        "configure local sources (or the generated quickstart corpus: [{format: generated, generator: quickstart, split: train}])",
                        source=name)
    try:
        return iter(datasets.load_dataset(name, split="train", streaming=True))
    except Exception as exc:  # network, missing dataset, script datasets no longer supported, ...
        raise DataError(f"could not stream the {what} from the Hub ({type(exc).__name__}: {exc}); configure local sources", source=name) from None
