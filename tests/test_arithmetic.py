import pytest

from gsmtune.arithmetic import safe_eval


@pytest.mark.parametrize(
    ("expr", "value"),
    [("48/2", 24), ("(3+4)*2", 14), ("((1+2)*(3+4))/7", 3), ("-5+2", -3), ("1,200*2", 2400), ("3 x 4", 12),
     ("10 ÷ 4", 2.5), ("$5*3", 15), ("2**10", None), ("__import__('os')", None), ("1/0", None), ("abc", None)],
)
def test_safe_eval(expr, value):
    assert safe_eval(expr) == value
