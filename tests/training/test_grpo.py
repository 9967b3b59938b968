import json

from conftest import overrides

from gsmtune.cli import main
from gsmtune.training.rewards import correctness_reward, format_reward


def test_rewards_on_hand_made_completions():
    completions = [" 48/2 = 24\n#### 24", " it is 24", " #### $1,200.50\nQuestion: more", " #### 23\n#### 24",
                   [{"role": "assistant", "content": "so #### -3"}]]
    gold = ["24", "24", "1200.5", "24", "-3"]
    assert correctness_reward(completions, gold=gold) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert format_reward(completions) == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_grpo_steps_on_tiny_model_log_rewards(tiny_model_dir, train_dir, tmp_path):
    out = tmp_path / "grpo"
    assert main(["train", "base", *overrides(
        tiny_model_dir, train_dir, out, "training.method=grpo", "training.max_steps=2", "training.bf16=false",
        "training.per_device_train_batch_size=2", "training.grpo.num_generations=2",
        "training.grpo.max_completion_length=8")]) == 0
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["method"] == "grpo" and m["global_step"] == 2
    assert [p["step"] for p in m["reward_curve"]] == [1, 2]
    assert all({"reward", "rewards/correctness_reward/mean", "frac_reward_zero_std"} <= set(p) for p in m["reward_curve"])
    assert (out / "model" / "adapter_model.safetensors").exists()


def test_grpo_continues_an_sft_adapter(tiny_model_dir, train_dir, tmp_path):
    sft = tmp_path / "sft"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, sft, "training.max_steps=1",
                                                                  "training.learning_rate=2e-2")]) == 0
    out = tmp_path / "grpo"
    assert main(["train", "base", *overrides(
        sft / "model", train_dir, out, "training.method=grpo", "training.max_steps=1", "training.bf16=false",
        "training.per_device_train_batch_size=2", "training.grpo.num_generations=2",
        "training.grpo.max_completion_length=8")]) == 0
    assert json.loads((out / "train_metrics.json").read_text())["global_step"] == 1
    # the SFT adapter kept training: its lora_B (about 2e-2 after one step; a fresh adapter's starts at zero) moved by
    # at most one GRPO step at lr 1e-3
    from safetensors.torch import load_file

    before, after = (load_file(d / "model" / "adapter_model.safetensors") for d in (sft, out))
    assert before.keys() == after.keys()
    b_keys = [k for k in before if "lora_B" in k]
    assert all(before[k].abs().max() > 1e-2 for k in b_keys)
    assert all((before[k] - after[k]).abs().max() < 5e-3 for k in b_keys)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["train"]["trained_model"]["method"] == "lora"
    assert json.loads((out / "training_data.json").read_text())["includes"] == str(sft)
