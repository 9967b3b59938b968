import pytest
import torch
import torch.nn.functional as F
from conftest import sliding_model

from gsmtune.batch_invariance import TILE, batch_invariant, rowwise_attention, tiled_linear
from gsmtune.generation import StopRules, _prefill, generate, stream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_linear_rows_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(0)
    w, b = torch.randn(48, 40).to(dtype), torch.randn(48).to(dtype)
    x = torch.randn(TILE + 9, 40).to(dtype)  # crosses a tile boundary
    alone = torch.cat([tiled_linear(x[i: i + 1], w, b) for i in range(x.shape[0])])
    for rows in (2, 5, TILE, TILE + 9):
        assert torch.equal(tiled_linear(x[:rows], w, b), alone[:rows])
    assert torch.equal(tiled_linear(x.flip(0), w, b), alone.flip(0))  # nor on a row's place in its tile
    torch.testing.assert_close(tiled_linear(x.reshape(1, -1, 40), w, b)[0], F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_attention_ignores_other_rows_padding(dtype):
    """A row padded on the left for a longer neighbour attends exactly as it does alone; values match SDPA's."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    q = torch.randn(2, 2, 1, 16).to(dtype)
    k, v = torch.randn(2, 1, 60, 16).to(dtype), torch.randn(2, 1, 60, 16).to(dtype)
    mask = torch.ones(2, 1, 1, 60, dtype=torch.bool)
    mask[0, ..., :45] = False  # row 0 has 15 positions, row 1 all 60
    together, _ = rowwise_attention(module, q, k, v, mask)
    alone, _ = rowwise_attention(module, q[:1], k[:1, :, 45:], v[:1, :, 45:], None)
    assert torch.equal(together[:1], alone)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(together, reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def _prompts(tok):
    texts = ["Question: Tom has 3 apples and 4 pears\nAnswer:", "Question: A box\nAnswer:", "Question: 7\nAnswer:",
             "Question: Sara buys 12 eggs at $2 each and sells them for twice as much\nAnswer:"]
    return [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batched_prefill_gives_each_row_its_logits_alone(tiny_tokenizer, dtype):
    """Bitwise: the rows of a left-padded batch and each prompt run alone (plain SDPA over padding fails this)."""
    model = sliding_model(tiny_tokenizer, seed=3).to(dtype)
    prompts = _prompts(tiny_tokenizer)
    with torch.inference_mode(), batch_invariant(model):
        together = _prefill(model, prompts, tiny_tokenizer.pad_token_id, "cpu")[0]
        alone = torch.cat([_prefill(model, [p], tiny_tokenizer.pad_token_id, "cpu")[0] for p in prompts])
    assert torch.equal(together, alone)
    assert model.config._attn_implementation != "gsmtune_rowwise"  # restored on leaving
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bf16_completions_are_those_of_each_prompt_alone(tiny_tokenizer):
    """Continuous batching (rows leave, prompts join, the sliding window is outgrown), in bf16, under the mode."""
    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1).to(torch.bfloat16)
    prompts = _prompts(tok)
    gen, none = load_config(None, ["generation.max_new_tokens=14"]).generation, StopRules(False, False)
    with batch_invariant(model):
        alone = [generate(model, tok, [p], gen, none)[0] for p in prompts]
        together = dict(stream(model, tok, prompts, gen, none, batch_size=2))
    assert [together[i] for i in range(len(prompts))] == alone


def test_rows_the_float32_screen_cannot_prove_get_the_tiled_product(tiny_tokenizer, monkeypatch):
    """Float32 greedy decoding screens the output layer; rows it cannot prove (here: every row, one candidate) are
    recomputed with the tiled product, so their logits stay those of each prompt alone."""
    from gsmtune import output_screen

    monkeypatch.setenv("GSMTUNE_SCREEN", "on")
    monkeypatch.setattr(output_screen, "CANDIDATES", 1)
    model = sliding_model(tiny_tokenizer, seed=3)
    prompts = _prompts(tiny_tokenizer)
    with torch.inference_mode(), batch_invariant(model), output_screen.screened_output_layer(model) as screen:
        together = _prefill(model, prompts, tiny_tokenizer.pad_token_id, "cpu")[0]
        alone = torch.cat([_prefill(model, [p], tiny_tokenizer.pad_token_id, "cpu")[0] for p in prompts])
    assert screen.recomputed == 2 * len(prompts) and screen.proven == 0
    assert torch.equal(together, alone)


def test_no_drafts_in_the_batch_invariant_mode(tiny_tokenizer):
    """A drafted position attends together with its row's other new positions, a plain one alone: drafts are off by
    default in the mode, and asking for both is a config error."""
    from gsmtune.config import load_config
    from gsmtune.errors import GsmtuneError
    from gsmtune.generation import _draft_tokens

    model = sliding_model(tiny_tokenizer, seed=1).to(torch.bfloat16)
    assert _draft_tokens(model, load_config(None, []).generation) == 8
    assert _draft_tokens(model, load_config(None, ["generation.batch_invariant=true"]).generation) == 0
    with pytest.raises(GsmtuneError, match="generation.draft_tokens=8 with generation.batch_invariant=true"):
        load_config(None, ["generation.batch_invariant=true", "generation.draft_tokens=8"])
