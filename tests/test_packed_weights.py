import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import sliding_model

from gsmtune import packed_weights
from gsmtune.batch_invariance import batch_invariant
from gsmtune.config import load_config
from gsmtune.generation import StopRules, stream
from gsmtune.packed_weights import pack, packable, packed_linear, packed_linears

native = pytest.mark.skipif(not packable(torch.zeros(1, dtype=torch.bfloat16)),
                            reason="oneDNN does not run bf16 natively on this CPU: F.linear stays")


@native
@pytest.mark.parametrize("rows", [1, 5, 32, 33, 200])
def test_packed_product_is_f_linear_bit_for_bit(rows):
    torch.manual_seed(0)
    w, b = torch.randn(96, 72).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(rows, 3, 72).bfloat16()
    packed = pack(w)
    assert torch.equal(packed_linear(x, packed, b), F.linear(x, w, b))
    assert torch.equal(packed_linear(x[:, -1:], packed), F.linear(x[:, -1:], w))  # a strided slice, no bias


def test_only_native_bf16_cpu_weights_are_packed(monkeypatch):
    assert not packable(torch.zeros(2, 2))  # float32: MKL's sums, which lm-eval's float32 tokens are checked against
    assert not packable(torch.zeros(2, 2, dtype=torch.float16))
    monkeypatch.setenv("GSMTUNE_PACK", "off")
    assert not packable(torch.zeros(2, 2, dtype=torch.bfloat16))


@native
def test_packed_linears_give_the_same_logits_and_leave_the_model_as_it_was(tiny_tokenizer):
    model = sliding_model(tiny_tokenizer, seed=3).to(torch.bfloat16)
    ids = torch.randint(3, 100, (4, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with packed_linears(model) as n:
            assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) > 0
            inside = model(input_ids=ids).logits
    assert torch.equal(inside, before)
    assert not any("forward" in m.__dict__ for m in model.modules())


@native
@pytest.mark.parametrize("invariant", [False, True])
def test_decoding_multiplies_by_packed_weights_to_the_same_tokens(tiny_tokenizer, monkeypatch, invariant):
    """stream() packs every bf16 linear layer, the batch-invariant mode's tiles included, and decodes the same tokens
    as with F.linear."""
    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1).to(torch.bfloat16)
    prompts = [tok(f"Question: Tom has {n} apples and eats {n - 1}.\nAnswer:")["input_ids"] for n in (3, 14, 250)]
    gen = load_config(None, ["generation.max_new_tokens=14", f"generation.batch_invariant={invariant}"]).generation

    def decode():
        return dict(stream(model, tok, prompts, gen, StopRules(False, False), batch_size=2))

    calls = []
    real = packed_weights.packed_linear
    monkeypatch.setattr(packed_weights, "packed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed_tokens = decode()
    assert len(calls) > 0
    with packed_linears(model), batch_invariant(model) if invariant else contextlib.nullcontext():
        forward = model.get_output_embeddings().forward
        assert (forward.keywords["product"] if invariant else forward).func is packed_weights.packed_linear
    monkeypatch.setattr(packed_weights, "packable", lambda weight: False)
    before = len(calls)
    assert decode() == packed_tokens and len(calls) == before


@native
def test_no_packs_where_memory_is_short(tiny_tokenizer, monkeypatch):
    model = sliding_model(tiny_tokenizer, seed=3).to(torch.bfloat16)
    weights = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(packed_weights, "available_bytes", lambda: 2 * weights - 2)
    with pytest.warns(UserWarning, match="without packed bf16 weights"), packed_linears(model) as n:
        assert n == 0 and not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(packed_weights, "available_bytes", lambda: 2 * weights)
    with packed_linears(model) as n:
        assert n > 0
