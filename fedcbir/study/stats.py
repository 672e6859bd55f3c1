"""Statistics of the framework study: 95 % confidence intervals over seeds and paired
framework comparisons.

Seeds are the unit of replication: every federation type runs once per seed, and for one
seed all federation types share the catalog split, the client partitions and the initial
weights.  So two frameworks are compared *paired by seed*: the per-seed difference
``a - b`` of a metric, its mean, a 95 % confidence interval from Student's t with ``n - 1``
degrees of freedom, and the two-sided p-value of the paired t-test (``scipy.stats``) of
"the mean difference is zero".  With n = 3 seeds the interval is wide (t = 4.30): a
difference is called significant only when p < 0.05; otherwise the report says the data do
not separate the two.  Exactly equal samples (zero variance) give p = 1 when their mean
difference is 0.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Iterable, Mapping, Sequence


def _vals(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def ci95(values: Iterable[Any]) -> dict[str, Any]:
    """Mean and the half-width of its 95 % t-interval (None with fewer than 2 values)."""
    v = _vals(values)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = sum(v) / n
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None}
    from scipy import stats

    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return {"n": n, "mean": mean, "ci95": float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), "std": sd}


def paired(a: Mapping[int, Any], b: Mapping[int, Any]) -> dict[str, Any]:
    """Paired comparison over the seeds both have: mean difference a - b, 95 % CI, p-value."""
    seeds = sorted(set(a) & set(b))
    diffs = _vals(float(a[s]) - float(b[s]) for s in seeds if a[s] is not None and b[s] is not None)
    out = {"seeds": seeds, "differences": diffs, **ci95(diffs)}
    if len(diffs) < 2:
        out.update(p_value=None, significant=None)
        return out
    if all(abs(d - diffs[0]) < 1e-15 for d in diffs):
        p = 1.0 if abs(diffs[0]) < 1e-15 else 0.0
    else:
        from scipy import stats

        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    out.update(p_value=p, significant=bool(p < 0.05))
    return out


def pairwise(per_label: Mapping[str, Mapping[int, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """``paired`` for every two labels (in the given order): ``{"a-b": {...}}``."""
    return {f"{x}-{y}": dict(paired(per_label[x], per_label[y]), a=x, b=y) for x, y in combinations(labels, 2)
            if x in per_label and y in per_label}


def fmt_ci(d: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "–"
    if d.get("ci95") is None:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} ± {d['ci95']:.{digits}f}"
