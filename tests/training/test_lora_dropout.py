"""LoRA's dropout with word-sliced masks: nn.Dropout's distribution and gradient, swapped into CPU LoRA training."""

import json

import pytest
import torch
from conftest import overrides

from gsmtune.cli import main
from gsmtune.training.lora_dropout import WordMaskDropout, use_word_mask_dropout


def test_drops_a_p_share_and_scales_the_rest():
    torch.manual_seed(0)
    drop = WordMaskDropout(0.05).train()
    x = torch.ones(1000, 1001, requires_grad=True)  # not a multiple of 4 elements: the last word is cut
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.05, abs=1e-3)  # binomial sd 2.2e-4
    assert torch.all((y == 0) | (y == drop.scale)) and y.mean().item() == pytest.approx(1.0, abs=2e-3)
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad == 0, y == 0) and torch.all(x.grad[y != 0] == 2 * drop.scale)
    bf16 = drop(torch.ones(64, 64, dtype=torch.bfloat16))
    assert bf16.dtype == torch.bfloat16
    drop.eval()
    assert drop(x) is x


def test_masks_follow_torch_seed_and_differ_between_calls():
    drop = WordMaskDropout(0.5).train()
    torch.manual_seed(1)
    a, b = drop(torch.ones(4096)), drop(torch.ones(4096))
    torch.manual_seed(1)
    assert torch.equal(drop(torch.ones(4096)), a) and not torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_that_the_slices_cannot_express_is_refused(p):
    with pytest.raises(ValueError, match="keep nn.Dropout"):
        WordMaskDropout(p)


def test_cpu_lora_training_uses_it(tiny_model_dir, train_dir, tmp_path, monkeypatch):
    from gsmtune.training import sft

    swapped = []
    real = sft.build_trainer

    def spy(*args, **kwargs):
        trainer, path = real(*args, **kwargs)
        swapped.append(sum(isinstance(m, WordMaskDropout) for m in trainer.model.modules()))
        assert use_word_mask_dropout(trainer.model) == 0  # already swapped: nothing left
        return trainer, path

    monkeypatch.setattr(sft, "build_trainer", spy)
    out = tmp_path / "lora"
    assert main(["train", "base", *overrides(tiny_model_dir, train_dir, out, "training.max_steps=2")]) == 0
    assert swapped == [2 * 7]  # 2 layers x 7 adapted products
    assert all(p["loss"] > 0 for p in json.loads((out / "train_metrics.json").read_text())["loss_curve"])
