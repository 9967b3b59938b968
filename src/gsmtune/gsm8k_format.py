"""GSM8K's text format in one place (pure: no torch): how solutions write numbers, calculator annotations and the final
answer line, and how a prompt starts the next problem. Extraction, stop rules, the calculator and the analysis use it.

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.     a calculator annotation: <<expression=result>>
    #### 72                                             the final answer line
    Question: ...                                       the next problem of a few-shot prompt
"""

from __future__ import annotations

import re

ANSWER_MARK = "####"

# A number as people write it: optional sign (next to it or to the currency: `- 3` is not negative) and currency,
# thousands groups of three, decimals. Only whole numbers: not the `1` of `1/2` or `1,2345`, nor a piece of `3.4.5`.
_SIGN = r"[-\u2212]"
_DIGITS = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\w,/]\d|\d|\.\d)"
NUMBER = re.compile(rf"(?<![\w.])(?<!\d[,/])({_SIGN})?(?:\$\s?)?({_SIGN})?{_DIGITS}")
# The same inside a written calculation (`$1,200.50`), without sign, as a building block for CALCULATION.
_OPERAND = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"

ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]*)>>")  # <<48/2=24>>: (expression, result)
OPEN_ANNOTATION = re.compile(r"<<([^<>=]+)=$")  # text ending inside an annotation, before its result
CALCULATION = re.compile(  # an inline `a op b = c`: (expression, result)
    rf"((?:[(\s]*-?{_OPERAND}[)\s]*[-+*/×x÷]\s*)+[(\s]*-?{_OPERAND}[)\s]*)=\s*(-?{_OPERAND})")

# The final answer: `####` and a number right after it (lm-evaluation-harness's strict `#### (\-?[0-9\.\,]+)`, with
# currency and spaces allowed); the first such mark counts, so `#### Step 1` headings are not answers.
FINAL_ANSWER = re.compile(rf"{ANSWER_MARK}[ \t]*(?={_SIGN}?(?:\$\s?)?{_SIGN}?{_DIGITS})")
ANSWER_LINE = re.compile(rf"{FINAL_ANSWER.pattern}[^\n]*\n")  # a finished final-answer line: stop there
NEW_QUESTION = re.compile(r"\n\s*Question:")  # the model starting the next problem of a few-shot prompt


def answer_line(text: str) -> str | None:
    """The rest of the line after the final-answer mark, or None when there is none."""
    m = FINAL_ANSWER.search(text)
    return None if m is None else text[m.end():].split("\n", 1)[0]


def after_answer_line(text: str) -> str:
    """What comes after the line holding the final answer (empty when nothing, or no final answer)."""
    m = FINAL_ANSWER.search(text)
    return "" if m is None else text[m.end():].partition("\n")[2]


def normalize_question(text: str) -> str:
    """Lowercase, numbers -> '#', whitespace collapsed: the same problem with other numbers or spacing compares equal."""
    return re.sub(r"\s+", " ", re.sub(r"\d[\d,.]*", "#", text.lower())).strip()
