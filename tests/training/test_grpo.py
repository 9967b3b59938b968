import json

import pytest
from conftest import overrides

from gsmtune.cli import main
from gsmtune.errors import GsmtuneError
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
    card = (out / "model" / "README.md").read_text()  # says what GRPO optimised; a loss of 0.0 (no signal) is 0.000
    assert "GRPO: 2 completions per prompt" in card and "answer tokens only" not in card
    assert f"final loss {m['final_loss']:.3f}" in card


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


def test_cpu_grpo_samples_through_the_decode_loop(tiny_model_dir, train_dir, tmp_path, monkeypatch):
    """The default CPU rollout is gsmtune's loop (training/rollout.py); `training.grpo.rollout=trl` keeps TRL's."""
    from gsmtune.training import rollout

    calls = []
    real = rollout.stream
    monkeypatch.setattr(rollout, "stream", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    args = ["training.method=grpo", "training.max_steps=2", "training.bf16=false", "training.grpo.num_generations=2",
            "training.per_device_train_batch_size=4", "training.grpo.max_completion_length=8"]
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, tmp_path / "loop", *args)]) == 0
    assert calls == [4, 4]  # one call a step, 2 prompts x 2 completions
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, tmp_path / "trl", *args,
                                             "training.grpo.rollout=trl")]) == 0
    assert calls == [4, 4]


def test_rollout_samples_one_completion_per_prompt_and_restores_training_mode(tiny_tokenizer):
    from types import SimpleNamespace

    from conftest import sliding_model

    from gsmtune.training.rollout import decode_loop_rollout

    model = sliding_model(tiny_tokenizer, seed=2).train()
    args = SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, max_completion_length=6, seed=7, min_p=None,
                           repetition_penalty=1.0, generation_kwargs=None)
    trainer = SimpleNamespace(args=args, processing_class=tiny_tokenizer, model=model, state=SimpleNamespace(global_step=0),
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    prompts = ["Question: 2 + 2?\nAnswer:"] * 3 + ["Question: how many apples?\nAnswer:"] * 3
    first, second = decode_loop_rollout(args), decode_loop_rollout(args)
    out = first(prompts, trainer)
    assert model.training  # back in training mode for the policy update
    assert out["prompt_ids"] == tiny_tokenizer(text=prompts)["input_ids"] and out["logprobs"] is None
    assert len(out["completion_ids"]) == 6 and all(1 <= len(c) <= 6 for c in out["completion_ids"])
    assert len({tuple(c) for c in out["completion_ids"][:3]}) > 1  # samples, not one greedy answer thrice
    assert second(prompts, trainer)["completion_ids"] == out["completion_ids"]  # seeded by args.seed and call count
    assert first(prompts, trainer)["completion_ids"] != out["completion_ids"]  # the next call draws new samples
    trainer.state.global_step = 5  # a resumed run: its first call draws anew, not the first step's samples again
    assert decode_loop_rollout(args)(prompts, trainer)["completion_ids"] != out["completion_ids"]
    with pytest.raises(GsmtuneError, match="training.grpo.rollout=trl"):
        decode_loop_rollout(SimpleNamespace(**vars(args) | {"repetition_penalty": 1.1}))
