"""The in-memory Python API: ``untrac_pl.attribute(train, queries, method=..., model=...) -> ScoreTable``.

    import untrac_pl
    table = untrac_pl.attribute(
        train=[{"id": "a1", "group": "animals", "text": "..."}, ...],   # records, texts or data sources
        queries=["a test behaviour", ...],
        method="untrac_inv", model="gpt2")                              # a ModelSpec, a name/path, or model=net + tokenizer=tok
    table.scores            # [queries, training examples], positive = helped
    table.group_level()     # query group x training group

The same run shell as ``untrac-pl attribute`` (:func:`untrac_pl.engine.run_attribution`), so both give
identical scores for the same settings. Nothing is written unless ``output_dir`` is given.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from untrac_pl.config import AttributionConfig
from untrac_pl.data.datamodule import AttributionDataModule
from untrac_pl.data.records import DataSource, read_records, records_from_list
from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.engine import AttributionResult, run_attribution
from untrac_pl.methods import DEFAULT_TARGET_UNIT, check_options, get_method
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec
from untrac_pl.scores import ScoreTable
from untrac_pl.unlearning import UnTracModule
from untrac_pl.vocabulary import PYTHON_API, speaking

__all__ = ["attribute"]

DEFAULT_TRAINER = {"accelerator": "auto", "devices": 1, "logger": False, "enable_progress_bar": False}

Data = Union[Sequence[str], Sequence[dict], DataSource, Sequence[DataSource], str]


def _sources(data) -> Optional[list[DataSource]]:
    """Data sources (a DataSource, a path, or a list of them), or ``None`` for in-memory data."""
    if isinstance(data, DataSource):
        return [data]
    if isinstance(data, str):
        return [DataSource(path=data)]
    items = list(data)
    if items and all(isinstance(d, DataSource) for d in items):
        return items
    return None


def _spec(value, cls, what: str, default):
    """``value`` as a ``cls`` (an instance, or a dict of its fields); ``default()`` when ``None``."""
    if value is None:
        return default()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as exc:
            raise ValueError(f"{what}: {exc}") from None
    raise TypeError(f"{what} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def attribute(
    train: Data,
    queries: Data,
    *,
    method: str = "untrac_inv",
    model: Union[ModelSpec, str, dict, torch.nn.Module, None] = None,
    net: Optional[torch.nn.Module] = None,
    tokenizer=None,
    optimizer: Union[OptimizerSpec, dict, None] = None,
    unlearning: Union[UnlearningSchedule, dict, None] = None,
    target_unit: str = DEFAULT_TARGET_UNIT,
    options: Optional[dict] = None,
    seed: int = 0,
    max_length: int = 512,
    samples_per_group: Optional[int] = None,
    eval_batch_size: int = 16,
    trainer: Optional[dict] = None,
    output_dir: Optional[str] = None,
    overwrite: bool = False,
    return_result: bool = False,
) -> Union[ScoreTable, AttributionResult]:
    """Attribute ``queries`` to ``train`` with any registered method; returns the query-major ScoreTable.

    Args:
        train: training data: records (``{"id", "group", "text"}`` or ``prompt``/``completion``), plain
            texts (each its own id, one group), a :class:`~untrac_pl.data.records.DataSource`, a path, or a list of sources.
        queries: the test behaviours, in the same forms.
        method: a registered method name (``untrac``, ``untrac_inv``, ``graddot``, ...; aliases work).
        model: a :class:`~untrac_pl.models.ModelSpec` (or its dict), a Hub id / ``save_pretrained`` folder,
            or a loaded model (then pass ``tokenizer`` too).
        net, tokenizer: an already-loaded model and tokenizer to use (``model`` then only describes it
            in the score file's metadata). The model is back at θ0, bit for bit, afterwards.
        optimizer / unlearning: the ascent (UnTrac / UnTrac-Inv); specs or dicts of their fields.
        target_unit: ``example`` (each query) or ``group`` (each query subset, the paper's UnTrac-Inv).
        options: the method's own options (the fields of its ``Options``).
        seed, max_length, samples_per_group, eval_batch_size: as the CLI's ``attribution.seed`` and ``data.*``.
        trainer: Trainer keyword arguments (default: auto accelerator, one device, no logger, no bar).
        output_dir: also write the run's files there (as ``untrac-pl attribute``).
        return_result: return the whole :class:`~untrac_pl.engine.AttributionResult` (failed targets,
            memory, timings) instead of only the table.

    Warnings name these arguments (``max_length=...``, ``unlearning={'num_steps': 5, ...}``), not the CLI's
    keys, and each is said once per process (:mod:`untrac_pl.vocabulary`).
    """
    method_def = get_method(method)
    if isinstance(model, torch.nn.Module):
        net, model = model, ModelSpec(name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None)
    if net is not None and tokenizer is None:
        raise ValueError("model: a loaded model needs its tokenizer (tokenizer=...)")
    spec = ModelSpec(name_or_path=model) if isinstance(model, str) else _spec(model, ModelSpec, "model", ModelSpec)
    # None: the paper's settings (UnTrac one epoch at batch 1, UnTrac-Inv 5 whole-target steps)
    schedule = _spec(unlearning, UnlearningSchedule, "unlearning", method_def.default_schedule)
    module = UnTracModule(model=spec, optimizer=_spec(optimizer, OptimizerSpec, "optimizer", OptimizerSpec), unlearning=schedule)
    if net is not None:
        module.attach(net, tokenizer)
    data_kwargs = dict(max_length=max_length, samples_per_group=samples_per_group, sample_seed=seed, eval_batch_size=eval_batch_size)
    train_sources, query_sources = _sources(train), _sources(queries)
    if train_sources is not None and query_sources is not None:
        datamodule = AttributionDataModule(train=train_sources, queries=query_sources, **data_kwargs)
    else:
        train_records = [r for s in train_sources for r in read_records(s)] if train_sources else records_from_list(list(train), name="train")
        query_records = [r for s in query_sources for r in read_records(s)] if query_sources else records_from_list(list(queries), name="queries")
        datamodule = AttributionDataModule.from_records(train_records, query_records, **data_kwargs)
    config = AttributionConfig(method=method_def.name, target_unit=target_unit, seed=seed, output_dir=output_dir or "unused",
                               overwrite=overwrite,
                               **method_def.config_options(check_options(method_def.name, options, where="options", runner=True)))
    with speaking(PYTHON_API):  # warnings name these keyword arguments, once per process (untrac_pl.vocabulary)
        result = run_attribution(module, datamodule, config, {**DEFAULT_TRAINER, **(trainer or {})}, write=output_dir is not None,
                                  command=f"python: untrac_pl.attribute(method={method!r}, output_dir={str(output_dir)!r}, ...)")
    return result if return_result else result.table

