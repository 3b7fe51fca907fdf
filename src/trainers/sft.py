"""Stage 1 (``custom.trainer_variant: sft``): teacher forcing on the canonical GT answer.

Assistant coord tokens get the coord loss (softCE + W1 + gate), every other assistant token full-vocab
CE; logits are computed only at supervised positions.
"""

from __future__ import annotations

from src.trainers.base import DetectionTrainer
from src.trainers.data import SFTCollator


class SFTTrainer(DetectionTrainer):
    @staticmethod
    def make_collator(processor, cfg, seed: int):
        return SFTCollator(processor, cfg.custom.object_ordering, seed)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        out = self.supervised_forward(model, inputs)
        self.record_losses(out, inputs["supervised_mask"].shape[0])
        return (out.loss, None) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Teacher-forced val loss (only used if someone calls the stock prediction loop).
        import torch

        with torch.no_grad():
            loss = self.supervised_forward(model, self._prepare_inputs(inputs)).loss.detach()
        return loss, None, None
