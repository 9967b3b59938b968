"""What a resumed training reads back: the newest complete checkpoint, and a mean loss over every piece."""

import pytest

from gsmtune.training.common import latest_checkpoint
from gsmtune.training.driver import curve_mean


def test_a_checkpoint_cut_off_mid_save_is_passed_over(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False), (9, True)):  # numeric order, not text order
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("")
        if complete:  # the trainer writes trainer_state.json last
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-20")
    assert latest_checkpoint(tmp_path / "none") is None


def test_mean_loss_weights_each_logged_loss_by_the_steps_it_covers():
    history = [{"step": 10, "loss": 2.0}, {"step": 10, "eval_loss": 9.0}, {"step": 20, "loss": 1.0},
               {"step": 25, "loss": 0.4}, {"train_runtime": 5.0, "step": 25}]
    assert curve_mean(history) == pytest.approx((10 * 2.0 + 10 * 1.0 + 5 * 0.4) / 25)
    assert curve_mean([{"step": 0, "train_runtime": 1.0}]) is None
