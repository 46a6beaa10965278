"""EK-FAC influence through kronfluence (optional; not a paper baseline).

kronfluence is not a dependency of untrac-pl. Install it without letting pip swap the torch build:

    pip install --no-deps kronfluence
    pip install --no-deps einops einconv opt_einsum   # its small deps (accelerate, safetensors, tqdm come with untrac-pl)

(check ``pip show kronfluence`` for its current ``Requires:`` list). kronfluence tracks only
``nn.Linear`` / ``nn.Conv2d`` modules: GPT-2's ``Conv1D`` layers are invisible to it, so use a
Llama/OPT-style model (or a LoRA adapter made of ``nn.Linear``). The model is deep-copied before
kronfluence wraps its modules; the caller's model is left untouched.

Status: checked with kronfluence 1.0.1 installed as above (torchvision, which it lists, is not needed
to import it; CI installs it so, see .ci/run): ``tests/test_baselines.py::test_ekfac_matches_a_hand_computed_ekfac``
compares EK-FAC and K-FAC scores with a float64 computation by hand on a toy LM, and
``test_ekfac_with_kronfluence`` runs it on a tiny Llama. Note: with ``damping=None`` kronfluence's own
default ``damping_factor`` (1e-8 in 1.0.1) applies, not its heuristic (0.1 x mean eigenvalue), which
kronfluence uses only when ``damping_factor=None`` is passed explicitly.
"""
from __future__ import annotations

import copy
import tempfile
from typing import Optional

import torch

from untrac_pl.baselines._inputs import as_batches, group_map, mean_by_group
from untrac_pl.data.collate import PadCollator
from untrac_pl.errors import MethodOptionError
from untrac_pl.losses import IGNORE_INDEX, lm_inputs, per_example_loss

INSTALL_HINT = (
    "method 'ekfac' needs the optional package kronfluence. Install it without touching torch:\n"
    "    pip install --no-deps kronfluence\n"
    "    pip install --no-deps einops einconv opt_einsum\n"
    "(see `pip show kronfluence` for its Requires list)."
)


def _import_kronfluence():
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from err
    return Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs


def _examples(data, batch_size, pad_token_id) -> list:
    """Unpadded tokenised examples in index order, from anything :func:`as_batches` accepts."""
    out = []
    count = 0
    for batch in as_batches(data, batch_size=batch_size, pad_token_id=pad_token_id):
        n = batch["input_ids"].shape[0]
        idx = batch["index"].tolist() if "index" in batch else list(range(count, count + n))
        count += n
        for row in range(n):
            length = int(batch["attention_mask"][row].sum())
            out.append({"input_ids": batch["input_ids"][row, :length].tolist(),
                        "labels": batch["labels"][row, :length].tolist(), "index": int(idx[row])})
    return sorted(out, key=lambda e: e["index"])


def ekfac_scores(model, train, queries, *, train_groups=None, query_groups=None, batch_size: int = 8,
                 pad_token_id: int = 0, damping: Optional[float] = None, strategy: str = "ekfac",
                 output_dir: Optional[str] = None, **unused) -> dict:
    """Query-major EK-FAC influence ``g_q^T G^{-1} g_t`` (kronfluence's sign: positive = helpful).

    Options: ``batch_size``, ``pad_token_id``, ``damping``, ``strategy``, ``output_dir``. Anything else
    (``params``, ``projection_dim``, ``hessian_samples_per_group``, ... of the other baselines) cannot be
    honoured by kronfluence and raises a :class:`~untrac_pl.errors.MethodOptionError` before kronfluence is imported (the method
    layer, :mod:`untrac_pl.methods.options`, refuses them earlier with a message naming the config field).
    """
    given = [k for k, v in unused.items() if v is not None]
    if given:  # nothing is dropped silently
        raise MethodOptionError(f"EK-FAC (kronfluence) cannot honour '{given[0]}'; ekfac accepts: batch_size, pad_token_id, damping, strategy, output_dir")
    Analyzer, prepare_model, FactorArguments, ScoreArguments, Task, DataLoaderKwargs = _import_kronfluence()

    class _LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**lm_inputs(model, batch)).logits
            labels = batch["labels"]
            if sample:  # true Fisher: targets drawn from the model's own predictive distribution
                with torch.no_grad():
                    drawn = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
                sampled = labels.clone()
                sampled[:, 1:] = torch.where(labels[:, 1:] == IGNORE_INDEX, labels[:, 1:], drawn)
                labels = sampled
            return per_example_loss(logits, labels).sum()

        def compute_measurement(self, batch, model):
            logits = model(**lm_inputs(model, batch)).logits
            return per_example_loss(logits, batch["labels"]).sum()

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        raise ValueError("kronfluence tracks nn.Linear/nn.Conv2d only; this model has no nn.Linear "
                         "(GPT-2 uses Conv1D). Use a Llama/OPT-style model or a LoRA adapter.")
    train_ex = _examples(train, batch_size, pad_token_id)
    query_ex = _examples(queries, batch_size, pad_token_id)
    task = _LMTask()
    work = prepare_model(copy.deepcopy(model).eval(), task)
    device = next(model.parameters()).device
    kwargs = DataLoaderKwargs(collate_fn=PadCollator(pad_token_id))
    score_args = ScoreArguments() if damping is None else ScoreArguments(damping_factor=float(damping))
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="untrac_ekfac", model=work, task=task, cpu=device.type == "cpu",
                            disable_model_save=True, output_dir=output_dir or tmp)
        analyzer.fit_all_factors(factors_name="factors", dataset=train_ex, per_device_batch_size=batch_size,
                                 dataloader_kwargs=kwargs, factor_args=FactorArguments(strategy=strategy),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="factors",
                                         query_dataset=query_ex, train_dataset=train_ex,
                                         per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, dataloader_kwargs=kwargs,
                                         score_args=score_args, overwrite_output_dir=True)
        S = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].float().cpu()
    # EK-FAC influence is bilinear in the gradients: group (mean-gradient) scores = means of example scores
    tg, tnames = group_map(train_groups, S.shape[1], "train")
    qg, qnames = group_map(query_groups, S.shape[0], "query")
    Sg = None
    if tg is not None or qg is not None:
        Sg = S if qg is None else mean_by_group(S, qg, len(qnames))
        Sg = Sg if tg is None else mean_by_group(Sg.T, tg, len(tnames)).T
    return {"method": "ekfac", "example_scores": S, "group_scores": Sg, "train_groups": tnames,
            "query_groups": qnames, "group_rows": None if Sg is None else ("query_group" if qg is not None else "query_example"),
            "group_cols": None if Sg is None else ("train_group" if tg is not None else "train_example"),
            "info": {"strategy": strategy, "damping": damping, "tested": False}}
