"""Say, early in a run, how long training will take: measured tokens/s times the tokens left to train."""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


class DurationForecast(TrainerCallback):
    """After `measure` steady-state steps (the first step of a run, with its warm-up, is not counted), print the
    expected remaining time from the tokens/s measured so far and the tokens left (rows x epochs, or max_steps); again
    a tenth of the way in, from all steps since: length-grouped batches put the longest rows first, and those train
    at more tokens/s (full SFT socratic's first forecast said 1 h 28 min; its 15 steps after put the rest at 2 h 12 min)."""

    def __init__(self, total_tokens: int, say: Callable[[str], None], measure: int = 2):
        self.total_tokens, self.say, self.measure = total_tokens, say, measure
        self.start: tuple[int, float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.first = state.global_step  # a resumed run starts later

    def on_step_end(self, args, state, control, **kwargs):
        step, now, seen = state.global_step, time.perf_counter(), state.num_input_tokens_seen
        if step == self.first + 1:
            self.start = (step, now, seen)
            self.report_at = {step + self.measure, step + max(2 * self.measure, (state.max_steps - self.first) // 10)}
        elif self.start and step in self.report_at and state.max_steps > step:
            s0, t0, n0 = self.start
            per_step, rate = (now - t0) / (step - s0), (seen - n0) / max(now - t0, 1e-9)
            if rate <= 0 or not state.is_world_process_zero:
                return
            # tokens left: by optimizer steps left when max_steps bounds the run, else by the rows left in the epochs
            by_steps = (state.max_steps - step) * (seen - n0) / (step - s0)
            left = min(by_steps, max(self.total_tokens * args.num_train_epochs - seen, 0)) if args.max_steps <= 0 else by_steps
            self.say(f"expected: about {duration(left / rate)} more ({left / 1e6:.2f}M tokens to train at {rate:.0f} tokens/s "
                     f"measured over steps {s0 + 1}-{step}, {per_step:.1f} s/step; {state.max_steps} steps in all)")
