"""The CUDA path on tiny random models: bf16 SFT with 8-bit AdamW (full, LoRA, QLoRA) on a Gemma 2-style model (soft-
capped attention: eager) and a Gemma 3-style one, checkpoint resume, GRPO steps, the decode loop against HF `generate`,
`accelerate launch` with the FSDP config, and process start-up (the CPU allocator lever stays off on CUDA).

Skipped without CUDA (conftest); `benchmarks/gpu_check.sh` runs them on a GPU machine.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import overrides

from gsmtune.allocator import KEPT
from gsmtune.cli import CONFIGS, main

pytestmark = pytest.mark.gpu

CUDA = ["model.device=cuda", "model.dtype=bf16", "training.bf16=true", "training.optim=adamw_bnb_8bit"]


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Gemma 2: attention logits soft-capped, so training picks eager attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0,
                          final_logit_softcapping=30.0, sliding_window=64, bos_token_id=tiny_tokenizer.bos_token_id,
                          eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-gemma2")
    Gemma2ForCausalLM(config).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_sft_on_cuda_with_8bit_adam_resumes(arch, method, gemma2_dir, tiny_model_dir, train_dir, tmp_path):
    model = gemma2_dir if arch == "gemma2" else tiny_model_dir
    out = tmp_path / "run"
    args = ["train", "base", *overrides(model, train_dir, out, *CUDA, f"training.method={method}", "training.max_steps=6",
                                        "training.save_steps=3", "training.learning_rate=1e-3")]
    assert main(args) == 0
    m = json.loads((out / "train_metrics.json").read_text())
    assert (m["optimizer"], m["precision"], m["device"][:4], m["global_step"]) == ("adamw_bnb_8bit", "bf16", "cuda", 6)
    losses = [p["loss"] for p in m["loss_curve"]]
    assert losses[-1] < losses[0]
    if arch == "gemma2":
        from gsmtune.training.common import training_attention

        assert training_attention(load_cfg(args), str(model)) == "eager"

    shutil.rmtree(out / "checkpoints" / "checkpoint-6")  # as if stopped after step 3's checkpoint
    (out / "train_metrics.json").unlink()
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((out / "train_metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6


def load_cfg(args):
    from gsmtune.config import load_config

    return load_config(None, args[2:])


def test_grpo_steps_on_cuda(tiny_model_dir, train_dir, tmp_path):
    out = tmp_path / "grpo"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, "model.device=cuda", "training.bf16=true",
                                             "training.method=grpo", "training.max_steps=3",
                                             "training.grpo.num_generations=4", "training.grpo.max_completion_length=8")]) == 0
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["global_step"] == 3 and len(m["reward_curve"]) == 3 and m["device"].startswith("cuda")


def test_decode_loop_on_cuda_equals_hf_generate(tiny_model_dir, tiny_tokenizer):
    """float32 with TF32 off, so the comparison is exact."""
    from transformers import AutoModelForCausalLM

    from gsmtune.config import load_config
    from gsmtune.generation import StopRules, generate, left_pad

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    gen = load_config(None, ["generation.max_new_tokens=16"]).generation
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]
               for t in ["Question: Tom has 3 apples\nAnswer:", "Question: A box\nAnswer:", "Question: 7\nAnswer:"]]
    none = StopRules(at_answer=False, at_new_question=False)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    reference = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=16, do_sample=False,
                               eos_token_id=[], pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    ours = generate(model, tok, prompts, gen, none)
    assert [c.text for c in ours] == [tok.decode(r, skip_special_tokens=True) for r in reference.tolist()]


def test_fsdp_accelerate_launch(tiny_model_dir, train_dir, tmp_path):
    """Full fine-tuning through `accelerate launch` with the shipped FSDP config: one process per GPU (at most two)."""
    procs = min(torch.cuda.device_count(), 2)
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "fsdp.yaml"),
           "--num_processes", str(procs), "-m", "gsmtune.cli", "train", "base",
           *overrides(tiny_model_dir, train_dir, out, "model.device=cuda", "training.method=full", "training.bf16=true")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["world_size"] == procs and m["global_step"] == 4
    assert m["optimizer"] == "adamw_torch"  # 8-bit AdamW cannot update FSDP2's DTensors: the one-line fallback
    assert m["allocator"] != KEPT  # the CPU lever (mallopt) stays off in a CUDA process
