"""The SFT loss's output layer on answer positions only, in the compute dtype (bf16), with the softmax in float32.

Why by hand: TRL's fused head scores only answer positions where Triton runs (CUDA/XPU); elsewhere it scores every
position, prompt and padding included, and runs its products in float32 (`trl/kernels/chunked_logprob.py`). On this
project's CPU that was 44-47% of a LoRA step's time (BENCHMARKS.md), where bf16 products are 2-7x faster than float32
ones, depending on the CPU. This module replaces only that kernel, where TRL would take its slow path; TRL's loss,
metrics and everything else stay. The arithmetic is transformers' own loss: logits in the compute dtype, log-softmax
in float32. The passes over the logits (262k columns a token for Gemma) go through `torch.compile`, which fuses them
into two reads of the compute-dtype logits forward and one backward, where six float32 passes ran in eager torch.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable

import torch
from torch._dynamo.exc import BackendCompilerFailed
from trl.trainer.utils import FusedCausalLMOutput

TOKEN_CHUNK = 256  # answer tokens per backward tile: bounds the logits' gradient to 256 x vocab in the compute dtype
_SCALED = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling", "final_logit_softcapping")


def _wide(z: torch.Tensor) -> torch.Tensor:
    """The logits in float32 (float64 stays float64)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _logit_stats(z: torch.Tensor, targets: torch.Tensor):
    """Per row: log p(target), the entropy, whether the target attains the largest logit, and log-sum-exp."""
    zf = _wide(z)
    top = zf.amax(-1)
    e = torch.exp(zf - top[:, None])
    total = e.sum(-1)
    lse = top + total.log()
    picked = zf.gather(1, targets[:, None]).squeeze(1)
    return picked - lse, lse - (e * zf).sum(-1) / total, picked == top, lse


def _logit_grad(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(grad . log p(target)) / dz = grad * (onehot(target) - softmax(z)), in float32, returned in z's dtype."""
    hit = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
    return (grad[:, None] * (hit.to(lse.dtype) - torch.exp(_wide(z) - lse[:, None]))).to(z.dtype)


class _Fused:
    """`fn` compiled by torch.compile (a C++ kernel on CPU); `fn` itself, after one warning, where compiling fails (no
    C++ compiler, an unsupported platform): the same numbers, more memory passes."""

    broken = False  # shared: once one kernel fails to compile, every one runs eagerly

    def __init__(self, fn: Callable):
        self.eager, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if not _Fused.broken:
            try:
                return self.compiled(*args)
            except BackendCompilerFailed as err:
                _Fused.broken = True
                reason = (str(err.inner_exception).splitlines() or [type(err.inner_exception).__name__])[0]
                warnings.warn(f"gsmtune: the output layer's fused kernel did not compile ({reason}); running it in "
                              "eager torch, slower (a C++ compiler, e.g. g++, fixes it)", stacklevel=2)
        return self.eager(*args)


logit_stats, logit_grad = _Fused(_logit_stats), _Fused(_logit_grad)


class _AnswerLogProbs(torch.autograd.Function):
    """log p(target) per answer token, plus entropy and whether the target is top-1 (for TRL's metrics).

    The logits are kept for backward in the compute dtype (N x vocab: 0.5 GiB per 1,000 answer tokens of Gemma in
    bf16) with one log-sum-exp per row; backward recomputes the softmax from them tile by tile.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):  # dtypes chosen here: bf16 product, float32 softmax and metrics
            h, w = hidden.to(dtype), weight.to(dtype)
            logits = h @ w.t()
            if h.shape[0]:
                log_probs, entropy, top1, lse = logit_stats(logits, targets)
            else:  # an all-masked micro-batch: nothing to score (and no zero-size kernel to compile)
                log_probs, entropy, lse = (logits.new_zeros(0, dtype=_wide(logits).dtype) for _ in range(3))
                top1 = logits.new_zeros(0, dtype=torch.bool)
        ctx.save_for_backward(h, w, targets, logits, lse)
        ctx.dtypes, ctx.consumed = (hidden.dtype, weight.dtype), False
        ctx.mark_non_differentiable(entropy, top1)
        return log_probs, entropy, top1

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, *_):
        if ctx.consumed:  # the weight's gradient overwrites the saved logits: a second backward would read garbage
            raise RuntimeError("gsmtune's answer head supports one backward per forward (no retain_graph)")
        h, w, targets, logits, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_log_probs = grad_log_probs.to(lse.dtype)
        for s in range(0, h.shape[0], TOKEN_CHUNK):
            e = min(s + TOKEN_CHUNK, h.shape[0])
            dz = logit_grad(logits[s:e], lse[s:e], targets[s:e], grad_log_probs[s:e])
            if need_h:
                torch.mm(dz, w, out=grad_h[s:e])
            if need_w:
                logits[s:e] = dz  # the tile's logits are read for the last time: keep its gradient in their place
        ctx.consumed = need_w
        # full fine-tuning: one product over every answer token (the compute dtype, accumulated inside the kernel), where
        # a float32 sum over tiles made four passes over a vocab x hidden tensor per tile (0.7 GB each for Gemma)
        grad_w = (logits.t() @ h).to(ctx.dtypes[1]) if need_w else None
        return (grad_h.to(ctx.dtypes[0]) if need_h else None, grad_w, None)


def needs_answer_head(device: torch.device) -> bool:
    """Where TRL's fused head scores every position in float32: devices without its Triton kernels."""
    from trl.kernels.chunked_logprob import _use_triton

    return not _use_triton(device)


def use_answer_head(model) -> bool:
    """Replace TRL's fused head on `model` (the transformers model, under any PEFT wrapper). False where the model
    scales or soft-caps its logits, or has an output bias (it then keeps TRL's)."""
    text = model.config.get_text_config()
    if any(getattr(text, k, None) not in (None, 1.0) for k in _SCALED) or model.get_output_embeddings().bias is not None:
        return False
    trl_forward = model.forward  # TRL's fused forward, kept for everything this head does not handle
    backbone = model.base_model_prefix

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone)(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        head = self.get_output_embeddings()
        log_probs, entropy, top1 = _AnswerLogProbs.apply(hidden[mask], head.weight, targets[mask])
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero)
        log_probs = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
        entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        top1 = top1.new_zeros(mask.shape).masked_scatter(mask, top1)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
