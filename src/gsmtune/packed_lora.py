"""LoRA layers of a bf16 model decoding on CPU, each as two packed products: h = x A^T, then [x, h] [W, s B]^T.

peft runs an unmerged adapter as six calls after the base product (cast x to float32, A, B, scale, add, cast back);
at a 64-row decode step of Gemma 3 270M that is ~750 calls over 126 layers, ~17 of ~105 ms (Intel Xeon with AMX,
torch.profiler). Here the base and adapter outputs come from one packed product over x and the adapter's input h, the
weights side by side, summed in float32 inside oneDNN and rounded once. The adapter's weights compute in bf16 (peft:
float32), so this is for plain bf16 decoding only: the batch-invariant mode and float32 keep peft's arithmetic. The
adapter stays unmerged (the base weights are not touched), and packs are made on entry from the weights as they are.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gsmtune.forward_overrides import overridden
from gsmtune.packed_weights import pack, packable, packed_linear, prefill_rows, short_of_memory


def _single_plain_adapter(module: nn.Module) -> str | None:
    """The adapter name of a peft LoRA Linear whose forward is base + s B A x for one adapter (not merged, no DoRA or
    other variant, no LoRA bias, dropout off); None otherwise."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(module, Linear) or module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_variant or not isinstance(module.base_layer, nn.Linear):
        return None
    name = active[0]
    dropout = module.lora_dropout[name]
    if module.lora_B[name].bias is not None or (isinstance(dropout, nn.Dropout) and dropout.training):
        return None
    return name if packable(module.base_layer.weight) else None


def _forward(x: torch.Tensor, adapter_in: torch.Tensor, both: torch.Tensor, bias: torch.Tensor | None,
             peft_forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A decode step's rows through the two packed products; a prefill's many rows through peft's own forward."""
    if prefill_rows(x):
        return peft_forward(x)
    return packed_linear(torch.cat([x, packed_linear(x, adapter_in)], dim=-1), both, bias)


def _packs(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight, scale = module.base_layer.weight, module.scaling[name]
    with torch.no_grad():
        a = module.lora_A[name].weight.to(weight.dtype)
        b = (module.lora_B[name].weight.float() * scale).to(weight.dtype)
        return pack(a), pack(torch.cat([weight, b], dim=1))


@contextlib.contextmanager
def packed_lora(model: nn.Module) -> Iterator[int]:
    """Within: each foldable peft LoRA Linear of `model` runs as two packed products. Yields how many. As with
    `packed_linears`, nothing is packed (one warning) where the packs would take over half the memory available."""
    layers = {m: name for m in model.modules() if (name := _single_plain_adapter(m)) is not None}
    needed = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for m in layers)
    if layers and (free := short_of_memory(needed)) is not None:
        warnings.warn(f"gsmtune: decoding the LoRA adapter through peft: its packs need {needed / 2**30:.1f} GiB and "
                      f"{free:.1f} GiB is available (slower)", stacklevel=3)
        layers = {}

    def make(module: nn.Module, before: Callable | None) -> Callable:
        adapter_in, both = _packs(module, layers[module])
        return functools.partial(_forward, adapter_in=adapter_in, both=both, bias=module.base_layer.bias,
                                 peft_forward=before or type(module).forward.__get__(module))

    with overridden(list(layers), make):
        yield len(layers)
