"""The seed-style estimators of UnTrac-TNLP, on the in-memory API (:func:`untrac_pl.attribute`).

Users of the student reproduction "UnTrac-TNLP" (GPT-2, Colab) call::

    config = UnTracConfig(model_name="gpt2")
    estimator = UnTracInfluenceEstimator(config)
    scores = estimator.compute_influence_scores(test_text, training_texts)
    top = estimator.get_top_k_influences(test_text, training_texts, k=10)

Those names and return shapes are kept; what happens underneath is the project's engine
(:func:`untrac_pl.attribute`, nothing written), i.e. the same run shell as
``untrac-pl attribute``, so the API and the CLI give identical scores for the same settings.
What differs from the seed (see the README section "Coming from UnTrac-TNLP"):

* **Ascent is ascent.** The seed negated the loss *and* added the gradient (``(-loss).backward()``
  then ``param += lr * grad``), which is gradient *descent*. Here the module minimises ``-loss``
  with an ordinary optimizer: exactly one negation.
* **Method naming.** What the seed called "UnTrac" (unlearn the test text, measure the training
  losses) is the paper's **UnTrac-Inv**: ``method="untrac_inv"`` (the default here). The paper's
  UnTrac (unlearn each training unit, measure the test loss) is ``method="untrac"``.
* **Optimizer.** The paper's default is Adam (lr 5e-5); the seed used one step of plain SGD.
  ``optimizer="adam"`` is the default; ``optimizer="sgd", unlearning_steps=1`` is the seed's
  intended update (with the sign fixed).
* The model stays **bit-exactly at θ0** after every call (the engine's RestoreWeights callback
  copies the snapshot back in place).

Sign convention (the whole project's): a score is ``L(z; θ_T) - L(z; θ0)``; positive = the training
text helped the model produce the test text; higher = more influential.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import astuple, dataclass, replace
from typing import List, Optional, Sequence, get_args

import numpy as np
import torch

from untrac_pl.api import attribute
from untrac_pl.baselines import graddot
from untrac_pl.data.records import records_from_list
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.data.tokenize import tokenize_records
from untrac_pl.engine import AttributionResult
from untrac_pl.errors import ModelLoadError
from untrac_pl.losses import model_per_example_loss
from untrac_pl.methods import canonical_name, get_method, method_names
from untrac_pl.models import ModelSpec, load_model_and_tokenizer
from untrac_pl.optim import OptimizerName, OptimizerSpec
from untrac_pl.runtime import (
    CASTING_PRECISIONS,
    canonical_precision,
    context_length,
    resolve_device,
)
from untrac_pl.vocabulary import UNTRAC_CONFIG, speaking

log = logging.getLogger(__name__)

__all__ = [
    "UnTracConfig",
    "UnTracInfluenceEstimator",
    "MemoryEfficientUnTracEstimator",
    "TracInBaseline",
    "resolve_device",
    "count_parameters",
    "top_k",
]

TRAIN_GROUP = "training_texts"
TEST_GROUP = "test"


@dataclass
class UnTracConfig:
    """The seed's configuration, with the fields the paper needs and the seed lacked.

    Seed fields (same names, same defaults): ``model_name`` (Hub id or ``save_pretrained``
    directory), ``unlearning_rate``, ``unlearning_steps`` (optimizer steps of ascent per target),
    ``batch_size`` (examples per ascent step; it matters only when a target has more than one
    example), ``max_train_samples`` / ``max_test_samples`` (used by the experiments; the estimator
    scores exactly the texts it is given), ``top_k_influences``, ``gradient_checkpointing``,
    ``device`` (``"auto"``: CUDA when available, else CPU; or ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"``), ``seed`` (the engine derives one seed per target from it, so scores do not depend on
    call order).

    Added: ``optimizer`` (paper: ``"adam"``; the seed's update is ``"sgd"``; any name of
    :class:`~untrac_pl.optim.OptimizerSpec`), ``method`` (``"untrac_inv"``: unlearn the test text,
    score the training texts — what the seed intended; ``"untrac"``: unlearn each training text,
    score the test text), ``precision`` (a Lightning precision string: ``"32-true"``,
    ``"bf16-mixed"``, ``"16-mixed"`` on GPU; ``*-true`` low precisions are refused because Lightning
    would cast the shared model in place), ``max_length`` (tokens per text; clamped to the model's
    context), ``eval_batch_size`` (batch size of loss evaluation).

    Note: the paper's UnTrac-Inv runs **5** Adam steps on the whole test set; ``unlearning_steps=1``
    is the seed's default and is kept for compatibility. One step of Adam is close to GradCos and one
    step of SGD to GradDot (the paper's argument for more steps).
    """

    model_name: str = "gpt2"
    unlearning_rate: float = 5e-5
    unlearning_steps: int = 1
    batch_size: int = 1
    max_train_samples: int = 10000
    max_test_samples: int = 100
    top_k_influences: int = 50
    gradient_checkpointing: bool = False
    device: str = "auto"
    seed: int = 42
    optimizer: str = "adam"
    method: str = "untrac_inv"
    precision: str = "32-true"
    max_length: int = 512
    eval_batch_size: int = 16

    def __post_init__(self):
        unlearning = method_names("unlearning")
        given = self.method
        self.method = canonical_name(given, what="UnTracConfig.method")  # untrac-inv -> untrac_inv; unknown: error
        if self.method not in unlearning:
            raise ValueError(f"UnTracConfig.method must be one of {', '.join(unlearning)} (the unlearning methods; "
                             f"for the gradient baselines use untrac_pl.attribute(method=...)), got {given!r}")
        if self.unlearning_steps < 1:
            raise ValueError(f"UnTracConfig.unlearning_steps must be >= 1, got {self.unlearning_steps}")
        for name in ("batch_size", "eval_batch_size", "max_length", "top_k_influences"):
            if getattr(self, name) < 1:
                raise ValueError(f"UnTracConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in get_args(OptimizerName):
            raise ValueError(f"UnTracConfig.optimizer: unknown optimizer {self.optimizer!r} (one of {', '.join(get_args(OptimizerName))})")
        if not self.unlearning_rate > 0:
            raise ValueError(f"UnTracConfig.unlearning_rate must be > 0, got {self.unlearning_rate}")
        if canonical_precision(self.precision) in CASTING_PRECISIONS:
            raise ValueError(
                f"UnTracConfig.precision={self.precision!r} makes Lightning cast the model in place, so the estimator's "
                "model would not stay at θ0; use '32-true', 'bf16-mixed' or '16-mixed' (or load a bf16/fp16 model)"
            )

    # -- what the engine gets -----------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        return ModelSpec(name_or_path=self.model_name, gradient_checkpointing=self.gradient_checkpointing)

    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(name=self.optimizer, lr=self.unlearning_rate)

    def schedule(self) -> UnlearningSchedule:
        return UnlearningSchedule(num_steps=self.unlearning_steps, num_epochs=None, batch_size=self.batch_size)

    def trainer_kwargs(self, show_progress: bool = False) -> dict:
        """Trainer arguments for ``device`` and ``precision`` (no logger: nothing is written)."""
        device = resolve_device(self.device)
        kind, _, index = device.partition(":")
        if kind == "cuda":
            accelerator, devices = "gpu", [int(index)] if index else 1
        elif kind in ("cpu", "mps"):
            accelerator, devices = kind, 1
        else:
            raise ValueError(f"UnTracConfig.device: unknown device {self.device!r} (auto, cpu, cuda, cuda:N, mps)")
        return {
            "accelerator": accelerator,
            "devices": devices,
            "precision": self.precision,
            "enable_progress_bar": bool(show_progress),
            "logger": False,
        }


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of the model itself: 4-bit packed weights counted by their unpacked
    shape, LoRA adapters (``lora_*``) left out."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(math.prod(shape)) if shape is not None else int(p.numel())
    return total


def _text_list(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(text).__name__}")
    return texts


class UnTracInfluenceEstimator:
    """Seed-compatible estimator: one model, loaded once, attributed through the engine.

    ``UnTracInfluenceEstimator(config)`` loads ``ModelSpec(name_or_path=config.model_name)`` once
    (attributes ``model``, ``tokenizer``, ``device`` as in the seed). Every call runs
    :func:`untrac_pl.attribute` with the loaded model (``net=``) and writes nothing; RestoreWeights
    leaves the model bit-exactly at θ0 afterwards.

    What a call computes, for ``test_text`` and ``training_texts`` (a list of raw strings):

    * ``method="untrac_inv"`` (default; what the seed did, under the wrong name): one target, the
      test text, is unlearned by ``unlearning_steps`` steps of gradient ascent; the evaluation set is
      the training texts; ``score[i] = L(train_i; θ_T) - L(train_i; θ0)``.
    * ``method="untrac"``: a list of raw texts has no dataset labels, so **each training text is its
      own group**: it is unlearned on its own (``unlearning_steps`` steps, from θ0 each time) and
      the test text's loss is measured; ``score[i] = L(test; θ_T^(i)) - L(test; θ0)``. This costs one
      unlearning run per training text. For the paper's dataset-level UnTrac (one target per
      training corpus), use ``untrac-pl attribute`` or :func:`untrac_pl.attribute` with grouped records.

    Extra keyword arguments (not in the seed): ``model_spec`` replaces ``ModelSpec(name_or_path=
    config.model_name)`` (e.g. a tiny random config); ``tokenizer_texts`` trains its tokenizer when
    the spec asks for one; ``model``/``tokenizer`` attach an already-loaded pair instead of loading.
    """

    def __init__(
        self,
        config: Optional[UnTracConfig] = None,
        *,
        model_spec: Optional[ModelSpec] = None,
        tokenizer_texts: Optional[Sequence[str]] = None,
        model: Optional[torch.nn.Module] = None,
        tokenizer=None,
    ):
        self.config = config or UnTracConfig()
        self.device = torch.device(resolve_device(self.config.device))
        self.model_spec = model_spec or self.config.model_spec()
        if self.config.gradient_checkpointing and not self.model_spec.gradient_checkpointing:
            self.model_spec = replace(self.model_spec, gradient_checkpointing=True)
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None:
            log.info("Loading model: %s", self.model_spec.name_or_path or "from config")
            model, tokenizer = self._load(tokenizer_texts)
        self.model, self.tokenizer = model, tokenizer
        self._to_device()
        self.model.eval()
        self.last_result: Optional[AttributionResult] = None
        self._cached: Optional[tuple] = None  # (key, weights signature, scores) of the last engine run

    def clear_cache(self) -> None:
        """Forget the last result: the next call runs the engine even for the same inputs."""
        self._cached = None

    def _weights_signature(self) -> tuple:
        """Changes whenever the model's parameters are replaced, moved or modified in place (every in-place
        write bumps a tensor's version counter), so a cached result is never served for other weights."""
        return (id(self.model), id(self.tokenizer),
                tuple((id(p), p.data_ptr(), getattr(p, "_version", None)) for p in self.model.parameters()))

    def _cache_key(self, test_records: list[dict], training_texts: Sequence[str], eval_batch_size: int) -> tuple:
        """Everything a call's scores depend on besides the weights: the exact inputs and the config now."""
        records = tuple(tuple(sorted((k, repr(v)) for k, v in r.items())) for r in test_records)
        return (records, tuple(training_texts), int(eval_batch_size), astuple(self.config), repr(self.model_spec))

    # -- model -------------------------------------------------------------------------------------
    def _load(self, texts):
        return load_model_and_tokenizer(self.model_spec, texts)

    def _is_quantized(self) -> bool:
        return bool(getattr(self.model, "is_quantized", False) or getattr(self.model, "hf_quantizer", None) is not None
                    or getattr(getattr(self.model, "base_model", None), "is_quantized", False))

    def _to_device(self) -> None:
        """Lightning moves the module back to the CPU when a Trainer tears down; bring it back."""
        if self._is_quantized():
            return
        try:
            current = next(self.model.parameters()).device
        except StopIteration:
            return
        if current != self.device:
            self.model.to(self.device)

    def count_parameters(self) -> int:
        return count_parameters(self.model)

    def compute_loss(self, text: str) -> float:
        """The model's loss on one text at the current weights (mean token NLL, eval mode)."""
        ids = self.tokenizer(text, truncation=True, max_length=self._max_length(), return_tensors="pt")["input_ids"]
        batch = {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device), "labels": ids.to(self.device)}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return float(model_per_example_loss(self.model, batch)[0])
        finally:
            self.model.train(was_training)

    def _max_length(self) -> int:
        context = context_length(self.model)
        return min(self.config.max_length, context) if context else self.config.max_length

    # -- the engine ----------------------------------------------------------------------------------
    def _records(self, test_records: list[dict], training_texts: Sequence[str]) -> tuple[list[dict], list[dict]]:
        texts = _text_list(training_texts, "training_texts")
        if not texts:
            raise ValueError("training_texts is empty")
        per_text_group = get_method(self.config.method).unlearns_training_data
        train = records_from_list(
            [{"id": f"train-{i}", "group": f"train-{i}" if per_text_group else TRAIN_GROUP, "text": t} for i, t in enumerate(texts)],
            name="training_texts",
        )
        return train, test_records

    def attribute_records(
        self,
        test_records: list[dict],
        training_texts: Sequence[str],
        *,
        show_progress: bool = False,
        eval_batch_size: Optional[int] = None,
    ) -> np.ndarray:
        """Scores ``[len(test_records), len(training_texts)]`` for test records (``{"id", "text"}``
        or ``{"id", "prompt", "completion"}``: loss on the completion only). One engine run: the θ0
        losses of the evaluation set are computed once for all test records.

        The last result is kept: the same inputs with the same config and unchanged weights (e.g.
        :meth:`get_top_k_influences` after :meth:`compute_influence_scores`) return it without unlearning
        again. Changing an input, a config field or the weights invalidates it; :meth:`clear_cache` forgets it."""
        train, queries = self._records(test_records, training_texts)
        eval_batch_size = eval_batch_size or self.config.eval_batch_size
        key = self._cache_key(queries, [r["text"] for r in train], eval_batch_size)
        if self._cached is not None and self._cached[0] == key and self._cached[1] == self._weights_signature():
            log.debug("same inputs, config and weights as the last call: reusing its scores")
            return self._cached[2].copy()
        self._cached = None
        try:
            with warnings.catch_warnings(), speaking(UNTRAC_CONFIG):  # warnings name UnTracConfig's fields, once
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                result = attribute(
                    train, queries, method=self.config.method, model=self.model_spec, net=self.model, tokenizer=self.tokenizer,
                    optimizer=self.config.optimizer_spec(), unlearning=self.config.schedule(), target_unit="example",
                    seed=self.config.seed, max_length=self._max_length(), eval_batch_size=eval_batch_size,
                    trainer=self.config.trainer_kwargs(show_progress), return_result=True,
                )
        finally:
            self._to_device()
            self.model.eval()
        self.last_result = result
        table = result.table
        rows = {rid: r for r, rid in enumerate(table.row_ids)}
        cols = {cid: c for c, cid in enumerate(table.col_ids)}
        train_cols = [f"train-{i}" for i in range(len(train))]
        matrix = table.scores[[rows[q["id"]] for q in queries]][:, [cols[t] for t in train_cols]]
        if result.failed:
            warnings.warn(f"unlearning diverged for {sorted(result.failed)}: their scores are NaN (lower UnTracConfig.unlearning_rate)")
        matrix = matrix.double().numpy()
        self._cached = (key, self._weights_signature(), matrix.copy())
        return matrix

    def compute_influence_matrix(self, test_texts: Sequence[str], training_texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Scores ``[len(test_texts), len(training_texts)]`` in one engine run (row = test text)."""
        tests = _text_list(test_texts, "test_texts")
        records = records_from_list([{"id": f"test-{j}", "group": TEST_GROUP, "text": t} for j, t in enumerate(tests)], name="test_texts")
        return self.attribute_records(records, training_texts, show_progress=show_progress)

    # -- the seed's API ------------------------------------------------------------------------------
    def compute_influence_scores(self, test_text: str, training_texts: List[str], show_progress: bool = True) -> np.ndarray:
        """Influence of every training text on ``test_text``: a float array, higher = more influential.

        ``score[i] = L(train_i; θ_T) - L(train_i; θ0)`` for UnTrac-Inv (``L(test; θ_T^(i)) -
        L(test; θ0)`` for UnTrac; see the class docstring). The model is at θ0 again afterwards.
        """
        if not isinstance(test_text, str):
            raise TypeError(f"test_text must be a string, got {type(test_text).__name__}")
        return self.compute_influence_matrix([test_text], training_texts, show_progress=show_progress)[0]

    def get_top_k_influences(self, test_text: str, training_texts: List[str], k: Optional[int] = None) -> list[tuple[int, float, str]]:
        """``[(index, score, text), ...]`` of the ``k`` highest scores (default ``top_k_influences``),
        highest first; ties keep the lower index first; NaN scores (diverged unlearning) are left out.
        Right after :meth:`compute_influence_scores` for the same texts it reuses those scores (no second run)."""
        k = self.config.top_k_influences if k is None else int(k)
        scores = self.compute_influence_scores(test_text, training_texts, show_progress=True)
        return top_k(scores, training_texts, k)


def top_k(scores: np.ndarray, texts: Sequence[str], k: int) -> list[tuple[int, float, str]]:
    """Indices of the ``k`` largest finite scores, highest first (stable: lower index wins ties)."""
    finite = np.isfinite(scores)
    order = np.argsort(np.where(finite, -scores, np.inf), kind="stable")
    order = [int(i) for i in order if finite[i]][: max(0, k)]
    return [(i, float(scores[i]), texts[i]) for i in order]



class MemoryEfficientUnTracEstimator(UnTracInfluenceEstimator):
    """The seed's estimator for large models: batched loss evaluation, optional quantisation.

    ``use_quantization=True`` loads the base model through bitsandbytes in ``quant_bits`` (4 or 8)
    via ``ModelSpec(quantization={"bits": quant_bits})``; unlearning then acts on LoRA adapters (the
    frozen quantised base cannot be updated), which is an approximation of full-weight UnTrac. That
    path is implemented in :mod:`untrac_pl.quantization`; if the installed package lacks it, loading
    raises a :class:`~untrac_pl.errors.ModelLoadError` that says so.
    """

    def __init__(self, config: Optional[UnTracConfig] = None, use_quantization: bool = False, quant_bits: int = 4, **kwargs):
        self.use_quantization = bool(use_quantization)
        self.quant_bits = int(quant_bits)
        config = config or UnTracConfig()
        if self.use_quantization:
            if self.quant_bits not in (4, 8):
                raise ValueError(f"quant_bits must be 4 or 8, got {quant_bits}")
            spec = kwargs.pop("model_spec", None) or config.model_spec()
            kwargs["model_spec"] = replace(spec, quantization={**(spec.quantization or {}), "bits": self.quant_bits})
        super().__init__(config, **kwargs)

    def _load(self, texts):
        try:
            return super()._load(texts)
        except ModuleNotFoundError as exc:
            if exc.name == "untrac_pl.quantization":
                raise ModelLoadError(
                    "use_quantization=True needs untrac_pl.quantization (quantised loading + LoRA unlearning), "
                    "which this installation of untrac-pl does not have; use use_quantization=False"
                ) from exc
            raise

    def compute_influence_scores_batched(self, test_text: str, training_texts: List[str], batch_size: int = 8) -> np.ndarray:
        """As :meth:`compute_influence_scores`, with losses evaluated ``batch_size`` texts at a time.

        (The engine always batches loss evaluation, sorted by length; this only sets the batch size.
        Unlike the seed, losses are per example, never a batch mean copied to every example.)
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        records = records_from_list([{"id": "test-0", "group": TEST_GROUP, "text": test_text}], name="test_text")
        return self.attribute_records(records, training_texts, eval_batch_size=batch_size)[0]


class TracInBaseline:
    """The seed's "TracIn" baseline — which is really **GradDot at the final checkpoint**.

    ``score[i] = ∇L(test; θ) · ∇L(train_i; θ)`` at the model's current weights (positive = helped).
    The paper's TracIn sums ``lr_c × ∇L(test) · ∇L(train)/|∇L(train)|`` over several *training
    checkpoints*; with only the final weights there is nothing to sum, and the result is GradDot.
    Validating UnTrac against it is also circular: one SGD step of UnTrac-Inv *is* ``lr × GradDot``
    to first order. For the real TracIn use :func:`untrac_pl.baselines.tracin` with the checkpoints
    ``untrac-pl fit`` saves.

    Computed by :func:`untrac_pl.baselines.graddot` (per-example gradients on ``torch.func``).
    ``batch_size`` bounds memory: it holds ``batch_size × n_params`` floats at once.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device=None, *, batch_size: int = 4, max_length: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(resolve_device(device if device is None or isinstance(device, str) else str(device)))
        self.batch_size, self.max_length = batch_size, max_length

    def compute_influence_scores(self, test_text: str, training_texts: List[str]) -> np.ndarray:
        texts = _text_list(training_texts, "training_texts")
        context = context_length(self.model)
        max_length = min(self.max_length, context) if context else self.max_length
        train = tokenize_records(records_from_list(texts, name="training_texts"), self.tokenizer, max_length, "training_texts")
        query = tokenize_records(records_from_list([test_text], name="test_text"), self.tokenizer, max_length, "test_text")
        eager = getattr(getattr(self.model, "config", None), "_attn_implementation", None) == "eager"
        with _without_checkpointing(self.model):
            out = graddot(self.model, train.examples, query.examples, batch_size=self.batch_size,
                          pad_token_id=self.tokenizer.pad_token_id, use_vmap=eager)
        return out["example_scores"][0].double().numpy()


class _without_checkpointing:
    """Gradient checkpointing off for the duration (its input-embedding hook calls ``requires_grad_``,
    which ``torch.func`` transforms reject); switched back on afterwards, non-reentrant."""

    def __init__(self, model):
        self.model = model
        self.was_on = bool(getattr(model, "is_gradient_checkpointing", False))

    def __enter__(self):
        if self.was_on:
            self.model.gradient_checkpointing_disable()
            if hasattr(self.model, "_require_grads_hook"):
                self.model.disable_input_require_grads()

    def __exit__(self, *exc):
        if self.was_on:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

