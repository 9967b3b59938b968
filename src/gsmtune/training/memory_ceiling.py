"""Keep a CPU training process under a share of the machine's memory (allocator.trim_above after each step)."""

from __future__ import annotations

from transformers import TrainerCallback

from gsmtune.allocator import trim_above


class MemoryCeiling(TrainerCallback):
    """After an optimizer step or a validation batch, trim the heap if the process holds more than allocator.CEILING
    of RAM: freed memory is kept for speed (allocator.py) and fragments over hours (a full-SFT trial's validation-loss
    pass held 20.7 GiB of 24); the count of trims goes into train_metrics.json."""

    def __init__(self) -> None:
        self.trims = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.trims += trim_above()

    def on_prediction_step(self, args, state, control, **kwargs):
        self.trims += trim_above()
