import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import sliding_model

from gsmtune import packed_weights
from gsmtune.batch_invariance import batch_invariant
from gsmtune.config import load_config
from gsmtune.generation import StopRules, stream
from gsmtune.packed_weights import MAX_ROWS, layer_forward, native_bf16_onednn, pack, packable, packed_linear, packed_linears

native = pytest.mark.skipif(not native_bf16_onednn(), reason="oneDNN does not run bf16 natively here: F.linear stays")


@native
@pytest.mark.parametrize("rows", [1, 5, 32, 33, 200])
@pytest.mark.parametrize(("n_in", "n_out"), [(72, 96), (640, 2048), (2048, 640)])  # Gemma 3 270M's MLP shapes too
def test_packed_product_is_f_linear_bit_for_bit(rows, n_in, n_out):
    torch.manual_seed(0)
    w, b = torch.randn(n_out, n_in).bfloat16(), torch.randn(n_out).bfloat16()
    x = torch.randn(rows, 3, n_in).bfloat16()
    packed = pack(w)
    assert torch.equal(packed_linear(x, packed, b), F.linear(x, w, b))
    # a strided slice: F.linear's own bits for it differ from its contiguous copy's (2048 -> 640), the packed product's not
    assert torch.equal(packed_linear(x[:, -1:], packed), F.linear(x[:, -1:].contiguous(), w))


@native
@pytest.mark.parametrize("rows", [1, 32, MAX_ROWS, MAX_ROWS + 1, 512, 1200])
@pytest.mark.parametrize(("n_in", "n_out"), [(640, 1024), (1024, 640), (2048, 640)])
def test_a_packed_layer_is_f_linear_bit_for_bit_at_prefill_sizes_too(rows, n_in, n_out):
    """No bias, as in Gemma: on an Intel Xeon with AMX the packed product alone summed these three shapes in another
    order than F.linear at 512 or 1,200 rows (with a bias it did not)."""
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in).bfloat16()
    x = torch.randn(1, rows, n_in).bfloat16()
    assert torch.equal(layer_forward(x, w, pack(w)), F.linear(x, w))


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
    real = packed_weights.packed_linear  # the packed product itself: a layer leaves more than MAX_ROWS rows to F.linear
    monkeypatch.setattr(packed_weights, "packed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed_tokens = decode()
    assert len(calls) > 0
    with packed_linears(model), batch_invariant(model) if invariant else contextlib.nullcontext():
        forward = model.get_output_embeddings().forward
        assert (forward.keywords["product"] if invariant else forward).func is packed_weights.layer_forward
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


@native
def test_streams_that_end_out_of_order_leave_no_forward_behind(tiny_tokenizer):
    """A plain stream (packing) read in turn with a batch-invariant one (tiling the first one's packs): the first ends
    first; when the second ends, neither packs nor tiles stay on the model."""
    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1).to(torch.bfloat16)
    prompts = [tok("Question: 2 and 3?\nAnswer:")["input_ids"]]
    plain = load_config(None, ["generation.max_new_tokens=6"]).generation
    mode = load_config(None, ["generation.max_new_tokens=6", "generation.batch_invariant=true"]).generation
    first = stream(model, tok, prompts * 2, plain, StopRules(False, False), batch_size=1)
    second = stream(model, tok, prompts * 2, mode, StopRules(False, False), batch_size=1)
    next(first), next(second)
    first.close()
    assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))  # still tiled
    list(second)
    assert not any("forward" in m.__dict__ for m in model.modules())


@native
def test_a_model_that_trained_since_decodes_with_its_new_weights(tiny_tokenizer):
    model = sliding_model(tiny_tokenizer, seed=3).to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        with packed_linears(model):
            before = model(input_ids=ids).logits
        model.get_output_embeddings().weight.mul_(2)
        with packed_linears(model):
            after = model(input_ids=ids).logits
        assert torch.equal(after, model(input_ids=ids).logits) and not torch.equal(after, before)


@native
def test_a_lora_model_packs_its_bf16_layers_only(tiny_tokenizer):
    """peft keeps the adapter's weights in float32 under a bf16 base: those stay with F.linear."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(sliding_model(tiny_tokenizer, seed=3).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with packed_linears(model) as n:
            assert n == sum(m.weight.dtype == torch.bfloat16 for m in linears) < len(linears)
            assert torch.equal(model(input_ids=ids).logits, before)


def test_the_float32_screen_multiplies_unpacked_when_packing_is_off(tiny_tokenizer, monkeypatch):
    from gsmtune.output_screen import screen_of

    model = sliding_model(tiny_tokenizer, seed=3)
    head = model.get_output_embeddings()
    monkeypatch.setenv("GSMTUNE_PACK", "off")
    off = screen_of(head)
    assert off.screen.func is F.linear
    monkeypatch.setenv("GSMTUNE_PACK", "on")
    assert (screen_of(head) is off) == (not native_bf16_onednn())  # made again where packing applies
