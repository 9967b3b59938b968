import pytest
import torch
from conftest import oracle_drafts, sliding_model
from transformers import DynamicCache

from gsmtune.generation import (
    Completion,
    RowText,
    StopRules,
    _finish,
    first_max,
    generate,
    left_pad,
    stop_token_ids,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 3 + 4 = 7\n#### 7\nQuestion: next", (len(" 3 + 4 = 7\n#### 7"), "answer_line")),
        (" 3 + 4 = 7\n#### 7", None),  # the answer line is not finished yet: '#### 75' may follow
        (" 7 apples.\nQuestion: How many", (len(" 7 apples."), "new_question")),
        (" 7 apples.\n\nQuestion: How many", (len(" 7 apples."), "new_question")),
        (" The Question: is hard", None),  # only a new line that starts with Question: counts
        ("#### \n", None),  # no number on the line
        (" so $1,200.\n#### $1,200\n", (len(" so $1,200.\n#### $1,200"), "answer_line")),
    ],
)
def test_stop_rules(text, expected):
    assert StopRules().find(text) == expected


def test_stop_rules_can_be_switched_off():
    assert StopRules(at_answer=False).find("#### 7\n") is None
    assert StopRules(at_new_question=False).find("x\nQuestion: y") is None


@pytest.mark.parametrize("which", ["tiny", pytest.param("gemma", marks=pytest.mark.slow)])
def test_row_text_is_the_whole_row_decoded(which, tiny_tokenizer):
    """After every token, RowText's text is the whole-row decode (less a trailing incomplete character): a byte-level
    BPE, and Gemma's tokenizer (byte fallback, a space per word piece); random ids include specials and split bytes."""
    if which == "tiny":
        tok = tiny_tokenizer
    else:
        from transformers import AutoTokenizer

        from gsmtune.models import bundled_model_path

        tok = AutoTokenizer.from_pretrained(bundled_model_path("gemma-3-270m"))
    text = "Sam had $1,200 = <<1200/2=600>>600 \u2014 caf\u00e9 \u4e2d\u6587 \U0001f600.\n#### 750\nQuestion:"
    random = torch.randint(0, len(tok), (100, 30), generator=torch.Generator().manual_seed(0)).tolist()
    for tokens in [tok(text, add_special_tokens=False)["input_ids"], *random]:
        row = RowText(tok)
        for token in tokens:
            row.append(token)
            full = tok.decode(row.tokens, skip_special_tokens=True)
            assert row.text == full or (full.endswith("\ufffd") and full.startswith(row.text)), (row.tokens, row.text)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_finish_reasons(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rules = StopRules()
    assert _finish(tok, enc(" 3 + 4 = 7") + [eos], {eos}, rules) == Completion(" 3 + 4 = 7", len(enc(" 3 + 4 = 7")) + 1, "eos")
    ans = _finish(tok, enc(" 7\n#### 7\n"), {eos}, rules)
    assert (ans.text, ans.stop_reason) == (" 7\n#### 7", "answer_line")
    q = _finish(tok, enc(" 7\nQuestion: more"), {eos}, rules)
    assert (q.text, q.stop_reason) == (" 7", "new_question")
    cut = _finish(tok, enc(" 1 2 3 4"), {eos}, rules)
    assert (cut.text, cut.stop_reason, cut.num_tokens) == (" 1 2 3 4", "max_tokens", len(enc(" 1 2 3 4")))


def test_stop_token_ids_include_end_of_turn(tiny_tokenizer):
    assert set(stop_token_ids(tiny_tokenizer)) == {tiny_tokenizer.eos_token_id,
                                                   tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")}


def test_batched_generation_matches_one_by_one(tiny_model_dir, tiny_tokenizer):
    """Left padding must not change greedy outputs: each row equals its own unbatched run."""
    from transformers import AutoModelForCausalLM

    from gsmtune.config import load_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = load_config(None, ["generation.max_new_tokens=12"]).generation
    prompts = [[tiny_tokenizer.bos_token_id, *tiny_tokenizer(t, add_special_tokens=False)["input_ids"]]
               for t in ["Question: Tom has 3 apples\nAnswer:", "Question: A box\nAnswer:"]]
    batched = generate(model, tiny_tokenizer, prompts, gen, StopRules())
    single = [generate(model, tiny_tokenizer, [p], gen, StopRules())[0] for p in prompts]
    assert batched == single
    assert all(c.num_tokens <= 12 for c in batched)


def test_greedy_matches_hf_generate_and_finished_rows_leave(tiny_model_dir, tiny_tokenizer):
    """Our decode loop gives HF `generate`'s greedy tokens, and a row that hits EOS leaves the running batch."""
    from transformers import AutoModelForCausalLM

    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = load_config(None, ["generation.max_new_tokens=10"]).generation
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]
               for t in ["Question: Tom has 3 apples\nAnswer:", "Question: A box\nAnswer:", "Question: 7\nAnswer:"]]
    none = StopRules(at_answer=False, at_new_question=False)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               eos_token_id=[], pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    ours = generate(model, tok, prompts, gen, none)
    assert [c.text for c in ours] == [tok.decode(r, skip_special_tokens=True) for r in reference.tolist()]

    original, widths = model.forward, []

    def eos_in_row_1_at_step_3(*args, **kwargs):
        out = original(*args, **kwargs)
        widths.append(out.logits.shape[0])
        if len(widths) == 3:
            out.logits[1, -1, :] = -1e4
            out.logits[1, -1, tok.eos_token_id] = 0.0
        return out

    model.forward = eos_in_row_1_at_step_3
    cut = generate(model, tok, prompts, gen, none)
    assert widths == [3, 3, 3] + [2] * 7
    assert (cut[1].stop_reason, cut[1].num_tokens) == ("eos", 3)
    assert [cut[0].text, cut[2].text] == [ours[0].text, ours[2].text]


def test_continuous_batching_matches_one_by_one(tiny_tokenizer, monkeypatch):
    """Rows finish at different steps, waiting prompts join the running batch, padding columns are trimmed, and the
    timeline outgrows the sliding window: every completion still equals its prompt run alone."""
    from gsmtune import generation
    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1)
    texts = ["Question: Tom has 3 apples and 4 pears\nAnswer:", "Question: A box\nAnswer:", "Question: 7\nAnswer:",
             "Question: Sara buys 12 eggs at $2 each\nAnswer:", "Question: half of 10\nAnswer:"]
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    gen, none = load_config(None, ["generation.max_new_tokens=14"]).generation, StopRules(False, False)
    alone = [generate(model, tok, [p], gen, none)[0] for p in prompts]
    assert {c.stop_reason for c in alone} == {"eos", "max_tokens"}  # this seed's rows end at different steps

    seen = {"place": 0, "trim": 0, "timeline": 0}
    place, trim = generation.place, generation.trim

    def counting_place(cache, length, slots, other, other_length):
        seen["place"] += 1
        return place(cache, length, slots, other, other_length)

    def counting_trim(cache, length, columns):
        seen["trim"] += 1
        seen["timeline"] = max(seen["timeline"], length)
        trim(cache, length, columns)

    monkeypatch.setattr(generation, "place", counting_place)
    monkeypatch.setattr(generation, "trim", counting_trim)
    together = dict(generation.stream(model, tok, prompts, gen, none, batch_size=2))
    assert [together[i] for i in range(len(prompts))] == alone
    assert seen["place"] >= 1 and seen["trim"] >= 1 and seen["timeline"] > 6


def test_a_repeated_prompt_is_prefilled_once(tiny_model_dir, tiny_tokenizer):
    """Self-consistency's k copies of a prompt share one prefill; each copy still decodes as the prompt alone."""
    from transformers import AutoModelForCausalLM

    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = load_config(None, ["generation.max_new_tokens=8"]).generation
    a, b = ([tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in ["Question: 7\nAnswer:", "Q: 12"])
    original, rows_fed = model.forward, []

    def counting(*args, **kwargs):
        rows_fed.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    model.forward = counting
    together = generate(model, tok, [a, b, a, a], gen, StopRules(False, False))
    assert rows_fed[0][0] == 2  # two distinct prompts prefilled, four rows decoded
    assert rows_fed[1][0] == 4
    model.forward = original
    assert together == [generate(model, tok, [p], gen, StopRules(False, False))[0] for p in (a, b, a, a)]


def test_checked_drafts_give_the_tokens_of_plain_decoding(tiny_tokenizer, monkeypatch):
    """Tail steps check tokens looked up in each row: rows accept different numbers of them, the cache is realigned
    past the sliding window; completions equal plain decoding's, in fewer model calls. While prompts wait (finished
    rows hold their places for them) no drafts are checked."""
    from gsmtune import generation
    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1)
    texts = ["Question: Tom has 3 apples and 4 pears\nAnswer:", "Question: A box\nAnswer:", "Question: 7\nAnswer:",
             "Question: Sara buys 12 eggs at $2 each\nAnswer:", "Question: half of 10\nAnswer:", "1 2 1 2 1 2 1 2"]
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    calls, drafts, places, forward, draft, place = [], [], [], model.forward, generation.Lookup.draft, generation.place
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    monkeypatch.setattr(generation.Lookup, "draft", lambda self, k: drafts.append(len(d := draft(self, k))) or d)
    monkeypatch.setattr(generation, "place", lambda *a: places.append(sum(drafts)) or place(*a))
    runs = {}
    for depth in (0, 8):
        gen = load_config(None, ["generation.max_new_tokens=30", f"generation.draft_tokens={depth}"]).generation
        calls.clear()
        drafts.clear()
        done = dict(generation.stream(model, tok, prompts, gen, StopRules(False, False), batch_size=4))
        runs[depth] = done, len(calls), sum(drafts)
    assert runs[8][0] == runs[0][0]
    assert places and max(places) == 0  # prompts joined, and no draft was checked before the last did
    assert {c.stop_reason for c in runs[0][0].values()} == {"eos", "max_tokens"}
    assert runs[0][2] == 0 < runs[8][2] and runs[8][1] < runs[0][1]


def test_drafts_by_default_in_bf16_only(tiny_tokenizer):
    from types import SimpleNamespace

    from gsmtune.generation import _draft_tokens

    model = sliding_model(tiny_tokenizer, seed=0)
    auto, fixed = SimpleNamespace(draft_tokens=None), SimpleNamespace(draft_tokens=3)
    assert (_draft_tokens(model, auto), _draft_tokens(model, fixed), _draft_tokens(model, SimpleNamespace())) == (0, 3, 0)
    assert _draft_tokens(model.to(torch.bfloat16), auto) == 8


def test_rows_that_end_inside_accepted_drafts_leave_a_realigned_cache(tiny_tokenizer, monkeypatch):
    """Drafts from an oracle (each row's true continuation, some cut short or with one wrong token): every step keeps a
    different number per row, rows end inside accepted drafts at max_new_tokens while others go on past the sliding
    window; completions still equal plain decoding's."""
    from gsmtune import generation
    from gsmtune.config import load_config

    tok = tiny_tokenizer
    model = sliding_model(tok, seed=1)
    texts = ["Question: Tom has 3 apples and 4 pears\nAnswer:", "Question: A box\nAnswer:", "Question: 7\nAnswer:",
             "Question: Sara buys 12 eggs at $2 each\nAnswer:", "Question: half of 10\nAnswer:", "1 2 1 2 1 2 1 2"]
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    plain = load_config(None, ["generation.max_new_tokens=30", "generation.draft_tokens=0"]).generation
    want = dict(generation.stream(model, tok, prompts, plain, StopRules(False, False), batch_size=4))
    calls = []

    events, realign = [], generation.realign
    monkeypatch.setattr(generation.Lookup, "draft", oracle_drafts(prompts, want, calls))
    monkeypatch.setattr(generation, "realign", lambda cache, length, junk: events.append(len(junk)) or
                        realign(cache, length, junk))
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, index: events.append(-len(index)) or
                        select(self, index))
    gen = load_config(None, ["generation.max_new_tokens=30", "generation.draft_tokens=8"]).generation
    assert dict(generation.stream(model, tok, prompts, gen, StopRules(False, False), batch_size=12)) == want
    assert sum(calls) > 30
    # rows ended inside accepted drafts: a realign of n rows followed at once by a selection of fewer
    assert any(0 < a and -b < a for a, b in zip(events, events[1:], strict=False) if b < 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_max_is_argmax_with_ties(dtype):
    """Blocked search gives max(-1).indices' answer, the first maximum, ties within and across blocks included."""
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 8 * 16).to(dtype)
    logits[0, 0, [5, 9, 100]] = 9.0  # a tie inside the first block and another block
    logits[1, 2, [40, 127]] = 9.0  # across blocks, the first not in block 0
    logits[2, 1] = 1.0  # all equal: index 0
    for x in (logits, logits[:, -1], logits[:, 1:].transpose(0, 1)):
        assert torch.equal(first_max(x, block=16), x.max(-1).indices)
    assert torch.equal(first_max(logits[..., :100], block=16), logits[..., :100].max(-1).indices)  # no whole blocks
