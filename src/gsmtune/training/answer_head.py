"""The SFT loss's output layer on answer positions only, in the compute dtype (bf16), with the softmax in float32.

Why by hand: TRL's fused head scores only answer positions where Triton runs (CUDA/XPU); elsewhere it scores every
position, prompt and padding included, and runs its products in float32 (`trl/kernels/chunked_logprob.py`). On this
project's CPU that was 44-47% of a LoRA step's time (BENCHMARKS.md), where bf16 products are 2-7x faster than float32
ones, depending on the CPU. This
module replaces only that kernel, where TRL would take its slow path; TRL's loss, metrics and everything else stay.
The arithmetic is transformers' own loss: logits in the compute dtype, log-softmax in float32.
"""

from __future__ import annotations

import functools
import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

TOKEN_CHUNK = 256  # answer tokens per tile: bounds the float32 temporaries to 256 x vocab x 4 bytes (0.25 GiB for Gemma)
_SCALED = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling", "final_logit_softcapping")


class _AnswerLogProbs(torch.autograd.Function):
    """log p(target) per answer token, plus entropy and whether the target is the argmax (for TRL's metrics).

    Each tile costs one product in the compute dtype and a few fused passes over float32 logits (softmax, max, a row
    dot); the softmax is kept for backward (N x vocab float32: 1 GiB per 1,000 answer tokens of Gemma).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):  # dtypes chosen here: bf16 product, float32 softmax and metrics
            return _AnswerLogProbs._forward(ctx, hidden, weight, targets, dtype)

    @staticmethod
    def _forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        n, vocab = h.shape[0], w.shape[0]
        probs = torch.empty(n, vocab, dtype=torch.float32, device=h.device)
        log_probs = torch.empty(n, dtype=torch.float32, device=h.device)
        entropy, top1 = torch.empty_like(log_probs), torch.empty(n, dtype=torch.bool, device=h.device)
        for s in range(0, n, TOKEN_CHUNK):
            e = min(s + TOKEN_CHUNK, n)
            z = (h[s:e] @ w.t()).float()
            p = torch.softmax(z, dim=-1, out=probs[s:e])
            p_max, best = p.max(-1)
            lse = z.gather(1, best[:, None]).squeeze(1) - p_max.log()  # exact: the largest probability is >= 1/vocab
            log_probs[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse
            entropy[s:e] = lse - torch.linalg.vecdot(p, z)  # H = lse - sum p z
            top1[s:e] = best == targets[s:e]
        ctx.save_for_backward(h, w, targets, probs)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(entropy, top1)
        return log_probs, entropy, top1

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, *_):
        h, w, targets, probs = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        for s in range(0, h.shape[0], TOKEN_CHUNK):
            e = min(s + TOKEN_CHUNK, h.shape[0])
            g = grad_log_probs[s:e, None]
            # d log p(t) / dz = onehot(t) - softmax(z), times the incoming gradient; in place on the saved softmax
            dz = probs[s:e].mul_(-g).scatter_add_(1, targets[s:e, None], g.contiguous()).to(h.dtype)
            if need_h:
                torch.mm(dz, w, out=grad_h[s:e])
            if need_w:
                grad_w += (dz.t() @ h[s:e]).float()  # the product in the compute dtype, summed over tiles in float32
        return (grad_h.to(ctx.dtypes[0]) if need_h else None, grad_w.to(ctx.dtypes[1]) if need_w else None, None)


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
