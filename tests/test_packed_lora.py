import pytest
import torch
from conftest import sliding_model

from gsmtune import generation
from gsmtune.config import load_config
from gsmtune.generation import StopRules
from gsmtune.packed_lora import packed_lora
from gsmtune.packed_weights import MAX_ROWS, native_bf16_onednn

native = pytest.mark.skipif(not native_bf16_onednn(), reason="oneDNN does not run bf16 natively here: peft's forward")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_model(tokenizer, dtype=torch.bfloat16, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(sliding_model(tokenizer, seed=3).to(dtype),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                     init_lora_weights=False)).eval()


def lora_layers(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def exact(layer, x):
    """base + s B A x in float64: what both peft and the packed products round."""
    a, b, w = (t.double() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                      layer.base_layer.weight))
    return x.double() @ w.T + layer.scaling["default"] * (x.double() @ a.T) @ b.T


@native
def test_lora_layers_run_as_packed_products_within_bf16_rounding(tiny_tokenizer):
    torch.manual_seed(0)
    model = lora_model(tiny_tokenizer)
    layers = lora_layers(model)
    with torch.no_grad():
        inputs = {layer: torch.randn(5, 1, layer.base_layer.in_features).bfloat16() for layer in layers}
        peft = {layer: layer(x) for layer, x in inputs.items()}
        with packed_lora(model) as n:
            assert n == len(layers) == 2 * len(TARGETS)
            ours = {layer: layer(x) for layer, x in inputs.items()}
            many = torch.randn(2, MAX_ROWS, layers[0].base_layer.in_features).bfloat16()  # a prefill's rows: peft's own
            assert torch.equal(layers[0](many), type(layers[0]).forward(layers[0], many))
        assert all("forward" not in layer.__dict__ for layer in layers)  # put back on exit
    for layer, x in inputs.items():
        want = exact(layer, x)
        scale = want.abs().max()
        assert (ours[layer].double() - want).abs().max() <= 2**-7 * scale  # bf16 rounding of the sum and of h
        assert (peft[layer].double() - want).abs().max() <= 2**-7 * scale


@native
def test_only_plain_single_adapters_in_bf16_are_packed(tiny_tokenizer):
    with packed_lora(lora_model(tiny_tokenizer, dtype=torch.float32)) as n:
        assert n == 0  # float32 keeps peft's arithmetic (the mode checked against lm-eval)
    training = lora_model(tiny_tokenizer, dropout=0.1).train()
    with packed_lora(training) as n:
        assert n == 0  # dropout on: peft's forward draws its masks
    merged = lora_model(tiny_tokenizer)
    merged.merge_adapter()
    with packed_lora(merged) as n:
        assert n == 0


@native
@pytest.mark.parametrize("mode", [False, True])
def test_plain_bf16_decoding_packs_the_adapter_and_the_batch_invariant_mode_does_not(tiny_tokenizer, monkeypatch, mode):
    tok = tiny_tokenizer
    model = lora_model(tok)
    packed = []
    real = generation.packed_lora

    def counting(m):
        packed.append(m)
        return real(m)

    monkeypatch.setattr(generation, "packed_lora", counting)
    gen = load_config(None, ["generation.max_new_tokens=6", f"generation.batch_invariant={mode}"]).generation
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in ["Question: 7\nAnswer:", "A"]]
    done = dict(generation.stream(model, tok, prompts, gen, StopRules(False, False)))
    assert sorted(done) == [0, 1] and packed == ([] if mode else [model])
