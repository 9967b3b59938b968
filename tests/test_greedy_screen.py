import pytest
import torch
from conftest import sliding_model
from omegaconf import OmegaConf
from torch import nn

from gsmtune import greedy_screen
from gsmtune.generation import StopRules, generate
from gsmtune.greedy_screen import Screen, screened_output_layer


def _float32_choice(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, weight).max(-1).indices


def test_screen_picks_the_float32_argmax_and_proves_clear_winners():
    torch.manual_seed(0)
    weight = torch.randn(5000, 64) / 8
    x = torch.randn(300, 64) * 40  # logits spread over tens of units, like a trained model's
    screen = Screen(weight)
    assert torch.equal(screen.logits(x).max(-1).indices, _float32_choice(x, weight))
    assert screen.proven > 250  # the screen does the work on clear rows


def test_rows_the_bounds_cannot_prove_get_the_full_float32_product(monkeypatch):
    """Near ties below bf16's resolution: with one candidate the screen's pick is often the wrong token, so only the
    bounds stand between it and a changed completion; an exact tie must go to the first token, as argmax's does."""
    monkeypatch.setattr(greedy_screen, "CANDIDATES", 1)
    torch.manual_seed(1)
    weight, x = torch.randn(2000, 64) / 8, torch.randn(100, 64) * 40
    leader = _float32_choice(x, weight)
    rivals = weight[leader] + 1e-3 * x / x.norm(dim=-1, keepdim=True)  # ~0.3 above logits ~140: bf16 resolves 0.5
    tied = torch.cat([weight, rivals, weight[:1]])  # the last row ties token 0 exactly
    x = torch.cat([x, weight[:1] * 100])
    screen = Screen(tied)
    screened = screen.logits(x).max(-1).indices
    assert torch.equal(screened, _float32_choice(x, tied))
    assert screen.recomputed > 50
    assert screened[-1] == 0


def test_stream_screens_float32_greedy_decoding_without_changing_a_token(tiny_tokenizer, monkeypatch):
    model = sliding_model(tiny_tokenizer, seed=3)
    prompts = [tiny_tokenizer.encode(t) for t in ("Question: 2 + 2 =", "Question: how many apples", "Answer:")]
    gen = OmegaConf.create({"max_new_tokens": 24, "do_sample": False, "calculator": False})
    head = model.get_output_embeddings()
    screened = generate(model, tiny_tokenizer, prompts, gen, StopRules(False, False))
    screen = head._gsmtune_screen
    rows = screen.proven + screen.recomputed
    assert rows >= 3 * 24  # every step of every row went through it
    assert "forward" not in head.__dict__  # the model's own output layer is back
    monkeypatch.setenv("GSMTUNE_SCREEN", "off")
    assert screened == generate(model, tiny_tokenizer, prompts, gen, StopRules(False, False))
    assert screen.proven + screen.recomputed == rows  # off means off


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_screen_outside_float32(tiny_tokenizer, dtype):
    model = sliding_model(tiny_tokenizer, seed=3).to(dtype)
    with screened_output_layer(model) as screen:
        assert screen is None
        assert "forward" not in model.get_output_embeddings().__dict__


def test_a_model_that_trained_since_gets_a_new_screen(tiny_tokenizer):
    model = sliding_model(tiny_tokenizer, seed=3)
    with screened_output_layer(model) as first:
        pass
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2)
    with screened_output_layer(model) as second:
        assert second is not first and torch.equal(second.weight16, model.get_output_embeddings().weight.bfloat16())


def test_two_streams_on_one_model_leave_it_as_it_was(tiny_tokenizer):
    model = sliding_model(tiny_tokenizer, seed=3)
    head = model.get_output_embeddings()
    with screened_output_layer(model), screened_output_layer(model):
        assert "forward" in head.__dict__
    assert "forward" not in head.__dict__
