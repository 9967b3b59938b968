"""Training time across resumed pieces: restored from the checkpoint's state, unknown after a clockless one."""

from types import SimpleNamespace

from gsmtune.training.clock import TrainClock


def begin(clock: TrainClock, step: int, tokens: int, stored: dict) -> SimpleNamespace:
    state = SimpleNamespace(global_step=step, num_input_tokens_seen=tokens, stateful_callbacks=stored)
    clock.on_train_begin(None, state, None)
    return state


def test_fresh_run_counts_from_zero_and_registers_its_state():
    clock = TrainClock()
    state = begin(clock, 0, 0, {})
    assert 0 <= clock.total_seconds() < 5 and "TrainClock" in state.stateful_callbacks


def test_resumed_run_adds_the_seconds_saved_in_the_checkpoint():
    clock = TrainClock()  # the trainer hands a resumed run a fresh callback (it restores callback states only on request)
    begin(clock, 40, 50_000, {"TrainClock": {"args": {"seconds": 3600.0}}})
    assert 3600 <= clock.total_seconds() < 3605
    assert clock.piece_tokens_per_second(50_000) == 0  # only this piece's tokens count toward its speed


def test_a_restored_callback_is_not_counted_twice():
    clock = TrainClock(**TrainClock(seconds=3600.0).state()["args"])  # restore_callback_states_from_checkpoint=True
    begin(clock, 40, 50_000, {"TrainClock": {"args": {"seconds": 3600.0}}})
    assert 3600 <= clock.total_seconds() < 3605


def test_resume_from_a_checkpoint_without_a_clock_leaves_the_total_unknown():
    clock = TrainClock()
    begin(clock, 40, 50_000, {"TrainerControl": {}})
    assert clock.total_seconds() is None and clock.state() == {"args": {"seconds": None}, "attributes": {}}
