"""Batched, left-padded generation with GSM8K stop rules (EOS, the '#### n' line, a new 'Question:')."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

_NEW_QUESTION = re.compile(r"\n\s*Question:")
_ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


@dataclass(frozen=True)
class StopRules:
    at_answer: bool = True
    at_new_question: bool = True

    def find(self, text: str) -> tuple[int, str] | None:
        """Where to cut `text` and why, at the earliest rule that fires; None to keep going."""
        hits = []
        if self.at_new_question and (m := _NEW_QUESTION.search(text)):
            hits.append((m.start(), "new_question"))
        if self.at_answer and (m := _ANSWER_LINE.search(text)):
            hits.append((m.end() - 1, "answer_line"))
        return min(hits) if hits else None


@dataclass
class Completion:
    text: str
    num_tokens: int
    stop_reason: str  # eos | answer_line | new_question | max_tokens
    calculator_calls: int = 0
    calculator_changed: int = 0  # calls whose forced result differed from what the model would have written


class _StopOnRules(StoppingCriteria):
    """Per-row stop for `generate`: decodes only rows still running (stop strings are regexes, not tokens)."""

    def __init__(self, tokenizer, prompt_len: int, rules: StopRules):
        self.tokenizer, self.prompt_len, self.rules = tokenizer, prompt_len, rules
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in torch.nonzero(~self.done).flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            if self.rules.find(text) is not None:
                self.done[row] = True
        return self.done.clone()


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


@torch.inference_mode()
def generate(model, tokenizer, batch: list[list[int]], gen_cfg, rules: StopRules, seed: int = 0) -> list[Completion]:
    """Generate for a batch of tokenized prompts; each completion is cut at its first stop rule."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask = left_pad(batch, pad_id)
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    eos_ids = stop_token_ids(tokenizer, model)
    sampling = {}
    if gen_cfg.do_sample:
        torch.manual_seed(seed)
        sampling = {"temperature": gen_cfg.temperature, "top_p": gen_cfg.top_p, "top_k": gen_cfg.top_k}
    calculator = None
    if gen_cfg.calculator:
        from transformers import LogitsProcessorList

        from gsmtune.calculator import CalculatorProcessor

        calculator = CalculatorProcessor(tokenizer, input_ids.shape[1], len(batch))
        sampling["logits_processor"] = LogitsProcessorList([calculator])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=gen_cfg.max_new_tokens,
        do_sample=gen_cfg.do_sample,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        stopping_criteria=StoppingCriteriaList([_StopOnRules(tokenizer, input_ids.shape[1], rules)]),
        **sampling,
    )
    new = out[:, input_ids.shape[1]:].tolist()
    completions = [_finish(tokenizer, row, set(eos_ids), pad_id, rules) for row in new]
    if calculator is not None:
        for c, calls, changed in zip(completions, calculator.calls, calculator.changed, strict=True):
            c.calculator_calls, c.calculator_changed = calls, changed
    return completions


def _finish(tokenizer, tokens: list[int], eos_ids: set[int], pad_id: int, rules: StopRules) -> Completion:
    """Cut one row at EOS or its stop rule and say why it ended; `generate` pads rows that stopped early."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids or t == pad_id), None)
    used = tokens if end is None else tokens[:end]
    text = tokenizer.decode(used, skip_special_tokens=True)
    stop = rules.find(text)
    if stop is not None:
        return Completion(text=text[: stop[0]], num_tokens=len(used), stop_reason=stop[1])
    if end is not None and tokens[end] in eos_ids:
        return Completion(text=text, num_tokens=len(used) + 1, stop_reason="eos")
    return Completion(text=text, num_tokens=len(used), stop_reason="max_tokens")
