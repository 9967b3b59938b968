"""A safe arithmetic evaluator for written calculations (`48/2`, `(3+4)*2`): parses with `ast`, never `eval`."""

from __future__ import annotations

import ast
import operator
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_MAX_ABS = 1e15  # refuse absurd intermediate values (e.g. 9**9**9 is not allowed anyway: no Pow)


def normalize_expression(text: str) -> str:
    """Turn how people write arithmetic into Python syntax: `x`/`×` -> `*`, `÷` -> `/`, drop `$` and thousands commas."""
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("$", "")
    text = re.sub(r"(?<=\d)\s*[xX]\s*(?=[\d(])", "*", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return text.strip()


def safe_eval(expression: str) -> float | None:
    """The value of `+ - * /` arithmetic on numbers and parentheses; None for anything else or a division by zero."""
    try:
        tree = ast.parse(normalize_expression(expression), mode="eval")
    except (SyntaxError, ValueError):
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value = _OPS[type(node.op)](walk(node.left), walk(node.right))
            if abs(value) > _MAX_ABS:
                raise ValueError("too large")
            return value
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError):
        return None
