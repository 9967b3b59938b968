import pytest

from gsmtune.config import REFERENCE_INSTRUCTION, load_config
from gsmtune.data import Problem
from gsmtune.errors import GsmtuneError
from gsmtune.prompts import ONE_SHOT_ANSWERS, ONE_SHOT_QUESTION, build_prompt, shots_for, tokenize_prompt

Q = "How many legs do 3 cats have?"
ONE_SHOT_ANSWER = ONE_SHOT_ANSWERS["study"]  # the default
NATALIA = f"Question: {ONE_SHOT_QUESTION}\nAnswer: {ONE_SHOT_ANSWER}"
TRAIN = [Problem(0, "One plus one?", "1+1=2\n#### 2"), Problem(1, "Two times three?", "2*3=6\n#### 6"),
         Problem(2, "Ten minus four?", "10-4=6\n#### 6")]


def prompt_for(*overrides, tokenizer=None):
    cfg = load_config(None, list(overrides))
    return build_prompt(Q, cfg, shots_for(cfg.prompt, TRAIN), tokenizer)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), f"Question: {Q}\nAnswer:"),
        (("prompt.instruction=true",), f"{REFERENCE_INSTRUCTION}\n\nQuestion: {Q}\nAnswer:"),
        (("prompt.strategy=one_shot",), f"{NATALIA}\n\nQuestion: {Q}\nAnswer:"),
        (("prompt.strategy=one_shot", "prompt.instruction=true"),
         f"{REFERENCE_INSTRUCTION}\n\n{NATALIA}\n\nQuestion: {Q}\nAnswer:"),
        (("prompt.strategy=few_shot", "prompt.num_shots=2"),
         "Question: One plus one?\nAnswer: 1+1=2\n#### 2\n\nQuestion: Two times three?\nAnswer: 2*3=6\n#### 6"
         f"\n\nQuestion: {Q}\nAnswer:"),
        (('dataset.prompt_format="Q: {question}\\nA:"',), f"Q: {Q}\nA:"),
    ],
)
def test_raw_prompt_exact_text(overrides, expected):
    assert prompt_for(*overrides) == expected


@pytest.mark.parametrize("example", ["study", "gsm8k"])
def test_one_shot_examples_are_solved_problems_in_gsm8k_format(example):
    """Both examples teach the format the scorer reads: a strict '#### 72' answer and calculations that check out."""
    from gsmtune.analysis import calculations
    from gsmtune.answers import extract_strict

    answer = ONE_SHOT_ANSWERS[example]
    assert "48" in ONE_SHOT_QUESTION and extract_strict(answer) == "72"
    calcs = calculations(answer)
    assert len(calcs) == 2 and all(c.correct for c in calcs)
    shots = shots_for(load_config(None, ["prompt.strategy=one_shot", f"prompt.one_shot_example={example}"]).prompt, None)
    assert [(s.question, s.answer) for s in shots] == [(ONE_SHOT_QUESTION, answer)]


def test_the_study_example_is_the_default():
    assert "so she sold 48 / 2 = 24 clips" in prompt_for("prompt.strategy=one_shot")


def test_few_shot_without_train_split_is_an_error():
    cfg = load_config(None, ["prompt.strategy=few_shot"])
    with pytest.raises(GsmtuneError, match="train split"):
        shots_for(cfg.prompt, None)


def test_chat_prompt_with_system_and_shots(tiny_tokenizer):
    text = prompt_for("prompt.chat_template=true", "prompt.strategy=one_shot", "prompt.instruction=true",
                      tokenizer=tiny_tokenizer)
    assert text == (
        f"<bos><start_of_turn>system\n{REFERENCE_INSTRUCTION}<end_of_turn>\n"
        f"<start_of_turn>user\n{ONE_SHOT_QUESTION}<end_of_turn>\n<start_of_turn>model\n{ONE_SHOT_ANSWER}<end_of_turn>\n"
        f"<start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\n"
    )


def test_template_without_system_role_gets_instruction_in_first_turn(tiny_tokenizer):
    import copy

    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tiny_tokenizer.chat_template
    )
    text = prompt_for("prompt.chat_template=true", "prompt.instruction=true", tokenizer=strict)
    assert text == f"<bos><start_of_turn>user\n{REFERENCE_INSTRUCTION}\n\n{Q}<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_missing_is_an_error(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(GsmtuneError, match="no chat template"):
        prompt_for("prompt.chat_template=true", tokenizer=plain)


@pytest.mark.parametrize("chat", [False, True])
def test_exactly_one_bos(tiny_tokenizer, chat):
    text = prompt_for(f"prompt.chat_template={str(chat).lower()}", "prompt.strategy=one_shot", tokenizer=tiny_tokenizer)
    assert text.startswith("<bos>") == chat  # the template writes one itself; raw text does not
    ids = tokenize_prompt(text, tiny_tokenizer)
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids.count(tiny_tokenizer.bos_token_id) == 1
    assert tiny_tokenizer.decode(ids[1:]) == text.removeprefix("<bos>")
