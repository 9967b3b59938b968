"""LoRA's dropout with cheaper masks, for CPUs: the same keep-or-zero mask and 1/(1-p) scale as `nn.Dropout`, drawn as
16-bit slices of 64-bit random words. torch's CPU dropout draws one generator number per element, and peft draws a
mask for each of the 7 adapted products of every layer: 10% of a LoRA step at micro-batch 8 (BENCHMARKS.md). p is
rounded to a multiple of 1/65536 (0.05 -> 0.0500031)."""

from __future__ import annotations

import torch

LEVELS = 65536  # one 16-bit slice per element


class _KeepAndScale(torch.autograd.Function):
    """x where kept, else 0, times the scale; the backward applies the same mask (kept as 1 byte an element, as
    torch's dropout keeps its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


class WordMaskDropout(torch.nn.Module):
    """`nn.Dropout(p)` for training; the identity in eval mode, as it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.dropped = round(p * LEVELS)
        if not 0 < self.dropped < LEVELS:
            raise ValueError(f"dropout p={p} rounds to {self.dropped}/{LEVELS}: keep nn.Dropout for it")
        self.p = self.dropped / LEVELS
        self.scale = 1 / (1 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.dropped - LEVELS // 2  # P(drop) = dropped / LEVELS
        return _KeepAndScale.apply(x, keep, self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_word_mask_dropout(model: torch.nn.Module) -> int:
    """Swap peft's LoRA dropout modules for `WordMaskDropout` (p = 0 stays the identity); how many were swapped."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is torch.nn.Dropout and 0 < round(drop.p * LEVELS) < LEVELS:
                drops[name] = WordMaskDropout(drop.p).train(drop.training)
                swapped += 1
    return swapped
