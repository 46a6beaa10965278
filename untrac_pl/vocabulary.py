"""The caller's words for the engine's settings, in warnings (and the once-per-process filter of the Python API).

The engine (:mod:`untrac_pl.engine`, :mod:`untrac_pl.methods`) names a setting by its own name
(``max_length``, ``samples_per_group``, ``unlearning.num_steps``, ...); the front end that was called says
how its user writes it, by making a :class:`Vocabulary` current for the duration of the run:

* ``untrac-pl`` (the default, also for direct :func:`~untrac_pl.engine.run_attribution` calls): the YAML /
  command-line keys, e.g. ``data.max_length``, ``model.unlearning: {num_steps: 5, ...}``;
* :func:`untrac_pl.attribute`: its keyword arguments, e.g. ``max_length``, ``unlearning={'num_steps': 5, ...}``;
* :class:`~untrac_pl.estimator.UnTracConfig` (the seed-style estimators): its fields, e.g.
  ``UnTracConfig.max_length``, ``UnTracConfig(unlearning_steps=5)``;
* ``untrac-pl toxicity`` / ``untrac-pl scaling`` (which run those estimators): the same fields in the config's
  ``untrac:`` section, e.g. ``untrac.unlearning_steps: 5``.

The outermost front end wins (``UnTracInfluenceEstimator`` calls ``untrac_pl.attribute``: its user wrote an
``UnTracConfig``). The Python vocabularies also say each warning only once per process (:func:`warn`):
a notebook that calls the estimator in a loop sees the advice once, not on every call.
"""
from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

__all__ = ["Vocabulary", "CLI", "PYTHON_API", "UNTRAC_CONFIG", "UNTRAC_SECTION", "current", "option", "speaking", "spoken", "warn"]


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclass(frozen=True)
class Vocabulary:
    """How one front end names the engine's settings.

    ``keys``: engine name -> the caller's name (an engine name it lacks is quoted as it is);
    ``style``: ``yaml`` renders a setting ``key: value``, ``python`` ``key=value``; ``owner``: a config
    class (or YAML section) whose fields the keys are (``UnTracConfig``: keys read ``UnTracConfig.<field>``,
    settings ``UnTracConfig(<field>=...)``; section ``untrac``: ``untrac.<field>: ...``); ``once``:
    :func:`warn` says each message once per process.
    """

    name: str
    keys: Mapping[str, str] = field(default_factory=dict)
    style: str = "yaml"
    owner: str = ""
    once: bool = False

    def key(self, name: str) -> str:
        """What the caller calls the engine's setting ``name``."""
        if name not in self.keys:
            return name
        return f"{self.owner}.{self.keys[name]}" if self.owner else self.keys[name]

    def _field(self, name: str) -> str:
        key = self.keys.get(name, name)
        return f"{self.owner}.{key}" if self.owner and self.style == "yaml" and name in self.keys else key

    def setting(self, name: str, value) -> str:
        """``name`` set to ``value``, as the caller would write it. A dict value of a setting the
        vocabulary has no key for, but keys for some of its fields, is written field by field
        (``unlearning: {num_steps: 5, ...}`` -> ``unlearning_steps=5``), leaving out the fields this front
        end does not expose."""
        if isinstance(value, dict) and name not in self.keys and any(f"{name}.{k}" in self.keys for k in value):
            parts = [(self._field(f"{name}.{k}"), v) for k, v in value.items() if f"{name}.{k}" in self.keys]
        else:
            parts = [(self._field(name), value)]
        if self.style == "yaml":
            return ", ".join(f"{k}: {_yaml(v)}" for k, v in parts)
        text = ", ".join(f"{k}={v!r}" for k, v in parts)
        return f"{self.owner}({text})" if self.owner else text


#: ``untrac-pl`` and YAML configs
CLI = Vocabulary("cli", {
    "unlearning": "model.unlearning",
    "unlearning.num_steps": "model.unlearning.num_steps",
    "unlearning.loss_reduction": "model.unlearning.loss_reduction",
    "optimizer": "model.optimizer",
    "max_length": "data.max_length",
    "eval_batch_size": "data.eval_batch_size",
    "samples_per_group": "data.samples_per_group",
    "seed": "attribution.seed",
    "target_unit": "attribution.target_unit",
    # error messages (option()): the model spec sits at model.model in attribute / fit
    "model.name_or_path": "model.model.name_or_path",
    "model.config": "model.model.config",
    "model.tokenizer": "model.model.tokenizer",
    "model.train_tokenizer_vocab": "model.model.train_tokenizer_vocab",
    "overwrite": "attribution.overwrite",
    "output_dir": "attribution.output_dir",
    "options.checkpoints": "attribution.baseline.checkpoints",
})

#: :func:`untrac_pl.attribute`: the engine's names are its keyword arguments (``unlearning.num_steps``:
#: the field of the ``unlearning=`` schedule)
PYTHON_API = Vocabulary("untrac_pl.attribute", style="python", once=True)

#: :class:`~untrac_pl.estimator.UnTracConfig` and the estimators built on it
UNTRAC_CONFIG = Vocabulary("UnTracConfig", {
    "model.name_or_path": "model_name",
    "unlearning.num_steps": "unlearning_steps",
    "optimizer.lr": "unlearning_rate",
    "optimizer": "optimizer",
    "max_length": "max_length",
    "eval_batch_size": "eval_batch_size",
    "seed": "seed",
}, style="python", owner="UnTracConfig", once=True)

#: ``untrac-pl toxicity`` / ``untrac-pl scaling``: the same fields, in their config's ``untrac:`` section
UNTRAC_SECTION = Vocabulary("untrac-pl toxicity/scaling", UNTRAC_CONFIG.keys, style="yaml", owner="untrac", once=True)

_active: ContextVar[Optional[Vocabulary]] = ContextVar("untrac_pl_vocabulary", default=None)
_said: set[str] = set()  # the messages already said by a ``once`` vocabulary, in this process


def current() -> Vocabulary:
    """The vocabulary of the front end running now (:data:`CLI` when none said)."""
    return _active.get() or CLI


@contextlib.contextmanager
def speaking(vocabulary: Vocabulary) -> Iterator[Vocabulary]:
    """Make ``vocabulary`` current for the block, unless an outer front end already chose one."""
    if _active.get() is not None:
        yield _active.get()
        return
    token = _active.set(vocabulary)
    try:
        yield vocabulary
    finally:
        _active.reset(token)


def spoken() -> Optional[Vocabulary]:
    """The vocabulary a front end made current, or ``None`` (the library called directly)."""
    return _active.get()


_NOTHING = object()


def option(name: str, value=_NOTHING) -> str:
    """How the caller sets the engine's setting ``name`` (to ``value``), for an error message: a
    command-line flag under a YAML front end (``--attribution.overwrite true``), a keyword under a
    Python one (``overwrite=True``), the setting's own name (``overwrite: true``) when no front end said."""
    words = _active.get()
    if words is None:
        return name if value is _NOTHING else f"{name}: {_yaml(value)}"
    if words.style == "yaml":
        flag = "--" + words.key(name)
        return flag if value is _NOTHING else f"{flag} {_yaml(value)}"
    return words.key(name) if value is _NOTHING else words.setting(name, value)


def warn(logger: logging.Logger, message: str) -> None:
    """``logger.warning(message)``; under a ``once`` vocabulary only the first time in this process."""
    if current().once:
        if message in _said:
            return
        _said.add(message)
    logger.warning(message)
