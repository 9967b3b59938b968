import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import oracle_drafts, sliding_model

from gsmtune.batch_invariance import CHUNK, TILE, batch_invariant, rowwise_attention, tiled
from gsmtune.errors import GsmtuneError
from gsmtune.generation import StopRules, _prefill, generate, stream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_linear_rows_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(0)
    w, b = torch.randn(48, 40).to(dtype), torch.randn(48).to(dtype)
    linear = functools.partial(F.linear, weight=w, bias=b)
    x = torch.randn(TILE + 9, 40).to(dtype)  # crosses a tile boundary
    alone = torch.cat([tiled(x[i: i + 1], linear) for i in range(x.shape[0])])
    for rows in (2, 5, TILE, TILE + 9):
        assert torch.equal(tiled(x[:rows], linear), alone[:rows])
    assert torch.equal(tiled(x.flip(0), linear), alone.flip(0))  # nor on a row's place in its tile
    torch.testing.assert_close(tiled(x.reshape(1, -1, 40), linear)[0], F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_len", "own", "kv_heads"), [(60, 15, 1), (CHUNK + 60, CHUNK - 3, 2),
                                                      (3 * CHUNK + 7, 2 * CHUNK + 1, 1), (2 * CHUNK, CHUNK + 5, 1)])
def test_decode_attention_ignores_other_rows_padding(dtype, kv_len, own, kv_heads):
    """A decode step's row padded on the left for a longer neighbour attends exactly as it does alone, across chunk
    boundaries (the oldest chunk reaching before the cache, or not), with a sliding window's masked keys, with one or
    two key heads; values match SDPA's."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    q = torch.randn(3, 4, 1, 16).to(dtype)
    k, v = torch.randn(3, kv_heads, kv_len, 16).to(dtype), torch.randn(3, kv_heads, kv_len, 16).to(dtype)
    mask = torch.ones(3, 1, 1, kv_len, dtype=torch.bool)
    mask[0, ..., : kv_len - own] = False  # row 0 has `own` positions, row 1 all of them
    mask[2, ..., : kv_len - 40] = False  # row 2: a window over its last 40
    together, _ = rowwise_attention(module, q, k, v, mask)
    alone, _ = rowwise_attention(module, q[:1], k[:1, :, -own:], v[:1, :, -own:], None)
    assert torch.equal(together[:1], alone)
    window = mask[2:].clone()
    window[..., : kv_len - 40] = False
    alone_in_window, _ = rowwise_attention(module, q[2:], k[2:], v[2:], window)
    assert torch.equal(together[2:], alone_in_window)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(together, reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_the_mode_refuses_a_model_off_the_cpu():
    with pytest.raises(GsmtuneError, match="CPU only"), batch_invariant(torch.nn.Linear(2, 2, device="meta")):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_positions_attend_as_single_steps_would(dtype):
    """Bitwise: 3 new positions in one call (checked drafts) against one call per position, each over the keys up to
    it (a float32 SDPA over the 3 together fails this)."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    q = torch.randn(2, 4, 3, 64).to(dtype)
    k, v = torch.randn(2, 1, CHUNK + 50, 64).to(dtype), torch.randn(2, 1, CHUNK + 50, 64).to(dtype)
    mask = torch.ones(2, 1, 3, CHUNK + 50, dtype=torch.bool).tril(CHUNK + 47)
    mask[0, ..., :30] = False
    together, _ = rowwise_attention(module, q, k, v, mask)
    ends = range(CHUNK + 48, CHUNK + 51)
    single = torch.cat([rowwise_attention(module, q[:, :, j: j + 1], k[:, :, :end], v[:, :, :end],
                                          mask[:, :, j: j + 1, :end])[0] for j, end in enumerate(ends)], dim=1)
    assert torch.equal(together, single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_ignores_other_rows_padding(dtype):
    """A prefill row padded on the left attends exactly as it does alone; values match SDPA's."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    q, k, v = (torch.randn(2, 2 if i == 0 else 1, 30, 16).to(dtype) for i in range(3))
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    mask = causal[None, None].repeat(2, 1, 1, 1)
    mask[0, ..., :12] = False  # row 0: 18 positions after 12 of padding
    together, _ = rowwise_attention(module, q, k, v, mask)
    alone, _ = rowwise_attention(module, q[:1, :, 12:], k[:1, :, 12:], v[:1, :, 12:], None)
    assert torch.equal(together[:1, 12:], alone)
    assert not together[0, :12].any()  # padding queries get zeros
    reference = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(together[1:], reference, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drafted_positions_get_the_bits_of_plain_steps(tiny_tokenizer, monkeypatch, dtype):
    """Drafts from an oracle (each row's true continuation, some cut short or with one wrong token) checked under the
    mode: each drafted position attends as a plain step there would, so the completions at batch 3 with drafts are
    those of each prompt alone without them (in float32, attending with the other new positions fails this)."""
    from gsmtune import generation
    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1).to(dtype)
    long = [tok.bos_token_id, *tok("Question: " + "1 2 " * 70 + "\nAnswer:", add_special_tokens=False)["input_ids"]]
    assert len(long) > CHUNK  # its steps cross a chunk boundary, and the short rows beside it get masked lead chunks
    prompts, none = [*_prompts(tok), long], StopRules(False, False)
    mode = ["generation.max_new_tokens=24", "generation.batch_invariant=true"]
    plain = load_config(None, [*mode, "generation.draft_tokens=0"]).generation
    alone = [generate(model, tok, [p], plain, none)[0] for p in prompts]
    calls = []

    monkeypatch.setattr(generation.Lookup, "draft", oracle_drafts(prompts, alone, calls))
    drafted = load_config(None, [*mode, "generation.draft_tokens=8"]).generation
    together = dict(stream(model, tok, prompts, drafted, none, batch_size=3))
    assert [together[i] for i in range(len(prompts))] == alone
    assert sum(calls) > 20
