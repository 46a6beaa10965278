"""One registry of the corpora the project generates itself (no download), read like any other data source.

A generated corpus is an ordinary :class:`~untrac_pl.data.records.DataSource`::

    train:   [{format: generated, generator: quickstart, split: train}]
    queries: [{format: generated, generator: quickstart, split: queries}]
    train:   [{format: generated, generator: synthetic, split: train, seed: 3, options: {dataset: A, n_per_task: 64}}]

and :func:`~untrac_pl.data.records.read_records` validates it, names its records' origins and applies
``limit`` / ``group`` as for a file. Built-in generators (``options`` with their defaults):

===============  ===========================================  ================================================
generator        splits                                       options
===============  ===========================================  ================================================
``quickstart``   ``train`` (animals / cooking / sports /      ``n_per_group`` (24)
                 insults), ``queries`` (six; the last
                 repeats a training sentence)
``synthetic``    ``train`` (task1..task4), ``test``           ``dataset`` (``A`` or ``B``, required),
                 (the paper's Experiment 1 datasets A/B)      ``n_per_task`` (256), ``n_test`` (256),
                                                              ``pos_split`` (true)
``pretraining``  ``train`` (eight styled corpora),            ``n_docs_per_corpus`` (400),
                 ``toxigen_like``, ``winobias_like``,         ``n_test_per_group`` (16), ``sizes`` (none: equal)
                 ``truthfulqa_like`` (Experiment 2 look-alikes)
===============  ===========================================  ================================================

Records are a deterministic function of ``(generator, split, seed, options)``; the splits of one
corpus come from one draw, so a corpus's ``train`` and ``queries``/``test`` must be read with the
same ``seed`` and ``options`` to belong together (e.g. the quickstart's last query repeats a
sentence of *its* training split). The generators themselves live in :mod:`untrac_pl.data.embedded`
(quickstart, pretraining) and :mod:`untrac_pl.data.synthetic`; this module only names them.

A new generator is a function ``(split, seed, **options) -> list[dict]`` registered with
``@register_generator("name", splits=(...))``; its keyword parameters are its options (a parameter
without a default is a required option).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

from untrac_pl.data.embedded import TEST_SETS, pretraining_corpora, quickstart_corpus
from untrac_pl.data.synthetic import make_synthetic
from untrac_pl.errors import DataError

__all__ = ["Generator", "register_generator", "get_generator", "generator_names", "generate"]

GeneratorFunction = Callable[..., list[dict]]


@dataclass(frozen=True)
class Generator:
    """A registered corpus generator: its name, its splits and the function that makes a split."""

    name: str
    splits: tuple[str, ...]
    function: GeneratorFunction

    @property
    def options(self) -> dict[str, inspect.Parameter]:
        """The function's keyword parameters after ``(split, seed)``: the options a source may set."""
        return dict(list(inspect.signature(self.function).parameters.items())[2:])

    def describe(self) -> str:
        options = ", ".join(name if p.default is inspect.Parameter.empty else f"{name}={p.default!r}"
                            for name, p in self.options.items())
        return f"{self.name} (splits: {', '.join(self.splits)}; options: {options or 'none'})"


_REGISTRY: dict[str, Generator] = {}


def register_generator(name: str, splits: Sequence[str]) -> Callable[[GeneratorFunction], GeneratorFunction]:
    """Register ``function(split, seed, **options) -> list[dict]`` as the generator ``name``."""

    def decorate(function: GeneratorFunction) -> GeneratorFunction:
        if name in _REGISTRY:
            raise ValueError(f"a generator named '{name}' is already registered")
        parameters = list(inspect.signature(function).parameters)
        if parameters[:2] != ["split", "seed"]:
            raise TypeError(f"generator '{name}': the function must take (split, seed, **options), got ({', '.join(parameters)})")
        _REGISTRY[name] = Generator(name, tuple(splits), function)
        return function

    return decorate


def generator_names() -> list[str]:
    return list(_REGISTRY)


def get_generator(name: str) -> Generator:
    """The registered generator ``name``; a :class:`DataError` listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = "; ".join(g.describe() for g in _REGISTRY.values())
        raise DataError(f"unknown generator '{name}'; known generators: {known}", field="generator") from None


def generate(name: str, split: str = "train", seed: int = 0, **options) -> list[dict]:
    """The records of one split of a generated corpus (unvalidated plain dicts; read them through
    :func:`~untrac_pl.data.records.read_records` with ``format: generated`` for validated records)."""
    generator = get_generator(name)
    where = f"generated:{name}/{split}"
    if split not in generator.splits:
        raise DataError(f"generator '{name}' has no split '{split}'; choose one of {', '.join(generator.splits)}", source=where, field="split")
    known = generator.options
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(unknown)} for generator {generator.describe()}", source=where, field="options")
    missing = [k for k, p in known.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise DataError(f"generator '{name}' needs option(s) {', '.join(missing)} (options: {{{missing[0]}: ...}})", source=where, field="options")
    try:
        return generator.function(split, seed, **options)
    except ValueError as exc:  # a generator's own check of its options (unknown dataset, negative size, ...)
        raise DataError(str(exc), source=where, field="options") from None


# --------------------------------------------------------------------------------------------------
# built-in generators
# --------------------------------------------------------------------------------------------------


@register_generator("quickstart", splits=("train", "queries"))
def _quickstart(split: str, seed: int, n_per_group: int = 24) -> list[dict]:
    """The quickstart demo corpus (:func:`untrac_pl.data.embedded.quickstart_corpus`)."""
    return quickstart_corpus(seed=seed, n_per_group=n_per_group)[split]


@register_generator("synthetic", splits=("train", "test"))
def _synthetic(split: str, seed: int, dataset: str, n_per_task: int = 256, n_test: int = 256, pos_split: bool = True) -> list[dict]:
    """Synthetic dataset A or B of Experiment 1 (:func:`untrac_pl.data.synthetic.make_synthetic`)."""
    return make_synthetic(dataset, n_per_task=n_per_task, n_test=n_test, seed=seed, pos_split=pos_split)[split]


@register_generator("pretraining", splits=("train",) + TEST_SETS)
def _pretraining(
    split: str,
    seed: int,
    n_docs_per_corpus: int = 400,
    n_test_per_group: int = 16,
    sizes: Optional[Mapping[str, Union[int, float]]] = None,
) -> list[dict]:
    """The eight look-alike corpora and test sets of Experiment 2 (:func:`untrac_pl.data.embedded.pretraining_corpora`)."""
    data = pretraining_corpora(n_docs_per_corpus, seed=seed, sizes=sizes, n_test_per_group=n_test_per_group)
    return data["train"] if split == "train" else data["tests"][split]
