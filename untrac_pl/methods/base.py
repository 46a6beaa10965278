"""What an attribution method is, and what the run shell hands it.

A method is declared once (a subclass of :class:`AttributionMethod`, registered in
:mod:`untrac_pl.methods.registry`): its name, display name, aliases, an options dataclass, and how it
plans (which targets, which side is scored) and scores. The run shell (:mod:`untrac_pl.engine`) owns
the stages common to every method — stage the output folder, load data and model, θ0, targets, write —
and calls the method's hooks with one :class:`RunContext`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.data.tokenize import TokenizedCorpus
from untrac_pl.unlearning import Target

# the one default of ``target_unit`` (UnTrac-Inv and the gradient methods; UnTrac always targets training groups)
DEFAULT_TARGET_UNIT = "example"


def target_seed(global_seed: int, target_id: str) -> int:
    """A seed per target from the global seed and the target id, so order never matters."""
    digest = hashlib.sha256(f"{global_seed}:{target_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class AttributionPlan:
    """Which targets a run has and which corpus is scored.

    ``targets_are_rows``: a target's scores form a row of the query-major matrix (UnTrac-Inv, the
    gradient methods: target = query or query subset) or a column (UnTrac: target = training group).
    """

    method: str
    targets: list[Target]
    target_corpus: TokenizedCorpus
    eval_corpus: TokenizedCorpus
    target_unit: str
    target_groups: list[str]
    targets_are_rows: bool
    query_corpus: TokenizedCorpus = field(repr=False, default=None)

    def __post_init__(self):
        for position, target in enumerate(self.targets):
            target.position, target.total = position, len(self.targets)

    def row_texts(self) -> Optional[Sequence[str]]:
        corpus = self.target_corpus if self.targets_are_rows else self.eval_corpus
        if self.targets_are_rows and self.target_unit == "group":
            return None
        if self.targets_are_rows:
            return [corpus.text_of(t.indices[0]) for t in self.targets]
        return corpus.texts()

    def col_texts(self) -> Optional[Sequence[str]]:
        """The scored corpus's texts, read when indexed (the rankings read only the top-k of each row)."""
        if self.targets_are_rows:
            return self.eval_corpus.texts()
        return None


def query_targets(method: str, queries: TokenizedCorpus, train: TokenizedCorpus, target_unit: str, seed: int) -> AttributionPlan:
    """Rows = queries (``example``) or query subsets (``group``), columns = training examples."""
    if target_unit == "group":
        targets = [Target(g, idx, target_seed(seed, g)) for g, idx in queries.group_members().items()]
        groups = [t.id for t in targets]
    else:
        targets = [Target(rid, [i], target_seed(seed, rid)) for i, rid in enumerate(queries.ids)]
        groups = [r["group"] for r in queries.records]
    return AttributionPlan(method, targets, queries, train, target_unit, groups, True, queries)


@dataclass
class RunContext:
    """Everything one run holds, created by the run shell before the method's first hook.

    ``new_trainer(logger)`` builds a per-target ``Trainer`` with the run's callbacks; ``state`` is the
    resume state (``None`` when nothing is written or the method does not resume); the fields below
    ``timings`` are what the methods hand from one hook to the next.
    """

    module: Any
    datamodule: Any
    config: Any
    trainer_kwargs: dict
    plan: AttributionPlan
    writer: Any
    memory: Any
    restore: Any
    new_trainer: Callable[[Any], Any]
    run_dir: Optional[Path] = None
    logger: Any = None
    board: Any = None  # the run's TensorBoard (untrac_pl.board.RunBoard; None when nothing is logged)
    state: Any = None
    precision: str = "32-true"
    world_size: int = 1
    max_length_requested: int = 0
    resumed: set = field(default_factory=set)  # ids of the targets an interrupted run finished
    target_info: dict = field(default_factory=dict)  # target id -> status, optimizer_steps, ... (resumed ones too)
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # the method's checked options (attribution.baseline)
    eval_loader: Any = None  # the scored corpus in evaluation batches (unlearning methods)
    failed_steps: dict = field(default_factory=dict)  # target id -> the optimizer step whose loss was non-finite
    device: Any = None  # where a one-pass method computes
    output: dict = field(default_factory=dict)  # a one-pass method's raw result (scores, groups, info)
    native: Any = None  # a method's own group-level table, written next to the scores (gradient methods)

    @property
    def steps(self) -> dict:
        """Target id -> optimizer steps taken, of every target finished so far (resumed ones included)."""
        return {target_id: info["optimizer_steps"] for target_id, info in self.target_info.items()}


class AttributionMethod:
    """Base class of every method. Subclasses set the class attributes and implement the hooks.

    ``Options``: a dataclass of the method's own options (``attribution.baseline`` in ``untrac-pl
    attribute``, ``methods[<label>].options`` in a reproduction, ``options=`` in the Python API); its
    field docs (``metadata={"doc": ...}`` or the class docstring's ``Args:``) document them.
    ``kind``: ``unlearning`` (the shell's per-target ascent) or ``gradient`` (one pass at θ0).
    ``resumable``: finished targets are persisted and a killed run resumes.
    """

    name: ClassVar[str]
    display: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type]
    kind: ClassVar[str] = "gradient"
    resumable: ClassVar[bool] = False
    sign: ClassVar[str] = "positive = the training unit helped produce the query (unlearning it raises the query loss)"
    # the formula of a score in the words of a query and its training texts ("{query}": what the query is)
    formula: ClassVar[str] = ""
    # UnTrac unlearns the training side: raw training texts must then each be their own target
    unlearns_training_data: ClassVar[bool] = False

    # -- defaults and options -------------------------------------------------------------------------
    def default_schedule(self) -> UnlearningSchedule:
        """The unlearning schedule of the paper's setting for this method (Python API default)."""
        return UnlearningSchedule()

    @property
    def description(self) -> str:
        """How option errors name the method (EK-FAC: "EK-FAC (kronfluence)")."""
        return self.name

    def validate_options(self, options: dict, field_name: Callable[[str], str]) -> None:
        """Checks of the accepted options' values (their names are checked before); ``field_name(key)``
        is the field as the user wrote it (``attribution.baseline.<key>``, ``methods[<label>].options.<key>``)."""

    def config_options(self, options: dict) -> dict:
        """The method's options as :class:`~untrac_pl.config.AttributionConfig` fields (Python API):
        by default they go to ``attribution.baseline``, the options section of every non-UnTrac method."""
        return {"baseline": dict(options)}

    # -- the run shell's hooks (see untrac_pl.engine) -------------------------------------------------
    def check(self, config, module, trainer_kwargs: dict) -> None:
        """Refuse what cannot work, before any data or model is loaded (the shell then checks the
        options, ``config.baseline``, against ``Options`` and hands them over as ``ctx.options``)."""

    def configure_model(self, module) -> None:
        """Adjust the model spec before it is loaded (e.g. eager attention for ``vmap``)."""

    def plan(self, config, datamodule, module) -> AttributionPlan:
        """The targets and the scored corpus, from the tokenised data (``module``: its schedule, for warnings)."""
        raise NotImplementedError

    def theta0(self, ctx: RunContext) -> None:
        """Work at θ0 before the targets (UnTrac: the evaluation set's losses)."""

    def score_targets(self, ctx: RunContext) -> None:
        """Fill ``ctx.writer``'s matrix (and ``ctx.target_info``)."""
        raise NotImplementedError

    def metadata(self, ctx: RunContext) -> tuple[dict, dict]:
        """The method's own entries of the score file's metadata: ``(before "model", after "model")``."""
        return {}, {}

    def summary(self, ctx: RunContext) -> dict:
        """What ``summary.json`` adds to the metadata: how this run went."""
        return {}

    def extra_outputs(self, ctx: RunContext) -> None:
        """Files besides the shared outputs (e.g. a baseline's own group table)."""

    # -- reproduction ----------------------------------------------------------------------------------
    def reproduction_table(self, spec, ctx):
        """A query-major ScoreTable on θ0 for a reproduction (``spec``: its MethodSpec, ``ctx``: its
        MethodContext); compared with the ground truth at group level."""
        raise NotImplementedError
