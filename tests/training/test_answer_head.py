"""The answer-only output layer: the same log-probabilities, entropy, top-1 and gradients as full logits."""

import pytest
import torch

from gsmtune.training import answer_head


def reference(hidden, weight, targets):
    logp = (hidden @ weight.t()).float().log_softmax(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1), logp.argmax(-1) == targets


@pytest.mark.parametrize("need_weight", [False, True])
def test_matches_full_logits_across_tiles(monkeypatch, need_weight):
    monkeypatch.setattr(answer_head, "TOKEN_CHUNK", 3)  # 7 tokens: three tiles, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=need_weight)
    targets = torch.randint(0, 50, (7,))
    targets[0] = (hidden[0] @ weight.t()).argmax()  # at least one top-1 hit
    scale = torch.randn(7, dtype=torch.float64)

    ref = reference(hidden, weight, targets)
    ref_grads = torch.autograd.grad((ref[0] * scale).sum(), [hidden, weight] if need_weight else [hidden])
    ours = answer_head._AnswerLogProbs.apply(hidden, weight, targets)
    grads = torch.autograd.grad((ours[0] * scale).sum(), [hidden, weight] if need_weight else [hidden])

    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-5, atol=1e-5)
    assert ours[2].tolist() == ref[2].tolist() and ours[2][0]
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_products_run_in_the_autocast_dtype():
    """Under bf16 autocast the product is bf16 (fast on CPUs with AMX/AVX-512 bf16), the softmax float32."""
    seen = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(a.dtype)
        return real_mm(a, b)

    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.Tensor.__matmul__ = spy
        try:
            log_probs, _, _ = answer_head._AnswerLogProbs.apply(hidden, weight, torch.tensor([1, 2, 3, 4]))
        finally:
            torch.Tensor.__matmul__ = real_mm
    assert seen == [torch.bfloat16] and log_probs.dtype == torch.float32


def test_metrics_stay_float32_under_autocast():
    """Entropy and log-probabilities from the bf16 logits, computed in float32 (not rounded to bf16 by autocast)."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(5, 16), torch.randn(300, 16), torch.randint(0, 300, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, entropy, _ = answer_head._AnswerLogProbs.apply(hidden, weight, targets)
    ref = reference(hidden.bfloat16(), weight.bfloat16(), targets)  # the same bf16 logits, softmax in float32
    assert entropy.dtype == log_probs.dtype == torch.float32
    torch.testing.assert_close(entropy, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_probs, ref[0], rtol=1e-5, atol=1e-5)
