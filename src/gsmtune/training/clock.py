"""Training time and speed across resumed pieces: the trainer's own `train_runtime` counts only the last piece."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class TrainClock(TrainerCallback, ExportableState):
    """Seconds trained up to each checkpoint, saved in its trainer_state.json and restored on resume, so the seconds
    of all pieces add up (work after the last checkpoint of a killed piece is redone, and counted once)."""

    def __init__(self, seconds: float | None = 0.0):
        self.seconds = seconds  # None: an earlier piece ran without a clock, so the total is unknown
        self.start, self.start_tokens = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen
        if state.global_step:  # resumed: read the checkpoint's clock itself, as the trainer restores callbacks only
            # when restore_callback_states_from_checkpoint is set (off by default); a clockless checkpoint has none
            self.seconds = state.stateful_callbacks.get("TrainClock", {}).get("args", {}).get("seconds")
        state.stateful_callbacks.setdefault("TrainClock", self.state())  # the trainer's save looks the name up

    def piece_seconds(self) -> float:
        return time.perf_counter() - self.start

    def total_seconds(self) -> float | None:
        return None if self.seconds is None else self.seconds + self.piece_seconds()

    def piece_tokens_per_second(self, tokens_seen: int) -> float | None:
        """Tokens trained in this process over its own time: the speed, whichever piece it is."""
        seconds = self.piece_seconds()
        return (tokens_seen - self.start_tokens) / seconds if seconds > 0 else None

    def state(self) -> dict:
        return {"args": {"seconds": self.total_seconds()}, "attributes": {}}
