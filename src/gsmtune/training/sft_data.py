"""GSM8K as tokenized training rows: the prompt tokens are exactly what evaluation feeds the model.

Tokenized here rather than by TRL so that training and evaluation share one BOS rule (`tokenize_prompt`) and the
prompt/answer boundary cannot shift when tokens merge across it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from gsmtune.data import Problem
from gsmtune.errors import GsmtuneError
from gsmtune.prompts import build_prompt, chat_messages, fit_system_role, tokenize_prompt


def completion_text(problem: Problem, cfg: DictConfig, tokenizer, prompt: str) -> str:
    """Raw text: ' <solution>' (EOS is added as a token). Chat: what the template writes for the reply, end of turn included."""
    if not cfg.prompt.chat_template:
        return " " + problem.answer
    instruction = cfg.prompt.instruction_text if cfg.prompt.instruction else None
    messages = fit_system_role(tokenizer, chat_messages(problem.question, [], instruction))
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": problem.answer}], tokenize=False)
    if not full.startswith(prompt):
        raise GsmtuneError("the chat template renders the prompt differently inside a conversation; use prompt.chat_template=false")
    return full[len(prompt):]


def sft_rows(problems: list[Problem], cfg: DictConfig, tokenizer) -> list[dict]:
    """`input_ids` + `completion_mask` rows for TRL's SFTTrainer: loss on the answer (and EOS / end of turn) only. Cut
    at `training.max_length` tokens as TRL would (`truncation_mode`), and a row left without answer tokens dropped, as
    TRL does: when padding-free, TRL leaves both to the caller."""
    cut = cfg.training.max_length
    keep = slice(-cut, None) if cfg.training.get("truncation_mode") == "keep_end" else slice(cut)
    rows = []
    for p in problems:
        prompt = build_prompt(p.question, cfg, [], tokenizer)
        prompt_ids = tokenize_prompt(prompt, tokenizer)
        answer_ids = tokenizer(completion_text(p, cfg, tokenizer, prompt), add_special_tokens=False)["input_ids"]
        if not cfg.prompt.chat_template:
            answer_ids.append(tokenizer.eos_token_id)
        mask = ([0] * len(prompt_ids) + [1] * len(answer_ids))[keep]
        if any(mask):
            rows.append({"input_ids": (prompt_ids + answer_ids)[keep], "completion_mask": mask})
    return rows
