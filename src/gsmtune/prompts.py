"""Prompt strategies (zero-, one-, few-shot, with or without instruction), raw text or chat template, one BOS."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from gsmtune.errors import GsmtuneError

# The one-shot example: the first GSM8K train problem. Its answer as the reference study wrote it (the default), or
# GSM8K's own gold solution with calculator annotations (`prompt.one_shot_example=gsm8k`).
ONE_SHOT_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
ONE_SHOT_ANSWERS = {
    "study": ("Natalia sold 48 clips in April.\n"
              "In May, she sold half as many clips as in April, so she sold 48 / 2 = 24 clips.\n"
              "Altogether, Natalia sold 48 + 24 = 72 clips.\n#### 72"),
    "gsm8k": ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"),
}


@dataclass(frozen=True)
class Shot:
    question: str
    answer: str


def shots_for(prompt: DictConfig, train: list | None) -> list[Shot]:
    """The worked examples a strategy puts before the question."""
    if prompt.strategy == "zero_shot":
        return []
    if prompt.strategy == "one_shot":
        return [Shot(ONE_SHOT_QUESTION, ONE_SHOT_ANSWERS[prompt.one_shot_example])]
    if not train:
        raise GsmtuneError("few_shot needs the train split for its examples")
    return [Shot(p.question, p.answer) for p in train[: prompt.num_shots]]


def raw_prompt(question: str, prompt_format: str, shots: list[Shot], instruction: str | None) -> str:
    """`[instruction\\n\\n]Question: q1\\nAnswer: a1\\n\\n...Question: q\\nAnswer:`."""
    parts = [instruction] if instruction else []
    parts += [prompt_format.format(question=s.question) + " " + s.answer for s in shots]
    parts.append(prompt_format.format(question=question))
    return "\n\n".join(parts)


def chat_messages(question: str, shots: list[Shot], instruction: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": instruction}] if instruction else []
    for s in shots:
        messages += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": question})
    return messages


def fit_system_role(tokenizer, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Templates without a system role (Gemma 1/2) get the instruction at the start of the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages
    except Exception:  # jinja raises TemplateError("System role not supported")
        system, first, *rest = messages
        return [{"role": "user", "content": system["content"] + "\n\n" + first["content"]}, *rest]


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(fit_system_role(tokenizer, messages), tokenize=False, add_generation_prompt=True)


def build_prompt(question: str, cfg: DictConfig, shots: list[Shot], tokenizer=None) -> str:
    instruction = cfg.prompt.instruction_text if cfg.prompt.instruction else None
    if cfg.prompt.chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise GsmtuneError("prompt.chat_template=true but the tokenizer has no chat template; set it to false")
        return chat_prompt(tokenizer, chat_messages(question, shots, instruction))
    return raw_prompt(question, cfg.dataset.prompt_format, shots, instruction)


def tokenize_prompt(text: str, tokenizer) -> list[int]:
    """Token ids starting with exactly one BOS: Gemma scores near zero without it, and templates may write one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    while ids and ids[0] == bos:
        ids = ids[1:]
    return [bos, *ids]
