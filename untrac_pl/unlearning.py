"""UnTracModule: gradient-ascent unlearning in manual optimisation, loss scoring in predict_step."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from untrac_pl.data.schedule import (
    UnlearningSchedule,
    num_optimizer_steps,
    plan_micro_batches,
)
from untrac_pl.distributed import take_rank0_gradient
from untrac_pl.errors import NonFiniteLossError
from untrac_pl.lm_base import CausalLMHolder
from untrac_pl.losses import model_losses, model_token_mean_loss
from untrac_pl.models import ModelSpec
from untrac_pl.multiquery import losses_with_parameter_sets
from untrac_pl.optim import OptimizerSpec, build_lr_scheduler, build_optimizer
from untrac_pl.parallel import clip_per_target, parallel_step_losses

log = logging.getLogger(__name__)


@dataclass
class Target:
    """One unlearning target: ``indices`` into the corpus that is ascended on."""

    id: str
    indices: list[int]
    seed: int
    position: int = 0
    total: int = 1


class UnTracModule(CausalLMHolder):
    """Unlearns one target per ``fit`` by gradient ascent and scores an evaluation set in ``predict``.

    Ascent has exactly one negation: the module minimises ``-loss`` with an ordinary optimizer
    (``manual_backward(-loss)``). The model is in train mode (dropout on) while unlearning and in
    eval mode while scoring; Lightning switches the modes between ``fit`` and ``predict``.
    ``predict_step`` returns per-example losses and, once the θ0 losses are connected
    (:meth:`connect`), scores ``loss(θ_T) - loss(θ0)``. ``unlearning.loss_reduction`` says how tokens are averaged (per
    example, or per batch as in the authors' code); ``unlearning.max_grad_norm`` clips each step's
    gradient and ``unlearning.lr_schedule`` decays the lr over the target's planned steps.
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(),
        unlearning: UnlearningSchedule = UnlearningSchedule(),
    ):
        super().__init__()
        # not sent to the logger: the run logs its own HParams (untrac_pl.board.run_hparams)
        self.save_hyperparameters(logger=False)
        self.model_spec = model
        self.optimizer_spec = optimizer
        self.schedule = unlearning
        self.automatic_optimization = False
        self.net: Optional[torch.nn.Module] = None
        self.tokenizer = None
        self.base_losses: Optional[torch.Tensor] = None
        self.target: Optional[Target] = None
        self.keep_on_device = False
        self._step_losses: list[torch.Tensor] = []
        self._first_bad: Optional[torch.Tensor] = None  # device-side non-finite guard (_watch_finite)
        self._bad_value: Optional[torch.Tensor] = None
        self._amp_skipped: Optional[torch.Tensor] = None  # 16-mixed skipped steps, counted on the device
        # the current target's loss per optimizer step, as tensors (no host sync per step); the run's
        # TensorBoard logs it once the target is finished (untrac_pl.board)
        self.ascent_curve: list[torch.Tensor] = []
        self.stopped_at_max_loss = False
        self.amp_skipped_steps = 0
        # targets_per_pass > 1 (untrac_pl.multiquery): targets scored together, one parameter set each
        self.pass_targets: Optional[list[Target]] = None
        self.pass_parameters: Optional[list[dict]] = None
        # parallel_targets > 1 (untrac_pl.parallel): the targets of one fit and their stacked [K, ...] tensors
        self.parallel_targets: Optional[list[Target]] = None
        self.stacked: Optional[dict[str, torch.Tensor]] = None

    # -- what the run shell connects (explicit late binding, not attributes read back elsewhere) ---
    def connect(self, base_losses: Optional[torch.Tensor] = None, keep_on_device: bool = False) -> None:
        """The θ0 losses of the evaluation set (``None``: return losses, not scores) and whether the
        module stays on its device between targets."""
        self.base_losses = base_losses
        self.keep_on_device = keep_on_device

    def set_target(self, target: Optional[Target]) -> None:
        """The target the next ``fit`` unlearns and the next ``predict`` scores (``None``: θ0)."""
        self.target = target

    def set_pass(self, targets: Optional[list[Target]], parameter_sets: Optional[list[dict]]) -> None:
        """Several unlearned targets scored in one ``predict``, each with its own tensors (``None``: off)."""
        self.pass_targets, self.pass_parameters = targets, parameter_sets

    def set_parallel(self, targets: Optional[list[Target]], stacked: Optional[dict[str, torch.Tensor]]) -> None:
        """K targets unlearned by the next ``fit`` at once, on their own stacked tensors (``None``: off).
        The net's parameters stay at θ0; the optimizer steps ``stacked`` (:mod:`untrac_pl.parallel`)."""
        self.parallel_targets, self.stacked = targets, stacked
        if targets:
            self.target = targets[0]  # the chunk shares its plan: its step count sets the lr schedule

    def parallel_failures(self) -> dict[str, tuple[int, float]]:
        """``{target id: (first non-finite step, its loss)}`` of the last parallel fit."""
        if not self.parallel_targets or self._first_bad is None:
            return {}
        steps, values = self._first_bad.tolist(), self._bad_value.tolist()
        return {t.id: (s, v) for t, s, v in zip(self.parallel_targets, steps, values) if s >= 0}

    def scored_targets(self) -> list[Target]:
        """The targets whose scores the current ``predict`` pass produces (empty at θ0)."""
        if self.pass_targets:
            return list(self.pass_targets)
        return [] if self.target is None else [self.target]

    # -- model -----------------------------------------------------------------------------------
    def cpu(self):
        """Stay on the accelerator while the engine holds ``keep_on_device``.

        Lightning's strategy teardown moves the module to the CPU after every ``fit`` and
        ``predict``; the engine runs one of each per target, which would copy the whole model
        host↔device twice per target on a GPU.
        """
        return self if self.keep_on_device else super().cpu()

    # -- unlearning ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        # every rank computes the same gradient: take rank 0's bit for bit instead of averaging
        take_rank0_gradient(self.trainer.strategy.model)

    def configure_optimizers(self):
        params = self.stacked.values() if self.stacked is not None else self.net.parameters()
        optimizer = build_optimizer(self.optimizer_spec, params)
        schedule = self.schedule
        if schedule.lr_schedule == "constant":
            return optimizer
        if self.target is None:
            raise RuntimeError("unlearning.lr_schedule needs the target (its planned step count) before fit")
        total = num_optimizer_steps(plan_micro_batches(len(self.target.indices), schedule, self.target.seed))
        return {"optimizer": optimizer, "lr_scheduler": build_lr_scheduler(schedule.lr_schedule, schedule.warmup_steps, optimizer, total)}

    def on_before_optimizer_step(self, optimizer) -> None:
        # called by Lightning inside opt.step(), after the 16-mixed GradScaler has unscaled the
        # gradients, so the clipping threshold applies to the true gradient (as in the HF Trainer)
        if self.schedule.max_grad_norm and self.stacked is not None:
            clip_per_target(self.stacked, float(self.schedule.max_grad_norm))
        elif self.schedule.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=float(self.schedule.max_grad_norm), gradient_clip_algorithm="norm")

    def _ascent_loss(self, batch: dict) -> torch.Tensor:
        """This micro-batch's share of its step's loss (the gradient accumulates over micro-batches);
        ``[K]``, one per target, when K targets step in parallel."""
        if self.stacked is not None:
            return parallel_step_losses(self.net, self.stacked, batch, self.schedule.loss_reduction)
        if self.schedule.loss_reduction == "token_mean":
            # the HF Trainer: the micro-batch's token-mean loss, divided by the accumulation steps
            return model_token_mean_loss(self.net, batch) / batch["micro_batches"]
        losses = self(batch)
        return losses.sum() / batch["denominator"]

    # steps between two host reads of the device-side non-finite guard on an accelerator (on the CPU
    # the read costs nothing and happens every step); the first bad step is named exactly either way
    FINITE_CHECK_EVERY = 32

    def on_train_start(self) -> None:
        self.ascent_curve = []
        self._first_bad = self._bad_value = None
        self.amp_skipped_steps = 0  # over the whole target (every epoch)
        self._amp_skipped = None

    def on_train_epoch_start(self) -> None:
        self._step_losses = []
        self.stopped_at_max_loss = False

    def on_train_epoch_end(self) -> None:
        self._raise_if_non_finite()  # the end of a target (or of one of its epochs): whatever the cadence

    def _watch_finite(self, loss: torch.Tensor, step: int) -> None:
        """Remember, on the loss's device, the first step whose loss is not finite, and its value."""
        loss = loss.detach().float()
        if self._first_bad is None:
            self._first_bad = torch.full(loss.shape, -1, dtype=torch.long, device=loss.device)  # [K] in parallel
            self._bad_value = torch.zeros(loss.shape, device=loss.device)
        new = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(new, torch.full_like(self._first_bad, step), self._first_bad)
        self._bad_value = torch.where(new, loss, self._bad_value)
        if (step + 1) % self.finite_check_every(loss.device) == 0:
            self._raise_if_non_finite()

    def finite_check_every(self, device: torch.device) -> int:
        """Steps between two host reads of the guard: every step on the CPU (a read costs nothing
        there), ``FINITE_CHECK_EVERY`` on an accelerator; the target's end always reads it."""
        return 1 if device.type == "cpu" else self.FINITE_CHECK_EVERY

    def _raise_if_non_finite(self) -> None:
        if self.stacked is not None:  # parallel: a failed target must not stop the others (parallel_failures)
            return
        if self._first_bad is not None and int(self._first_bad) >= 0:  # the one host read
            raise NonFiniteLossError(self.target.id if self.target else "?", int(self._first_bad), float(self._bad_value))

    def on_train_end(self) -> None:
        if self._amp_skipped is not None:  # counted on the device, read once per target
            self.amp_skipped_steps, self._amp_skipped = int(self._amp_skipped), None
        skipped = self.amp_skipped_steps
        if skipped:
            log.warning(
                "target %s: %d optimizer step(s) skipped by the 16-mixed GradScaler (fp16 overflow); "
                "bf16-mixed has no loss scaling and skips none", self.target.id if self.target else "?", skipped)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self._ascent_loss(batch)
        step = self.trainer.global_step
        self._watch_finite(loss, step)  # no host sync per step on an accelerator
        self.manual_backward(-loss.sum())  # gradient ASCENT: the one and only negation (a sum over parallel targets)
        self._step_losses.append(loss.detach())
        if batch["step_end"]:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed loss scaling
            scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
            scale = scale.clone() if scale is not None else None  # the scale tensor, on the device: no host read
            opt.step()  # with a scaler: unscale, skip on inf/nan gradients, update the scale (it shrinks on a skip)
            skipped = None if scale is None else scaler._scale < scale
            if skipped is not None:
                self._amp_skipped = skipped.long() if self._amp_skipped is None else self._amp_skipped + skipped.long()
            scheduler = self.lr_schedulers()
            # as the HF Trainer: no lr step for a skipped update (the one case that reads the device per step)
            if scheduler is not None and (skipped is None or not bool(skipped)):
                scheduler.step()
            opt.zero_grad(set_to_none=True)
            step_loss = torch.stack(self._step_losses).sum(0).detach()
            self._step_losses = []
            self.ascent_curve.append(step_loss)
            if self.schedule.max_loss is not None and float(step_loss) > self.schedule.max_loss:
                self.stopped_at_max_loss = True
                self.trainer.should_stop = True
        return loss.detach()

    # -- scoring ---------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if self.pass_parameters:  # k targets on one collated batch: scores [k, B]
            losses = losses_with_parameter_sets(self.net, self.pass_parameters, batch, self.schedule.loss_reduction).detach().float()
        else:
            losses = model_losses(self.net, batch, self.schedule.loss_reduction).detach().float()
        out = {"index": batch["index"], "losses": losses}
        if self.base_losses is not None:
            out["scores"] = losses - self.base_losses.to(losses.device)[batch["index"]]
        return out
