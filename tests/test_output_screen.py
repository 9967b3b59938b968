import pytest
import torch
from conftest import sliding_model
from omegaconf import OmegaConf
from torch import nn

from gsmtune import output_screen
from gsmtune.generation import StopRules, draw, generate, stream
from gsmtune.output_screen import Screen, rowwise, screened_output_layer


@pytest.fixture(autouse=True)
def screen_on(monkeypatch):
    """The screen is off by default on CPUs that emulate bf16; these tests check what it does where it runs."""
    monkeypatch.setenv("GSMTUNE_SCREEN", "on")


def test_screen_is_on_by_default_only_where_bf16_is_native(tiny_tokenizer, monkeypatch):
    model = sliding_model(tiny_tokenizer, seed=3)
    monkeypatch.delenv("GSMTUNE_SCREEN")
    for native in (True, False):
        monkeypatch.setattr(output_screen, "bf16_supported", lambda device, native=native: native)
        with screened_output_layer(model) as screen:
            assert (screen is not None) == native


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
    monkeypatch.setattr(output_screen, "CANDIDATES", 1)
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
        weight = model.get_output_embeddings().weight
        x = torch.randn(3, weight.shape[1], dtype=torch.bfloat16)
        assert second is not first and torch.equal(second.screen(x), x @ weight.bfloat16().T)


def test_two_streams_on_one_model_leave_it_as_it_was(tiny_tokenizer):
    model = sliding_model(tiny_tokenizer, seed=3)
    head = model.get_output_embeddings()
    with screened_output_layer(model), screened_output_layer(model):
        assert "forward" in head.__dict__
    assert "forward" not in head.__dict__


def test_rowwise_logits_do_not_depend_on_the_batch():
    torch.manual_seed(2)
    weight, x = torch.randn(20000, 64) / 8, torch.randn(32, 64) * 40  # more rows than one chunk
    alone = torch.cat([rowwise(x[i:i + 1], weight) for i in range(32)])
    assert torch.equal(rowwise(x, weight), alone)
    picked = torch.randint(0, 20000, (32, 50))
    assert torch.equal(rowwise(x, weight[picked]), alone.gather(1, picked))  # candidates: the same bits


@pytest.mark.parametrize("candidates", [1024, 20])
def test_top_k_screen_gives_the_rowwise_top_k_exactly(monkeypatch, candidates):
    """Sampling sees the k best logits (values, not only the winner): they must be the row-wise float32 ones, and every
    other token must fall below the k-th, whether the bounds proved it or the row was recomputed."""
    monkeypatch.setattr(output_screen, "SAMPLE_CANDIDATES", candidates)
    torch.manual_seed(3)
    weight, x = torch.randn(5000, 64) / 8, torch.randn(200, 64) * 40
    weight = torch.cat([weight, weight[:1] + 1e-4 * torch.randn(100, 64)])  # 101 near-equal tokens
    x[:20] = weight[0] * 100 + torch.randn(20, 64)  # rows where they lead: the k-th has rivals within bf16's error
    k = 10
    screen = Screen(weight)
    screened = screen.logits(x, top_k=k)
    full = rowwise(x, weight)
    top = full.topk(k, dim=-1)
    assert torch.equal(screened.gather(1, top.indices), top.values)
    assert (screened.topk(k + 1, dim=-1).values[:, -1] < top.values[:, -1]).all()
    if candidates == 20:  # too few to hold 101 near-equal rivals (or, often, an ordinary row's k-th's rivals)
        assert screen.recomputed >= 20 and screen.proven > 50
    else:
        assert screen.proven >= 180  # the screen does the work on ordinary rows


@pytest.mark.parametrize("candidates", [1024, 20])
def test_sampled_completions_do_not_depend_on_the_batch(tiny_tokenizer, monkeypatch, candidates):
    """Each row samples from its own stream (seed, key) on row-wise float32 logits: batch 1 and batch 6 agree, with
    every token a candidate (1024 > this vocabulary) and with 20, where the bounds decide row by row."""
    monkeypatch.setattr(output_screen, "SAMPLE_CANDIDATES", candidates)
    model = sliding_model(tiny_tokenizer, seed=4)
    prompts = [tiny_tokenizer.encode(t) for t in ("Question: 2 + 2 =", "Question: how many apples", "Answer:")] * 2
    gen = OmegaConf.create({"max_new_tokens": 16, "do_sample": True, "temperature": 1.0, "top_k": 10, "top_p": 1.0,
                            "calculator": False})
    keys = list(range(6))

    def run(batch_size, order):
        rows = dict(stream(model, tiny_tokenizer, [prompts[i] for i in order], gen, StopRules(False, False), seed=7,
                           batch_size=batch_size, sample_keys=[keys[i] for i in order]))
        return {order[i]: c.token_ids for i, c in rows.items()}

    together = run(6, list(range(6)))
    assert together == run(1, [5, 4, 3, 2, 1, 0]) == run(4, [2, 0, 1, 5, 3, 4])
    assert together[0] != together[3]  # the same prompt, two keys: two samples
    screen = model.get_output_embeddings()._gsmtune_screen
    assert screen.proven + screen.recomputed >= 3 * 6 * 15  # every decode step of the three runs went through it
    if candidates == 20:
        assert screen.proven > 0 and screen.recomputed > 0


def test_draw_takes_the_row_uniform_through_the_cdf_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 4)
    assert draw(probs, torch.tensor([0.25, 0.75, 1.0, 1e-12], dtype=torch.float64)).tolist() == [1, 3, 3, 1]


def test_top_k_sampling_on_the_k_best_gives_the_warpers_distribution():
    """Sampling from each row's k best logits is the full-vocabulary warpers' distribution: same token per uniform
    as drawing from HF's warped probabilities in descending order."""
    from gsmtune.generation import _sampler, sample

    torch.manual_seed(5)
    logits = torch.randn(4, 1000) * 3
    gen = OmegaConf.create({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9})
    warpers = _sampler(gen)
    full = torch.softmax(warpers(None, logits.clone()), dim=-1)
    ordered, order = full.sort(dim=-1, descending=True)
    for u in (0.05, 0.3, 0.6, 0.95, 1.0):
        uniforms = torch.full((4,), u, dtype=torch.float64)
        expected = order.gather(1, draw(ordered, uniforms)[:, None]).squeeze(1)
        assert torch.equal(sample(logits, warpers, 20, uniforms), expected)
    assert (full > 0).sum(-1).lt(20).any()  # top-p cut some rows below k: both warpers are covered
