"""What every LightningModule wrapping a Hugging Face causal LM here shares."""
from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl
import torch

from untrac_pl.losses import model_per_example_loss
from untrac_pl.models import load_model_and_tokenizer


class CausalLMHolder(pl.LightningModule):
    """Holds ``net`` + ``tokenizer`` (built from ``self.model_spec`` or attached) and computes
    per-example losses. Subclasses set ``model_spec``, ``net = None`` and ``tokenizer = None``."""

    def load_model(self, texts: Optional[Sequence[str]] = None) -> None:
        """Load (or build) the model and tokenizer from the spec; ``texts`` train a tokenizer if asked."""
        if self.net is None:
            self.net, self.tokenizer = load_model_and_tokenizer(self.model_spec, texts)

    def attach(self, net: torch.nn.Module, tokenizer) -> None:
        """Use an already-loaded model and tokenizer (Python API)."""
        self.net, self.tokenizer = net, tokenizer

    def forward(self, batch: dict) -> torch.Tensor:
        return model_per_example_loss(self.net, batch)

    def on_fit_start(self) -> None:
        # Lightning >= 2.2 keeps the modules' train/eval flags in fit, and from_pretrained returns an
        # eval-mode model: switch to train mode (dropout on) for every fit, as the paper does.
        self.net.train()
