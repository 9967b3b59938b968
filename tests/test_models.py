import json

import pytest
import torch
from omegaconf import OmegaConf

from gsmtune.errors import GsmtuneError
from gsmtune.models import adapter_base, is_adapter, load_model, load_weights, pick_dtype
from gsmtune.training import common


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    """A LoRA adapter on the tiny model, its B weights set so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tiny_model_dir)}))
    return tmp_path / "adapter"


def test_one_loader_for_folders_and_adapters(tiny_model_dir, adapter_dir):
    plain, tokenizer, path = load_weights(str(tiny_model_dir), torch.float32)
    assert path == str(tiny_model_dir) and tokenizer.pad_token is not None
    assert is_adapter(adapter_dir) and adapter_base(adapter_dir) == str(tiny_model_dir)
    tuned, _, _ = load_weights(str(adapter_dir), torch.float32, attn_implementation="eager")
    assert tuned.get_base_model().config._attn_implementation == "eager"  # the adapter branch keeps the choices
    assert not any(p.requires_grad for p in tuned.parameters())
    trainable, _, _ = load_weights(str(adapter_dir), torch.float32, trainable_adapter=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in trainable.named_parameters() if p.requires_grad)
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, tuned(ids).logits)


def test_bad_model_names_are_one_line(tmp_path):
    with pytest.raises(GsmtuneError, match="no such folder"):
        load_weights(str(tmp_path / "missing"), torch.float32)
    with pytest.raises(GsmtuneError, match="model.dtype=fp8 is not known"):
        pick_dtype("fp8", torch.device("cpu"))


def test_the_output_layer_gets_a_contiguous_input(adapter_dir):
    """With a frozen head (any adapter), a strided last-position slice made torch copy the head weight per row."""
    lm = load_model(str(adapter_dir), dtype="fp32")
    seen = []
    lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[2, 10, 11, 12], [2, 13, 14, 15]])
    with torch.inference_mode():
        lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    assert seen == [True]


@pytest.mark.parametrize("caps, native", [
    ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": False}, False),  # emulated: 5x slower than fp32
    ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False}, True),
    ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True}, True),
])
def test_auto_picks_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("bf16", cpu) == torch.bfloat16  # asked for by name, it is what runs
    said = []
    monkeypatch.setattr(common, "say", said.append)
    t = OmegaConf.create({"report_to": "none", "optim": "adamw_torch", "bf16": True})
    assert common.choose_runtime(t, cpu) == ("adamw_torch", native) and len(said) == (0 if native else 1)
