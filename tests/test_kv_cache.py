import pytest
import torch
from conftest import sliding_model
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from gsmtune.kv_cache import SPARE, GrowingLayer, GrowingSlidingWindowLayer, new_cache, supports_joining, trim


def states(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 1, length, 4), torch.randn(rows, 1, length, 4)


@pytest.mark.parametrize("window", [None, 8])
def test_growing_layers_return_and_keep_what_transformers_layers_do(window):
    """Same states, mask sizes and stored window as transformers' layers, through prefill, steps past the spare room,
    a padding trim and a row leaving."""
    torch.manual_seed(0)
    if window is None:
        ours, theirs = GrowingLayer(), DynamicLayer()
    else:
        ours, theirs = GrowingSlidingWindowLayer(sliding_window=window), DynamicSlidingWindowLayer(sliding_window=window)
    for step in range(SPARE + 40):
        k, v = states(3 if step < 100 else 2, 5 if step == 0 else 1)
        if step == 100:  # the first row leaves the batch
            for layer in (ours, theirs):
                layer.batch_select_indices(torch.tensor([1, 2]))
        for got, want in zip(ours.update(k, v), theirs.update(k, v), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        if window is None and step == 50:  # two padding columns dropped (the decode loop's trim)
            ours.keys, ours.values = ours.keys[:, :, 2:], ours.values[:, :, 2:]
            theirs.keys, theirs.values = theirs.keys[:, :, 2:], theirs.values[:, :, 2:]


def test_appends_write_into_the_same_buffer_until_it_is_full():
    layer = GrowingLayer()
    layer.update(*states(2, 4))
    buffer = layer.key_buffer
    assert buffer.shape[2] == 4 + SPARE
    for _ in range(SPARE):
        layer.update(*states(2, 1))
        assert layer.key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()
    layer.update(*states(2, 1))  # one past the room: a new, larger buffer
    assert layer.key_buffer is not buffer and layer.keys.shape[2] == 4 + SPARE + 1


def test_a_trimmed_cache_keeps_its_buffer(tiny_model_dir):
    """Dropping padding columns is a view of the buffer: the next append still writes in place."""
    from transformers import AutoConfig

    cache = new_cache(AutoConfig.from_pretrained(tiny_model_dir))
    assert supports_joining(cache)
    assert {type(layer) for layer in cache.layers} <= {GrowingLayer, GrowingSlidingWindowLayer}
    layer = cache.layers[0]
    layer.update(*states(2, 10))
    buffer = layer.key_buffer
    trim(cache, 10, 3)
    layer.update(*states(2, 1))
    assert layer.key_buffer is buffer and layer.keys.shape[2] == 8


def test_long_greedy_decoding_matches_hf_generate(tiny_tokenizer):
    """Past the spare room and the sliding window, the decode loop on growing layers gives HF `generate`'s tokens."""
    from gsmtune.config import load_config
    from gsmtune.generation import StopRules, generate, left_pad, stop_token_ids

    tok = tiny_tokenizer
    model = sliding_model(tok, seed=2)
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]
               for t in ["Question: Tom has 3 apples\nAnswer:", "Question: 7\nAnswer:"]]
    steps = SPARE + 30
    ids, mask = left_pad(prompts, tok.pad_token_id)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                               eos_token_id=[], pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    gen = load_config(None, [f"generation.max_new_tokens={steps}"]).generation
    ours = generate(model, tok, prompts, gen, StopRules(False, False))
    stops = set(stop_token_ids(tok, model))
    until_stop = [r[:next((i for i, t in enumerate(r) if t in stops), len(r))] for r in reference.tolist()]
    assert max(c.num_tokens for c in ours) == steps  # at least one row decodes past the spare room
    assert [c.text for c in ours] == [tok.decode(r, skip_special_tokens=True) for r in until_stop]


@pytest.mark.parametrize("window", [None, 6])
def test_realign_keeps_each_rows_accepted_positions_right_aligned(window):
    """Rows checked 3 draft positions and kept 0, 2 and 3 of them: after `realign` each row holds, right-aligned, the
    states of a cache that only ever got its kept positions (sliding windows reach back into their buffer)."""
    from gsmtune.kv_cache import realign, realign_mask

    torch.manual_seed(0)
    make = (lambda: GrowingLayer()) if window is None else (lambda: GrowingSlidingWindowLayer(sliding_window=window))
    ours, rows = make(), [make() for _ in range(3)]
    prompt, steps = states(3, 7), [states(3, 1) for _ in range(3)]
    ours.update(*prompt)
    for row, layer in enumerate(rows):
        layer.update(prompt[0][row:row + 1], prompt[1][row:row + 1])
    for k, v in steps[:-1]:  # two plain steps, then a checked draft of 3
        ours.update(k, v)
        for row, layer in enumerate(rows):
            layer.update(k[row:row + 1], v[row:row + 1])
    drafted = states(3, 4)
    ours.update(*drafted)
    kept = [0, 2, 3]
    for row, layer in enumerate(rows):
        layer.update(drafted[0][row:row + 1, :, :1 + kept[row]], drafted[1][row:row + 1, :, :1 + kept[row]])
    cache = type("Cache", (), {"layers": [ours]})()
    junk = [3 - k for k in kept]
    length = 7 + 2 + 4
    before = torch.arange(1, 3 * length + 1).reshape(3, length)
    mask = realign_mask(before, junk)
    assert realign(cache, length, junk) == length - min(junk) == mask.shape[1]
    for row, layer in enumerate(rows):
        n = layer.keys.shape[2]
        shift = junk[row] - min(junk)  # the row's kept columns, right-aligned behind zeros
        assert mask[row].tolist() == [0] * shift + before[row, :length - junk[row]].tolist()
        assert ours.keys.shape[2] == min(length - min(junk), window - 1 if window else length)
        torch.testing.assert_close(ours.keys[row:row + 1, :, -n:], layer.keys[:, :, -n:], rtol=0, atol=0)
        torch.testing.assert_close(ours.values[row:row + 1, :, -n:], layer.values[:, :, -n:], rtol=0, atol=0)
    k, v = states(3, 1)  # decoding goes on from the realigned states
    ours.update(k, v)
    for row, layer in enumerate(rows):
        layer.update(k[row:row + 1], v[row:row + 1])
        torch.testing.assert_close(ours.keys[row:row + 1, :, -layer.keys.shape[2]:], layer.keys, rtol=0, atol=0)
        torch.testing.assert_close(ours.values[row:row + 1, :, -layer.values.shape[2]:], layer.values, rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 8])
def test_place_writes_new_rows_into_finished_rows_in_place(window):
    """A shorter newcomer goes right-aligned into its row of the same buffer (the other rows untouched, the next append
    still in place); a longer one first widens the timeline to the left."""
    from types import SimpleNamespace

    from gsmtune.kv_cache import place

    def cache_of(rows: int, length: int):
        layer = GrowingLayer() if window is None else GrowingSlidingWindowLayer(sliding_window=window)
        layer.update(*states(rows, length))
        return SimpleNamespace(layers=[layer])

    torch.manual_seed(0)
    main, short, long = cache_of(3, 10), cache_of(1, 4), cache_of(1, 12)
    layer = main.layers[0]
    kept, buffer = layer.keys[[0, 2]].clone(), layer.key_buffer
    assert place(main, 10, [1], short, 4) == 10
    assert layer.keys.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(layer.keys[[0, 2]], kept)
    assert torch.equal(layer.keys[1, :, -4:], short.layers[0].keys[0])
    layer.update(*states(3, 1))
    assert layer.key_buffer is buffer  # appends go on in the same buffer
    stored, other = layer.keys.shape[2], layer.keys[2].clone()
    assert place(main, 11, [0], long, 12) == 12
    width = 12 if window is None else window - 1
    assert layer.keys.shape[2] == width >= stored
    assert torch.equal(layer.keys[0, :, -long.layers[0].keys.shape[2]:], long.layers[0].keys[0])
    assert torch.equal(layer.keys[2, :, -stored:], other)  # the running row kept, right-aligned
    assert not layer.keys[2, :, :width - stored].any()  # behind it, the new columns: zeros
