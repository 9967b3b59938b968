import pytest

from gsmtune.gsm8k_format import (
    ANNOTATION,
    ANSWER_LINE,
    CALCULATION,
    NEW_QUESTION,
    NUMBER,
    OPEN_ANNOTATION,
    after_answer_line,
    answer_line,
    normalize_question,
)


def test_numbers_as_people_write_them():
    found = [m.group(0).strip() for m in NUMBER.finditer("paid $1,200.50, then -3 and .5 but not v2 or 1.2.3")]
    assert found[:3] == ["$1,200.50", "-3", ".5"] and "2" not in found


def test_annotations_open_and_closed():
    text = "She sold 48/2 = <<48/2=24>>24 clips and <<24+48="
    assert ANNOTATION.findall(text) == [("48/2", "24")]
    assert OPEN_ANNOTATION.search(text).group(1) == "24+48"
    assert OPEN_ANNOTATION.search(text + "72>>") is None


def test_inline_calculations():
    assert CALCULATION.findall("so 3 x 4 = 12 and $1,200 / 2 = 600.") == [(" 3 x 4 ", "12"), (" $1,200 / 2 ", "600")]


@pytest.mark.parametrize(("text", "line", "after"), [
    ("so 72.\n#### 72\nQuestion: next", "72", "Question: next"),
    ("#### 5", "5", ""),
    ("#### Step 1\nx\n#### 5 apples\nmore", "5 apples", "more"),
    ("no final answer", None, ""),
])
def test_answer_line(text, line, after):
    assert answer_line(text) == line and after_answer_line(text) == after


def test_finished_answer_line_and_new_question():
    assert ANSWER_LINE.search("#### 72") is None and ANSWER_LINE.search("#### 72\n")
    assert ANSWER_LINE.search("#### \n") is None  # no number on the line
    assert ANSWER_LINE.search("#### Step 1: add\n") is None  # a heading: the model has not answered yet
    assert NEW_QUESTION.search("done.\n\nQuestion: more").start() == len("done.")


def test_normalize_question_catches_near_duplicates():
    assert normalize_question("Tom has  3 apples.\n") == normalize_question("tom has 12 apples.")
    assert normalize_question("Tom has 1,200.5 apples") == "tom has # apples"
