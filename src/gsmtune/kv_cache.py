"""transformers' DynamicCache for gsmtune's decode loop: appends in place, and row surgery for continuous batching.

transformers ships continuous batching (`generate_batch`), but on CPU it measured slower than plain `generate` and it
has no stop strings (BENCHMARKS.md). What the decode loop needs on top of DynamicCache: layers that append into spare
room instead of `torch.cat` (which copies the whole cache at every step), new rows written into finished rows' places
(no copy of the running rows), and dropping padding columns. Every row shares one timeline; a row's tokens sit
right-aligned in it, left padding masked.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

SPARE = 256  # positions of room allocated past the end: one copy of the cache per SPARE decode steps, not per step


def _room_after(stored: torch.Tensor, buffer: torch.Tensor | None) -> int | None:
    """Where `stored` ends inside `buffer`, when `stored` is a slice of it along the timeline; else None."""
    if (buffer is None or stored.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
            or stored.shape[:2] != buffer.shape[:2] or stored.stride() != buffer.stride()):
        return None
    start = (stored.storage_offset() - buffer.storage_offset()) // buffer.stride(2)
    return start + stored.shape[2]


def _append(stored: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`stored` followed by `new` along the timeline, as a slice of `buffer` (written in place when it has room)."""
    end = _room_after(stored, buffer) if stored.dim() == 4 else None
    if end is not None and end + new.shape[2] <= buffer.shape[2]:
        buffer[:, :, end:end + new.shape[2]] = new
        return buffer[:, :, end - stored.shape[2]:end + new.shape[2]], buffer
    n = stored.shape[2] if stored.dim() == 4 else 0
    buffer = new.new_empty(*new.shape[:2], n + new.shape[2] + SPARE, new.shape[3])
    if n:
        buffer[:, :, :n] = stored
    buffer[:, :, n:n + new.shape[2]] = new
    return buffer[:, :, :n + new.shape[2]], buffer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `update` writes into spare room (same states returned, no per-step copy of the cache)."""

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.key_buffer = _append(self.keys, key_states, self.key_buffer)
        self.values, self.value_buffer = _append(self.values, value_states, self.value_buffer)
        return self.keys, self.values


class GrowingSlidingWindowLayer(DynamicSlidingWindowLayer):
    """The sliding-window twin: the window's view moves along the buffer; only reaching its end copies the window."""

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.record_past:  # assisted decoding's bookkeeping: transformers' own path
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, self.key_buffer = _append(self.keys, key_states, self.key_buffer)
        values, self.value_buffer = _append(self.values, value_states, self.value_buffer)
        self.keys = keys[:, :, -self.sliding_window + 1:]
        self.values = values[:, :, -self.sliding_window + 1:]
        return keys, values


def new_cache(config) -> DynamicCache:
    """transformers' DynamicCache for `config`, its plain and sliding-window layers swapped for the growing ones."""
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = GrowingSlidingWindowLayer(sliding_window=layer.sliding_window)
        elif type(layer) is DynamicLayer:
            cache.layers[i] = GrowingLayer()
    return cache


def supports_joining(cache) -> bool:
    """Plain and sliding-window attention layers only (the layouts `place` and `trim` know)."""
    known = (DynamicLayer, DynamicSlidingWindowLayer, GrowingLayer, GrowingSlidingWindowLayer)
    return all(type(layer) in known for layer in cache.layers)


def _stored(layer, length: int) -> int:
    """How many timeline positions a layer keeps: all of them, or the last `sliding_window - 1`."""
    return min(length, layer.sliding_window - 1) if layer.is_sliding else length


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if width == 0 else torch.cat([t.new_zeros(*t.shape[:2], width, t.shape[3]), t], dim=2)


def place(cache, length: int, slots: list[int], other, other_length: int) -> int:
    """Write `other`'s rows into rows `slots` of `cache` (finished rows' places), both timelines aligned on their last
    position; returns the timeline's new length. A cache whose timeline is shorter than `other`'s first grows to the
    left (one copy); otherwise only the new rows are written, in place, and appends go on in the same buffers. Columns
    before a new row's first position keep the old row's states: the caller's attention mask hides them."""
    timeline = max(length, other_length)
    index = torch.tensor(slots, device=other.layers[0].keys.device)
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        if not (layer.is_initialized and extra.is_initialized):
            continue
        width = _stored(layer, timeline)
        for name in ("keys", "values"):
            mine, theirs = _left_pad(getattr(layer, name), width - getattr(layer, name).shape[2]), getattr(extra, name)
            mine[index, :, width - theirs.shape[2]:] = theirs
            setattr(layer, name, mine)
        if layer.is_sliding:
            layer.cumulative_length = timeline
    return timeline


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


def _columns(keys: torch.Tensor, buffer: torch.Tensor | None, length: int, start: int) -> torch.Tensor:
    """Timeline columns [start, length) of one layer's stored states; columns before the timeline are zeros, and a
    sliding window reaches back into its buffer for the columns it has just moved past."""
    first = length - keys.shape[2]  # the first column the layer keeps
    if start >= first:
        return keys[:, :, start - first:]
    zeros = keys.new_zeros(*keys.shape[:2], max(0, -start), keys.shape[3])
    back = first - max(start, 0)  # kept earlier columns, behind the view, in the buffer
    if back:
        end = _room_after(keys, buffer)
        if end is None or end - keys.shape[2] < back:
            raise RuntimeError(f"the cache no longer holds the {back} positions before its window")
        keys = buffer[:, :, end - keys.shape[2] - back:end]
    return torch.cat([zeros, keys], dim=2)


def realign(cache, length: int, junk: list[int]) -> int:
    """Drop row i's last `junk[i]` positions (rejected draft tokens) and right-align the rows again: row i moves right
    by `junk[i] - min(junk)` (left padding grows) and the timeline loses `min(junk)` columns. Returns its new length;
    the attention mask is realigned with `realign_mask`."""
    cut = min(junk)
    timeline, spread = length - cut, max(junk) - cut
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        keep = _stored(layer, timeline)
        for name, buffer in (("keys", "key_buffer"), ("values", "value_buffer")):
            both = _columns(getattr(layer, name), getattr(layer, buffer, None), length, timeline - keep - spread)
            setattr(layer, name, both[:, :, :keep] if not spread else  # a buffer view, where it was one: appends in place
                    torch.stack([both[i, :, spread - j + cut:spread - j + cut + keep] for i, j in enumerate(junk)]))
        if layer.is_sliding:
            layer.cumulative_length = timeline
    return timeline


def realign_mask(mask: torch.Tensor, junk: list[int]) -> torch.Tensor:
    """The 2-D attention mask of a cache that `realign` has just realigned."""
    cut = min(junk)
    return torch.stack([torch.cat([mask.new_zeros(j - cut), row[:row.shape[0] - j]]) for row, j in zip(mask, junk,
                                                                                                        strict=True)])
