"""Continuously batched, left-padded generation with GSM8K stop rules (EOS, the '#### n' line, a new 'Question:')."""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gsmtune.batch_invariance import batch_invariant
from gsmtune.calculator import Calculator
from gsmtune.gsm8k_format import ANSWER_LINE, NEW_QUESTION
from gsmtune.kv_cache import new_cache, place, realign, realign_mask, supports_joining, trim
from gsmtune.output_screen import screened_output_layer
from gsmtune.packed_lora import packed_lora
from gsmtune.packed_weights import packed_linears
from gsmtune.prompt_lookup import Lookup


@dataclass(frozen=True)
class StopRules:
    at_answer: bool = True
    at_new_question: bool = True

    def find(self, text: str) -> tuple[int, str] | None:
        """Where to cut `text` and why, at the earliest rule that fires; None to keep going."""
        hits = []
        if self.at_new_question and (m := NEW_QUESTION.search(text)):
            hits.append((m.start(), "new_question"))
        if self.at_answer and (m := ANSWER_LINE.search(text)):
            hits.append((m.end() - 1, "answer_line"))
        return min(hits) if hits else None


class RowText:
    """A row's generated tokens and their text, extended per token by decoding only the last few tokens.

    Decoding the whole row at every step (for the stop rules and the calculator) cost more than the model's step at
    long rows. The two-offset scheme is vLLM's incremental detokenizer: the text two decodes of a short window differ
    by is appended once it no longer ends in an incomplete character. The text equals decoding all tokens at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # window start; end of the tokens already turned into text
        self._before = ""  # the decode of tokens[_prefix:_read]: it changes only when the offsets move

    def append(self, token: int) -> None:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) > len(self._before) and not after.endswith("\ufffd"):
            self.text += after[len(self._before):]
            self._prefix, self._read = self._read, len(self.tokens)
            self._before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)


@dataclass
class Completion:
    text: str
    num_tokens: int
    stop_reason: str  # eos | answer_line | new_question | max_tokens
    calculator_calls: int = 0
    calculator_changed: int = 0  # calls whose forced result differed from what the model would have written
    token_ids: list[int] = field(default_factory=list, repr=False, compare=False)  # all sampled, EOS too (for GRPO)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS plus end-of-turn tokens (chat models end a reply with them, not with EOS)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


def _sampler(gen_cfg):
    """HF's own warpers for temperature / top-k / top-p; None for greedy."""
    if not gen_cfg.do_sample:
        return None
    warpers = [TemperatureLogitsWarper(gen_cfg.temperature)]
    if gen_cfg.top_k:
        warpers.append(TopKLogitsWarper(gen_cfg.top_k))
    if gen_cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen_cfg.top_p))
    return LogitsProcessorList(warpers)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF, from one uniform in (0, 1] per row. Each row's token depends on its own
    uniform only; torch.multinomial draws every row from one generator, so a row's sample changed with the batch."""
    cdf = probs.double().cumsum(-1)  # float64: a 262k-token tail's tiny probabilities still add up
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def first_max(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The index of each last-dim row's first maximum (argmax's answer). torch's index-carrying reductions run scalar
    on CPU (`max(-1).indices`: ~8 ms a batch-32 step over Gemma's 262k bf16 logits; argmax 2.6x that): here the
    vectorized `amax` over `block`-wide blocks finds the first block holding the maximum, and only that block is
    searched with indices."""
    *lead, vocab = logits.shape
    if vocab % block or vocab == block:
        return logits.max(-1).indices
    blocks = logits.reshape(-1, vocab // block, block)
    first = blocks.amax(-1).max(-1).indices  # the first block holding the row's maximum
    within = blocks[torch.arange(blocks.shape[0], device=logits.device), first].max(-1).indices
    return (first * block + within).reshape(lead)


def sample(logits: torch.Tensor, warpers: LogitsProcessorList, top_k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """One sampled token per row. With top-k the warpers, softmax and draw see each row's k best logits only: the
    distribution of HF's warpers over the whole vocabulary (bar ties at the k-th, which topk breaks), without a
    softmax and CDF over 262k tokens at every step (host time ~15 -> 3 ms a step, BENCHMARKS.md)."""
    scores = logits.float()
    if top_k:
        scores, index = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    chosen = draw(torch.softmax(warpers(None, scores), dim=-1), uniforms)
    return index.gather(1, chosen[:, None]).squeeze(1) if top_k else chosen


def _prefill(model, prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Run left-padded prompts through the model: next-token logits, their cache and attention mask.

    A prompt that comes several times (self-consistency's k samples) runs once; its cache rows are copied.
    """
    unique = list(dict.fromkeys(map(tuple, prompts)))
    input_ids, mask = (t.to(device) for t in left_pad([list(p) for p in unique], pad_id))
    cache = new_cache(model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1, :]
    if len(unique) < len(prompts):
        where = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([where[tuple(p)] for p in prompts], device=device)
        cache.batch_select_indices(index)
        logits, mask = logits[index], mask[index]
    return logits, cache, mask


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)


def stream(model, tokenizer, prompts: list[list[int]], gen_cfg, rules: StopRules, seed: int = 0,
           batch_size: int | None = None, on_text: Callable[[int, str], None] | None = None,
           sample_keys: list | None = None) -> Iterator[tuple[int, Completion]]:
    """Yield (prompt index, completion) as rows finish, each cut at its first stop rule; `on_text(row, text)` sees
    each row's text as it grows (before the cut).

    Sampling gives each row its own random stream, seeded by `seed` and the row's key (`sample_keys`, default its
    index): a row's draws then do not depend on the other rows or on a resume (with float32 logits its samples were
    the same at batch 1, 4 and 6 in the tests; bf16 logits move with the batch).

    Our own decode loop on HF's KV cache because `generate` keeps finished rows in the batch until its longest row is
    done (GSM8K rows stop at very different lengths). Here a finished row's place in the batch and its cache goes to a
    waiting prompt (continuous batching; written in place, no running row copied), so up to `batch_size` rows are
    always decoding; once none wait, finished rows leave at once.
    bf16 linear layers on CPU multiply by weights packed for oneDNN (`packed_weights`: the same bits, less time);
    outside the batch-invariant mode an unmerged LoRA adapter's layers run as packed products too (`packed_lora`).
    Float32 greedy or top-k decoding on CPU screens the output layer in bf16 (`output_screen`: the same tokens).
    Greedy decoding without the calculator checks drafts once few rows are left (`_draft_tokens`): each row
    feeds up to that many tokens looked up in its own text (`prompt_lookup`) after its chosen one, within a full
    batch's positions a step (one row: its full draft), and keeps those the model would have chosen next.
    """
    sampler = _sampler(gen_cfg)
    keys = sample_keys if sample_keys is not None else range(len(prompts))
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} sample keys for {len(prompts)} prompts: give one key per prompt")
    streams = [random.Random(f"{seed}/{key}") for key in keys] if sampler is not None else None
    mode = getattr(gen_cfg, "batch_invariant", False)
    invariant = batch_invariant(model) if mode else contextlib.nullcontext()
    adapter = contextlib.nullcontext() if mode else packed_lora(model)
    with (packed_linears(model), invariant, adapter,
          screened_output_layer(model, None if sampler is None else gen_cfg.top_k or 0)):
        yield from _decode(model, tokenizer, prompts, gen_cfg, rules, sampler, streams, batch_size, on_text)


@torch.inference_mode()
def _decode(model, tokenizer, prompts: list[list[int]], gen_cfg, rules: StopRules, sampler,
            streams: list[random.Random] | None, batch_size: int | None,
            on_text: Callable[[int, str], None] | None) -> Iterator[tuple[int, Completion]]:
    batch_size = batch_size or len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    eos_ids = set(stop_token_ids(tokenizer, model))
    calculator = Calculator(tokenizer, len(prompts)) if gen_cfg.calculator else None
    joinable = supports_joining(new_cache(model.config))  # a property of the model: decided once
    most_drafts = _draft_tokens(model, gen_cfg) if sampler is None and calculator is None and joinable else 0
    drafting = most_drafts > 0
    waiting = deque(range(len(prompts)))
    texts: dict[int, RowText] = {}
    lookups: dict[int, Lookup] = {}
    rows: list[int | None] = []  # the prompt index of each row of the running batch; None: a finished row's place
    cache, mask, logits = None, None, None

    def take(row: int, token: int) -> Completion | None:
        """Append one chosen token to a row; its completion if that ended it."""
        text = texts[row]
        if calculator is not None:
            token = calculator.next_token(row, text.text, token)
        text.append(token)
        if drafting:
            lookups[row].extend([token])
        if on_text is not None:
            on_text(row, text.text)
        if token in eos_ids or len(text.tokens) >= gen_cfg.max_new_tokens or rules.find(text.text) is not None:
            done = _finish(tokenizer, texts.pop(row).tokens, eos_ids, rules)
            lookups.pop(row, None)
            if calculator is not None:
                done.calculator_calls, done.calculator_changed = calculator.calls[row], calculator.changed[row]
            return done
        return None

    def select(keep: list[int]) -> None:
        """Finished rows leave the batch and the cache (a copy of every row kept)."""
        nonlocal rows, mask
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
            rows = [rows[pos] for pos in keep]

    while waiting or rows:
        places = [pos for pos, row in enumerate(rows) if row is None]  # finished rows', kept while prompts wait
        if waiting and (not rows or (len(places) >= max(1, batch_size // 4) and joinable)):
            joining = [waiting.popleft() for _ in range(min(len(places) or batch_size, len(waiting)))]
            fresh_logits, fresh_cache, fresh_mask = _prefill(model, [prompts[i] for i in joining], pad_id, device)
            if rows:  # into finished rows' places: written in place, the running rows are not copied
                places = places[:len(joining)]
                width = place(cache, mask.shape[1], places, fresh_cache, fresh_mask.shape[1])
                mask = _left_pad_mask(mask, width)
                mask[places] = _left_pad_mask(fresh_mask, width)
                logits[places] = fresh_logits
                for pos, row in zip(places, joining, strict=True):
                    rows[pos] = row
            else:
                cache, mask, logits, rows = fresh_cache, fresh_mask, fresh_logits, joining
            texts.update({i: RowText(tokenizer) for i in joining})
            if drafting:
                lookups.update({i: Lookup(prompts[i]) for i in joining})
        if sampler is None:
            chosen = first_max(logits)
        else:
            uniforms = torch.tensor([1.0 if row is None else 1.0 - streams[row].random() for row in rows],
                                    dtype=torch.float64)
            chosen = sample(logits, sampler, gen_cfg.top_k, uniforms)
        # while prompts wait, a finished row keeps its place (fed padding) until a joining prompt takes it: rows
        # leaving and joining then copy no running row's cache
        holding = bool(waiting) and joinable
        keep, next_tokens = [], []
        for pos, (row, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):
            done = None if row is None else take(row, token)
            if done is not None:
                yield row, done
                rows[pos] = None
            if rows[pos] is not None or holding:
                keep.append(pos)
                next_tokens.append(pad_id if rows[pos] is None else texts[row].tokens[-1])
        if all(row is None for row in rows):
            rows, cache, mask, logits = [], None, None, None
            continue
        select(keep)
        padding = int(mask.any(0).long().argmax())  # leading positions that are padding in every row
        if padding and joinable:
            trim(cache, mask.shape[1], padding)
            mask = mask[:, padding:]
        # tail steps (few rows) check drafts too, up to a full batch's positions (at least one row's full draft): in
        # bf16, 4 rows x 5 positions took 75-77 ms against 56-58 for a plain step of 6 rows (BENCHMARKS.md)
        depth = min(most_drafts, max(batch_size, most_drafts + 1) // len(rows) - 1) if drafting and not holding else 0
        drafts = [lookups[row].draft(depth) for row in rows] if depth > 0 else []
        width = max(map(len, drafts), default=0)
        inputs = torch.tensor([[t, *d, *[pad_id] * (width - len(d))] for t, d in
                               zip(next_tokens, drafts or [[]] * len(rows), strict=True)], device=device)
        positions = mask.sum(-1, keepdim=True) + torch.arange(width + 1, device=device)
        mask = torch.cat([mask, mask.new_ones(len(rows), width + 1)], dim=1)
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits
        if not width:
            logits = logits[:, -1, :]
            continue
        checked = first_max(logits).tolist()
        keep, junk = [], [width] * len(rows)  # a row that ends here leaves; its junk must not shrink the others' cut
        for pos, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
            accepted = 0
            while accepted < len(draft) and draft[accepted] == checked[pos][accepted]:
                done = take(row, draft[accepted])
                accepted += 1
                if done is not None:
                    yield row, done
                    break
            else:
                keep.append(pos)
                junk[pos] = width - accepted
        if not keep:
            rows, cache, mask, logits = [], None, None, None
            continue
        logits = logits[keep, [width - junk[pos] for pos in keep]]
        realign(cache, mask.shape[1], junk)  # before rows leave: selecting rows copies a window without its buffer
        mask = realign_mask(mask, junk)
        select(keep)


def _draft_tokens(model, gen_cfg) -> int:
    """Drafts a row may check a step: `generation.draft_tokens`, or by default 8 where the output layer computes in
    bf16/fp16 and none in float32, where the extra positions cost more than they save on a CPU (BENCHMARKS.md). A
    generation config without the key (a caller's own) gets the default."""
    wanted = getattr(gen_cfg, "draft_tokens", None)
    if wanted is not None:
        return wanted
    return 8 if model.get_output_embeddings().weight.dtype in (torch.bfloat16, torch.float16) else 0


def generate(model, tokenizer, batch: list[list[int]], gen_cfg, rules: StopRules, seed: int = 0) -> list[Completion]:
    """Completions for one batch of tokenized prompts, in order (rows still leave the batch as they finish)."""
    done = dict(stream(model, tokenizer, batch, gen_cfg, rules, seed))
    return [done[i] for i in range(len(batch))]


def _finish(tokenizer, tokens: list[int], eos_ids: set[int], rules: StopRules) -> Completion:
    """Cut one row at EOS or its stop rule and say why it ended."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    used = tokens if end is None else tokens[:end]
    text = tokenizer.decode(used, skip_special_tokens=True)
    stop = rules.find(text)
    if stop is not None:
        return Completion(text=text[: stop[0]], num_tokens=len(used), stop_reason=stop[1], token_ids=tokens)
    if end is not None:
        return Completion(text=text, num_tokens=len(used) + 1, stop_reason="eos", token_ids=tokens)
    return Completion(text=text, num_tokens=len(used), stop_reason="max_tokens", token_ids=tokens)
