"""The model card every saved model gets: written by training, rewritten with results by `gsmtune run`."""

import json

import pytest
from conftest import overrides

from gsmtune.cli import main


@pytest.mark.parametrize(("method", "library"), [("lora", "peft"), ("full", "transformers")])
def test_card_follows_the_run(tiny_model_dir, train_dir, tmp_path, method, library):
    out = tmp_path / method
    args = overrides(tiny_model_dir, train_dir, out, f"training.method={method}", "dataset.validation_size=2")
    assert main(["train", "base", *args]) == 0
    card = (out / "model" / "README.md").read_text()
    front = card.split("---")[1]
    assert f"library_name: {library}" in front and "base_model: " in front and "datasets: [openai/gsm8k]" in front
    train = json.loads((out / "train_metrics.json").read_text())
    assert f"{train['train_examples']} training problems (all of train but a 2-problem validation split" in card
    assert "commit " + json.loads((out / "provenance.json").read_text())["train"]["git_commit"] in card
    assert f"{train['global_step']} steps" in card and "Not evaluated yet" in card

    assert main(["run", "base", *args, "--resume"]) == 0  # training is done: evaluates, and the card gets the results
    m = json.loads((out / "metrics.json").read_text())
    card = (out / "model" / "README.md").read_text()
    assert "Not evaluated yet" not in card
    assert f"{m['accuracy']:.1%} ({m['correct']}/{m['total']}; Wilson 95% CI {m['ci95'][0]:.1%}-{m['ci95'][1]:.1%})" in card
    assert "|\n\nData: " in card  # the table ends before the line under it


def test_evaluating_another_folder_leaves_the_card_alone(tiny_model_dir, train_dir, tmp_path):
    out = tmp_path / "lora"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out)]) == 0
    before = (out / "model" / "README.md").read_text()
    assert main(["eval", "base", *overrides(out / "model", train_dir, tmp_path / "elsewhere")]) == 0
    assert (out / "model" / "README.md").read_text() == before


def test_card_speed_is_over_all_pieces_with_the_last_beside_it():
    """A resumed training's card: tokens seen over seconds trained, and the last piece's own speed where it differs."""
    from gsmtune.model_card import _speed

    resumed = {"tokens_seen": 1_358_963, "train_runtime_seconds": 5134.9, "tokens_per_second": 275.3}
    assert _speed(resumed) == "265 tokens/s over all pieces (275 in the last)"
    assert _speed(resumed | {"tokens_per_second": 264.6}) == "265 tokens/s"
    assert _speed(resumed | {"tokens_per_second": None}) == "265 tokens/s"
    assert _speed(resumed | {"train_runtime_seconds": None}) == "275 tokens/s in its last piece"
