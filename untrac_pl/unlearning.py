"""UnTracModule: gradient-ascent unlearning in manual optimisation, loss scoring in predict_step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from untrac_pl.data.schedule import UnlearningSchedule
from untrac_pl.errors import NonFiniteLossError
from untrac_pl.lm_base import CausalLMHolder
from untrac_pl.models import ModelSpec
from untrac_pl.optim import OptimizerSpec, build_optimizer


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
    ``predict_step`` returns per-example losses and, once ``base_losses`` (θ0) are set, scores
    ``loss(θ_T) - loss(θ0)``.
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(),
        unlearning: UnlearningSchedule = UnlearningSchedule(),
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_spec = model
        self.optimizer_spec = optimizer
        self.schedule = unlearning
        self.automatic_optimization = False
        self.net: Optional[torch.nn.Module] = None
        self.tokenizer = None
        self.base_losses: Optional[torch.Tensor] = None
        self.target: Optional[Target] = None
        self._step_losses: list[torch.Tensor] = []
        self.stopped_at_max_loss = False
        # targets_per_pass > 1 (untrac_pl.multiquery): targets scored together, one parameter set each
        self.pass_targets: Optional[list[Target]] = None
        self.pass_parameters: Optional[list[dict]] = None

    # -- model -----------------------------------------------------------------------------------
    keep_on_device = False

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
        from untrac_pl.distributed import take_rank0_gradient

        # every rank computes the same gradient: take rank 0's bit for bit instead of averaging
        take_rank0_gradient(self.trainer.strategy.model)

    def configure_optimizers(self):
        return build_optimizer(self.optimizer_spec, self.net.parameters())

    def on_train_epoch_start(self) -> None:
        self._step_losses = []
        self.stopped_at_max_loss = False
        self.amp_skipped_steps = 0

    def on_train_end(self) -> None:
        skipped = getattr(self, "amp_skipped_steps", 0)
        if skipped:
            import logging

            logging.getLogger(__name__).warning(
                "target %s: %d optimizer step(s) skipped by the 16-mixed GradScaler (fp16 overflow); "
                "bf16-mixed has no loss scaling and skips none", self.target.id if self.target else "?", skipped)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        losses = self(batch)
        loss = losses.sum() / batch["denominator"]
        step = self.trainer.global_step
        target_id = self.target.id if self.target else "?"
        if not torch.isfinite(loss):
            raise NonFiniteLossError(target_id, step, float(loss.detach()))
        self.manual_backward(-loss)  # gradient ASCENT: the one and only negation
        self._step_losses.append(loss.detach())
        if bool(batch["step_end"]):
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed loss scaling
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
            opt.step()  # with a scaler: unscale, skip on inf/nan gradients, update the scale
            if scale is not None and scaler.get_scale() < scale:
                self.amp_skipped_steps = getattr(self, "amp_skipped_steps", 0) + 1
            opt.zero_grad(set_to_none=True)
            step_loss = float(torch.stack(self._step_losses).sum())
            self._step_losses = []
            if self.logger is not None:
                self.logger.log_metrics({f"ascent_loss/{target_id}": step_loss}, step=step)
            if self.schedule.max_loss is not None and step_loss > self.schedule.max_loss:
                self.stopped_at_max_loss = True
                self.trainer.should_stop = True
        return loss.detach()

    # -- scoring ---------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if self.pass_parameters:  # k targets on one collated batch: scores [k, B]
            from untrac_pl.multiquery import losses_with_parameter_sets

            losses = losses_with_parameter_sets(self.net, self.pass_parameters, batch).detach().float()
        else:
            losses = self(batch).detach().float()
        out = {"index": batch["index"], "losses": losses}
        if self.base_losses is not None:
            out["scores"] = losses - self.base_losses.to(losses.device)[batch["index"]]
        return out
