"""Row surgery on transformers' DynamicCache for continuous batching: join two running batches, drop padding columns.

transformers ships continuous batching (`generate_batch`), but on CPU it measured slower than plain `generate` and it
has no stop strings (BENCHMARKS.md); these two operations are all gsmtune's decode loop needs on top of DynamicCache.
Every row shares one timeline; a row's tokens sit right-aligned in it, left padding masked.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def supports_joining(cache) -> bool:
    """Plain and sliding-window attention layers only (the layouts `join` and `trim` know)."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def _stored(layer, length: int) -> int:
    """How many timeline positions a layer keeps: all of them, or the last `sliding_window - 1`."""
    return min(length, layer.sliding_window - 1) if layer.is_sliding else length


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if width == 0 else torch.cat([t.new_zeros(*t.shape[:2], width, t.shape[3]), t], dim=2)


def join(cache, length: int, other, other_length: int) -> None:
    """Append `other`'s rows to `cache` in place, both timelines aligned on their last position."""
    timeline = max(length, other_length)
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        if not (layer.is_initialized and extra.is_initialized):
            continue
        width = _stored(layer, timeline)
        layer.keys = torch.cat([_left_pad(layer.keys, width - layer.keys.shape[2]),
                                _left_pad(extra.keys, width - extra.keys.shape[2])])
        layer.values = torch.cat([_left_pad(layer.values, width - layer.values.shape[2]),
                                  _left_pad(extra.values, width - extra.values.shape[2])])
        if layer.is_sliding:
            layer.cumulative_length = timeline


def trim(cache, length: int, columns: int) -> None:
    """Drop the first `columns` positions of a `length`-long timeline (padding in every row) from the cache."""
    timeline = length - columns
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        keep = _stored(layer, timeline)
        layer.keys = layer.keys[:, :, layer.keys.shape[2] - keep:]
        layer.values = layer.values[:, :, layer.values.shape[2] - keep:]
        if layer.is_sliding:
            layer.cumulative_length = timeline
