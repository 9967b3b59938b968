import pytest

from gsmtune.stats import holm, mcnemar_exact, paired_bootstrap_ci, wilson_ci


def test_wilson_known_values():
    lo, hi = wilson_ci(81, 263)  # Wilson (1927) style worked example: 30.8% of 263
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson_ci(0, 250) == (0.0, pytest.approx(0.01516, abs=1e-4))
    assert wilson_ci(10, 10)[1] == 1.0 and wilson_ci(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [(1, 9, 0.021484375), (0, 0, 1.0), (5, 5, 1.0), (0, 10, 2 / 1024), (3, 7, 0.34375), (10, 0, 2 / 1024)],
)
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_paired_bootstrap_ci():
    a = [True] * 50 + [False] * 50
    b = [True] * 70 + [False] * 30  # b fixes 20 problems, breaks none
    lo, hi = paired_bootstrap_ci(a, b, seed=1)
    assert lo < 0.2 < hi and lo > 0.1 and hi < 0.3
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:10])


def test_holm_known_values():
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, each at least the one before it
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.3, 0.6]) == [0.6, 0.6] and holm([0.9, 0.9]) == [1.0, 1.0] and holm([]) == []
