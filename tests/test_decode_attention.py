import pytest
import torch
from conftest import sliding_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from gsmtune import decode_attention as da
from gsmtune.decode_attention import decode_attention, decode_sdpa
from gsmtune.generation import _prefill


def reference(query, key, value, mask, scale):
    """Masked grouped-query attention in float64, each query head on its key/value head (repeat_kv's order)."""
    heads = query.shape[1] // key.shape[1]
    k, v = (t.double().repeat_interleave(heads, dim=1) for t in (key, value))
    scores = (query.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("queries", [1, 3])
def test_bf16_decode_attention_is_as_close_to_exact_as_sdpa(queries):
    """Padded rows, grouped heads, one or several query positions: within the bf16 output's own rounding, like SDPA."""
    torch.manual_seed(0)
    b, heads, groups, keys, d = 3, 4, 2, 40, 16
    query = torch.randn(b, heads, queries, d).bfloat16()
    key, value = torch.randn(b, groups, keys, d).bfloat16() * 3, torch.randn(b, groups, keys, d).bfloat16()
    mask = torch.ones(b, 1, queries, keys, dtype=torch.bool)
    mask[0, :, :, :7] = False  # left padding
    mask[1, :, 0, -1] = False  # a query that may not see a later position (causal, with several queries)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // groups, True
    got, none = decode_sdpa(module, query, key, value, mask, scaling=0.25)
    sdpa, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    exact = reference(query, key, value, mask, 0.25)
    assert none is None and got.shape == sdpa.shape == exact.shape and got.dtype == torch.bfloat16
    assert (got.double() - exact).abs().max() <= (sdpa.double() - exact).abs().max() * 1.01 + 1e-6
    assert (got.double() - exact).abs().max() <= 2**-8 * exact.abs().max()


def test_float32_and_prefill_calls_are_sdpa_unchanged():
    torch.manual_seed(1)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    for dtype, queries, keys in ((torch.float32, 1, 20), (torch.bfloat16, 20, 20)):
        query, key, value = torch.randn(2, 2, queries, 8, dtype=dtype), *torch.randn(2, 2, 1, keys, 8, dtype=dtype)
        mask = torch.ones(2, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
        got, _ = decode_sdpa(module, query, key, value, mask)
        want, _ = sdpa_attention_forward(module, query, key, value, mask)
        assert torch.equal(got, want)


def test_a_bf16_model_decodes_through_it_and_gets_its_sdpa_back(tiny_tokenizer, monkeypatch):
    """Inside the block every cached step of a padded batch (sliding and full layers) goes through the matrix
    products, with logits as close to SDPA's as bf16 allows; after it, the model runs SDPA again."""
    model = sliding_model(tiny_tokenizer, seed=3).to(torch.bfloat16)
    calls, matmul = [], da._matmul_attention
    monkeypatch.setattr(da, "_matmul_attention", lambda *a: calls.append(a[0].shape) or matmul(*a))
    prompts = [[tiny_tokenizer.bos_token_id, 5, 6, 7, 8], [tiny_tokenizer.bos_token_id, 9]]

    def steps() -> torch.Tensor:
        with torch.inference_mode():
            logits, cache, mask = _prefill(model, prompts, tiny_tokenizer.pad_token_id, "cpu")
            out = []
            for token in (11, 12, 13, 14, 15, 16, 17, 18):  # past the 6-position window
                mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
                out.append(model(input_ids=torch.full((2, 1), token), attention_mask=mask, cache=cache,
                                 position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True).logits[:, -1])
        return torch.stack(out).float()

    want = steps()
    with decode_attention(model) as active:
        got = steps()
    assert active and model.config._attn_implementation == "sdpa"
    assert len(calls) == 8 * 2  # 8 steps x 2 layers; the prefill went to SDPA
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    assert steps().equal(want)
