"""AttributionConfig: what to attribute and where to write it (the ``attribution:`` section)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from untrac_pl.methods import DEFAULT_TARGET_UNIT, canonical_name


@dataclass
class AttributionConfig:
    """What to attribute and where to write it.

    Args:
        method: a registered method (``untrac``, ``untrac_inv``, ``graddot``, ``gradcos``, ``tracin``,
            ``hif_lissa``, ``hif_arnoldi``, ``ekfac``; hyphens and aliases such as ``untrac-inv`` work).
        target_unit: UnTrac-Inv and the gradient methods: ``example`` scores each query on its own,
            ``group`` each query subset as one target (the paper's setting). UnTrac always unlearns
            training groups.
        output_dir: where the run writes (``<output_dir>.partial`` while unfinished).
        overwrite: replace an existing output directory.
        top_k: training units listed per query in ``rankings.json``.
        seed: global seed; each target's seed is derived from it and the target id.
        snippet_chars: length of the text snippets in ``rankings.json``.
        targets_per_pass: UnTrac / UnTrac-Inv: unlearn this many targets one after another and score
            them together in one pass over the evaluation data; scores equal ``1``'s.
        parallel_targets: UnTrac / UnTrac-Inv: unlearn this many targets at once in one batched
            computation (``torch.func.vmap``, :mod:`untrac_pl.parallel`), then score them in one pass;
            scores equal ``1``'s to float rounding. Memory: K copies of the trainable tensors.
        snapshot_device: ``cpu`` keeps the θ0 snapshot in host memory instead of on the accelerator
            (saves one copy of the trainable weights on the GPU; costs a host-to-device copy per target).
        resume: continue ``<output_dir>.partial`` when it holds finished targets of the same
            configuration (same config hash, see :mod:`untrac_pl.resume`); ``false`` makes it an error.
        restart: discard a ``.partial`` of a different configuration (otherwise always an error).
        baseline: options of a gradient method (graddot, ...): the fields of its ``Options``
            (``untrac_pl.methods.gradient``), e.g. ``projection_dim``, ``checkpoints`` (TracIn).
    """

    method: str = "untrac_inv"
    target_unit: Literal["example", "group"] = DEFAULT_TARGET_UNIT
    output_dir: str = "runs/attribution"
    overwrite: bool = False
    top_k: int = 10
    seed: int = 0
    snippet_chars: int = 200
    targets_per_pass: int = 1
    parallel_targets: int = 1
    snapshot_device: Optional[str] = None
    resume: bool = True
    restart: bool = False
    baseline: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, low in (("top_k", 1), ("snippet_chars", 1), ("targets_per_pass", 1), ("parallel_targets", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"attribution.{name} must be an integer >= {low}, got {value!r}")
        if not str(self.output_dir).strip():
            raise ValueError("attribution.output_dir is empty")
        if self.target_unit not in ("example", "group"):  # the Python API does not check the Literal
            raise ValueError(f"attribution.target_unit must be example or group, got {self.target_unit!r}")
        self.method = canonical_name(self.method, what="attribution.method")  # aliases, hyphens: untrac-inv -> untrac_inv
