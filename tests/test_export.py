"""`gsmtune export`: GGUF files that load back (transformers' GGUF loader) and decode as the model they came from."""

import pytest

from gsmtune.cli import main
from gsmtune.errors import GsmtuneError
from gsmtune.export import export_gguf

PROMPTS = ["Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?\nAnswer:",
           "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:", "Q: 12 + 30 ="]


def gguf_ready_gemma(tokenizer, folder):
    """A tiny random Gemma 3 that GGUF can describe (attention scale = head_dim, as llama.cpp assumes)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=1, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=16, max_position_embeddings=512, bos_token_id=2, eos_token_id=1,
                              pad_token_id=0)
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def greedy(model, tokenizer, n=24):
    import torch

    with torch.no_grad():
        return [tokenizer.decode(model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=n, do_sample=False)[0])
                for p in PROMPTS]


def test_refusals_are_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(GsmtuneError, match="choose one of f32, f16, q8_0"):
        export_gguf(str(tiny_model_dir), tmp_path / "m.gguf", "q4_k")
    with pytest.raises(GsmtuneError, match="ending in .gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "m.bin")
    # the conftest model scales attention by 1/16 (query_pre_attn_scalar 256 with head_dim 16): GGUF readers would not
    assert main(["export", str(tiny_model_dir), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "not the one GGUF readers assume" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "nowhere: no such model folder" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_a_foreign_vocabulary_is_refused(tiny_tokenizer, tmp_path):
    gguf_ready_gemma(tiny_tokenizer, tmp_path / "model")
    with pytest.raises(GsmtuneError, match="vocabulary differs; merge it"):
        export_gguf(str(tmp_path / "model"), tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    from gsmtune.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("bundled:gemma-3-270m"))


@pytest.mark.slow
def test_f32_round_trip_is_exact_and_an_adapter_is_merged(gemma_tokenizer, tmp_path):
    """A LoRA adapter (random, non-zero) on a tiny Gemma 3 with Gemma's tokenizer: the f32 file loads back with
    transformers' GGUF loader and gives the merged model's logits bit for bit, so the same greedy completions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = gguf_ready_gemma(gemma_tokenizer, tmp_path / "base")
    torch.manual_seed(1)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft.save_pretrained(tmp_path / "adapter")
    gemma_tokenizer.save_pretrained(tmp_path / "adapter")
    expected = greedy(peft, gemma_tokenizer)
    merged = peft.merge_and_unload().eval()

    assert main(["export", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "out" / "m.gguf")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(back(**ids).logits, merged(**ids).logits)
    assert greedy(back, gemma_tokenizer) == expected
