"""GSM8K's text format in one place (pure: no torch): how solutions write numbers, calculator annotations and the final
answer line, and how a prompt starts the next problem. Extraction, stop rules, the calculator and the analysis use it.

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.     a calculator annotation: <<expression=result>>
    #### 72                                             the final answer line
    Question: ...                                       the next problem of a few-shot prompt
"""

from __future__ import annotations

import re

ANSWER_MARK = "####"

# A number as people write it: optional sign and currency, thousands groups of three, decimals.
NUMBER = re.compile(r"(?<![\w.])(-)?\s?\$?\s?(-)?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# The same inside a written calculation (`$1,200.50`), without sign, as a building block for CALCULATION.
_OPERAND = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"

ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]*)>>")  # <<48/2=24>>: (expression, result)
OPEN_ANNOTATION = re.compile(r"<<([^<>=]+)=$")  # text ending inside an annotation, before its result
CALCULATION = re.compile(  # an inline `a op b = c`: (expression, result)
    rf"((?:[(\s]*-?{_OPERAND}[)\s]*[-+*/×x÷]\s*)+[(\s]*-?{_OPERAND}[)\s]*)=\s*(-?{_OPERAND})")

ANSWER_LINE = re.compile(rf"{ANSWER_MARK}[^\n]*\d[^\n]*\n")  # a finished final-answer line (a number, then newline)
NEW_QUESTION = re.compile(r"\n\s*Question:")  # the model starting the next problem of a few-shot prompt


def answer_line(text: str) -> str | None:
    """The rest of the line after the first `####`, or None when there is none."""
    pos = text.find(ANSWER_MARK)
    return None if pos < 0 else text[pos + len(ANSWER_MARK):].split("\n", 1)[0]


def after_answer_line(text: str) -> str:
    """What comes after the line holding the first `####` (empty when nothing, or no `####`)."""
    pos = text.find(ANSWER_MARK)
    return "" if pos < 0 else text[pos:].partition("\n")[2]


def normalize_question(text: str) -> str:
    """Lowercase, numbers -> '#', whitespace collapsed: the same problem with other numbers or spacing compares equal."""
    return re.sub(r"\s+", " ", re.sub(r"\d[\d,.]*", "#", text.lower())).strip()
