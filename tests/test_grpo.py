import json

from test_training import overrides

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
    assert main(["train", "configs/base.yaml", *overrides(
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
    assert main(["train", "configs/base.yaml", *overrides(tiny_model_dir, train_dir, sft, "training.max_steps=1")]) == 0
    out = tmp_path / "grpo"
    assert main(["train", "configs/base.yaml", *overrides(
        sft / "model", train_dir, out, "training.method=grpo", "training.max_steps=1", "training.bf16=false",
        "training.per_device_train_batch_size=2", "training.grpo.num_generations=2",
        "training.grpo.max_completion_length=8")]) == 0
    assert json.loads((out / "train_metrics.json").read_text())["global_step"] == 1
