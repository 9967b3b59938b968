"""The early duration forecast: steady-state tokens/s (first step excluded) times the tokens left."""

from types import SimpleNamespace

import pytest

from gsmtune.training import forecast


def run(steps, max_steps, total_tokens, epochs=1.0, arg_max_steps=-1, tokens_per_step=100, seconds=(30, 10, 10, 10)):
    said, clock = [], iter([sum(seconds[: i + 1]) for i in range(len(seconds))])
    cb = forecast.DurationForecast(total_tokens, said.append)
    args = SimpleNamespace(num_train_epochs=epochs, max_steps=arg_max_steps)
    state = SimpleNamespace(global_step=0, max_steps=max_steps, num_input_tokens_seen=0, is_world_process_zero=True)
    cb.on_train_begin(args, state, None)
    real = forecast.time.perf_counter
    forecast.time.perf_counter = lambda: next(clock)
    try:
        for step in range(1, steps + 1):
            state.global_step, state.num_input_tokens_seen = step, step * tokens_per_step
            cb.on_step_end(args, state, None)
    finally:
        forecast.time.perf_counter = real
    return said


def test_forecast_from_steady_steps_and_tokens_left():
    said = run(steps=4, max_steps=100, total_tokens=10_000)  # 10 tokens/s after the slow first step
    assert len(said) == 1
    assert said[0].startswith("expected: about 16 min more (0.01M tokens to train at 10 tokens/s measured over steps 2-3")


def test_forecast_bounded_by_max_steps():
    said = run(steps=4, max_steps=400, total_tokens=10**9, arg_max_steps=400, tokens_per_step=1000)
    assert said[0].startswith("expected: about 1 h 06 min more (0.40M tokens")  # 397 steps x 1,000 tokens at 100/s


def test_no_forecast_without_tokens():
    assert run(steps=4, max_steps=100, total_tokens=10_000, tokens_per_step=0) == []


@pytest.mark.parametrize(("seconds", "text"), [(30, "1 min"), (3 * 3600 + 20 * 60, "3 h 20 min")])
def test_duration(seconds, text):
    assert forecast.duration(seconds) == text


def test_forecast_again_a_tenth_of_the_way_in():
    said = run(steps=30, max_steps=100, total_tokens=10_000, seconds=(30,) + (10,) * 29)
    assert len(said) == 2
    assert "measured over steps 2-3," in said[0] and "measured over steps 2-11," in said[1]  # step 1 + 100 // 10
