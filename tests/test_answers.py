import pytest

from gsmtune.answers import answers_match, extract_flexible, extract_gsm8k_answer, extract_strict, gold_answer


@pytest.mark.parametrize(
    ("completion", "strict", "flexible"),
    [
        ("3 + 4 = 7\n#### 7", "7", "7"),
        ("#### 1,200", "1200", "1200"),
        ("She has $1,200.50 left.\n#### $1,200.50", "1200.5", "1200.5"),
        ("#### -3", "-3", "-3"),
        ("It fell to -$5.\n#### -$5", "-5", "-5"),
        ("#### $-5", "-5", "-5"),
        ("#### 72.", "72", "72"),
        ("#### 72.00", "72", "72"),
        ("#### 0.5", "0.5", "0.5"),
        ("#### .5", "0.5", "0.5"),
        ("#### 25%", "25", "25"),
        ("#### 18 dollars", "18", "18"),
        ("####18", "18", "18"),
        ("#### 0", "0", "0"),
        ("So 9 * 2 = 18.\n#### 18\n\nQuestion: next one costs 99 dollars", "18", "18"),  # a run-on problem is not read
        ("#### 18\n#### 25", "18", "25"),
        ("The answer is 42.", None, "42"),
        ("no numbers here", None, None),
        ("####\nthe answer is 5", None, "5"),
        ("She buys 3 packs, 1,234,567 total.\n#### 1,234,567", "1234567", "1234567"),
        ("list 1,2,3", None, None),  # not a number as people write one
        ("#### 3,4", None, None),
        ("#### 1,2345", None, None),
        ("#### 1/2", None, None),  # not the 1 of a fraction
        ("#### 3.4.5", None, None),
        ("<<48/2=24>>24 clips\n#### 24", "24", "24"),
        ("#### Step 1: the total\n5 * 4 = 20\n#### 20", "20", "20"),  # a heading is not the final answer
        ("#### The answer is 18", None, "18"),  # the number must follow the mark (lm-eval's strict match)
        ("#### \u22123", "-3", "-3"),  # the Unicode minus sign
        ("So 7 is left (10 - 3).", None, "3"),  # a spaced minus is subtraction, not a sign
        ("- 3 apples", None, "3"),
    ],
)
def test_extraction(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible
    assert extract_gsm8k_answer(completion, "strict") == strict
    assert extract_gsm8k_answer(completion, "flexible") == flexible


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="strict"):
        extract_gsm8k_answer("#### 1", "loose")


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [("18", "18", True), ("18.0000000001", "18", True), ("0.3", "0.30000000001", True), ("17", "18", False),
     (None, "18", False), ("-3", "3", False), ("1200.5", "1200.50", True), ("1000000", "1000001", False)],
)
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_gold_answer():
    assert gold_answer("He sold 48/2 = <<48/2=24>>24.\n#### 72") == "72"
    with pytest.raises(ValueError):
        gold_answer("no final line")
