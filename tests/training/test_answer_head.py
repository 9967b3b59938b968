"""The answer-only output layer: the same log-probabilities, entropy, top-1 and gradients as full logits."""

import os
import shutil

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from gsmtune.training import answer_head


def reference(hidden, weight, targets):
    logits = hidden @ weight.t()
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # float64 stays float64
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

    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)
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


@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler (the head then runs eagerly: tested below)")
def test_compiled_kernels_match_eager_torch():
    """The fused passes give eager torch's numbers; a target tied with the largest logit counts as top-1."""
    torch.manual_seed(0)
    logits = torch.randn(6, 1000).bfloat16()
    targets = torch.randint(0, 1000, (6,))
    targets[1] = logits[1].argmax()
    logits[2, :2] = logits[2].max() + 1  # a tie at the top: both columns are top-1
    targets[2] = 1
    grad = torch.randn(6)
    compiled = answer_head.logit_stats(logits, targets)
    eager = answer_head._logit_stats(logits, targets)
    assert not answer_head._Fused.broken  # it compiled
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert compiled[2][1:3].tolist() == [True, True]
    lse = compiled[3]
    torch.testing.assert_close(answer_head.logit_grad(logits, lse, targets, grad),
                               answer_head._logit_grad(logits, lse, targets, grad), rtol=0.01, atol=1e-4)


def test_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*_):
        raise BackendCompilerFailed(None, RuntimeError("No working C++ compiler found"), None)

    monkeypatch.setattr(answer_head._Fused, "broken", False)
    for kernel in (answer_head.logit_stats, answer_head.logit_grad):
        monkeypatch.setattr(kernel, "compiled", broken)
    hidden, weight, targets = torch.randn(3, 8, requires_grad=True), torch.randn(20, 8), torch.tensor([1, 2, 3])
    with pytest.warns(UserWarning, match="did not compile .No working C.. compiler found.*eager") as caught:
        log_probs, _, _ = answer_head._AnswerLogProbs.apply(hidden, weight, targets)
        log_probs.sum().backward()
    assert len(caught) == 1 and answer_head._Fused.broken
    torch.testing.assert_close(log_probs, reference(hidden, weight, targets)[0])


def test_all_masked_micro_batch_has_zero_gradient():
    hidden = torch.randn(0, 8, requires_grad=True)
    log_probs, entropy, top1 = answer_head._AnswerLogProbs.apply(hidden, torch.randn(20, 8), torch.zeros(0).long())
    assert log_probs.shape == entropy.shape == top1.shape == (0,)
    log_probs.sum().backward()
    assert hidden.grad.shape == (0, 8)


def test_second_backward_of_the_weight_is_refused():
    """Full fine-tuning's backward overwrites the saved logits with their gradient: a retained graph must not reuse them."""
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    log_probs, _, _ = answer_head._AnswerLogProbs.apply(hidden, weight, torch.tensor([1, 2, 3, 4]))
    log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        log_probs.sum().backward()
