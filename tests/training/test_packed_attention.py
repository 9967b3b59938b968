"""Packed rows attend one row at a time: the same logits as each row alone, sliding windows included."""

import pytest
import torch
from conftest import overrides, sliding_model

from gsmtune.cli import main
from gsmtune.training import packed_attention
from gsmtune.training.packed_attention import NAME, use_packed_attention


@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens_q"])
def test_packed_rows_match_rows_alone(tiny_tokenizer, monkeypatch, boundaries):
    model = sliding_model(tiny_tokenizer, seed=3).float()  # window 6 on layer 0: rows of 9 and 12 outgrow it
    torch.manual_seed(0)
    rows = [torch.randint(3, len(tiny_tokenizer), (n,)) for n in (9, 4, 12, 2)]
    with torch.no_grad():
        alone = torch.cat([model(r[None]).logits[0] for r in rows])
        assert use_packed_attention(model) and model.config._attn_implementation == NAME
        calls = []
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, _sdpa=torch.nn.functional.scaled_dot_product_attention, **k: calls.append(
                                a[0].shape[2]) or _sdpa(*a, **k))
        positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
        extra = {}
        if boundaries == "cu_seq_lens_q":
            extra = {"cu_seq_lens_q": torch.tensor([0, 9, 13, 25, 27], dtype=torch.int32)}
        packed = model(torch.cat(rows)[None], position_ids=positions, **extra).logits[0]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert calls == [9, 4, 12, 2] * 2  # one call per row and layer, none over the whole micro-batch


def test_packed_rows_train_as_rows_alone(tiny_tokenizer):
    """The training path: gradients through the packed rows equal the sum of each row's own."""
    model = sliding_model(tiny_tokenizer, seed=4).float().train()
    torch.manual_seed(1)
    rows = [torch.randint(3, len(tiny_tokenizer), (n,)) for n in (9, 3, 12)]
    loss = sum(model(r[None]).logits.logsumexp(-1).sum() for r in rows)
    loss.backward()
    alone = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    use_packed_attention(model)
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    model(torch.cat(rows)[None], position_ids=positions).logits.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, alone[name], rtol=1e-4, atol=1e-5, msg=name)


def test_anything_but_a_packed_row_is_plain_sdpa(tiny_tokenizer, monkeypatch):
    model = sliding_model(tiny_tokenizer, seed=3).float()
    ids = torch.randint(3, len(tiny_tokenizer), (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded batch: transformers' own mask and SDPA call
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        use_packed_attention(model)
        monkeypatch.setattr(packed_attention, "_window_mask", None)  # the per-row path would call it: it must not run
        after = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["softcap", "position_bias", "is_causal", "module_not_causal"])
def test_attention_other_than_plain_causal_is_left_to_transformers(monkeypatch, case):
    """A packed row of soft-capped, biased or bidirectional attention must not be computed as plain causal."""
    from transformers.integrations import sdpa_attention

    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("theirs", None))
    module = torch.nn.Module()
    module.is_causal = case != "module_not_causal"
    kwargs = {"softcap": {"softcap": 50.0}, "position_bias": {"position_bias": torch.zeros(1)},
              "is_causal": {"is_causal": False}}.get(case, {})
    q = torch.randn(1, 2, 6, 4)
    bounds = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert packed_attention.packed_sdpa(module, q, q, q, None, cu_seq_lens_q=bounds, **kwargs)[0] == "theirs"
    assert len(calls) == 1
    module.is_causal = True  # the same call as plain causal attention is computed row by row
    assert packed_attention.packed_sdpa(module, q, q, q, None, cu_seq_lens_q=bounds)[0].shape == (1, 6, 2, 4)
    assert len(calls) == 1


def test_other_attention_is_left_alone(tiny_tokenizer):
    model = sliding_model(tiny_tokenizer, seed=3)
    model.set_attn_implementation("eager")
    assert not use_packed_attention(model) and model.config._attn_implementation == "eager"


def test_trained_full_model_loads_with_the_default_attention(tiny_model_dir, train_dir, tmp_path):
    """Padding-free training switches the attention; the saved model must not ask for it (a fresh process lacks it)."""
    out = tmp_path / "full"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, "training.method=full",
                                             "training.padding_free=true", "training.max_steps=1")]) == 0
    assert NAME not in (out / "model" / "config.json").read_text()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config._attn_implementation == "sdpa"
