"""Reproducibility: what "same seed -> same numbers" means per runtime, and the check of it.

``TOLERANCE`` states the bound per runtime, ``tolerance_for`` raises the metric bounds to a
number of test queries, ``compare_runs`` measures two run folders of the same settings
(``--repeat-check``) and ``within_tolerance`` judges the difference.

May import: ``common``, ``models``, ``server``, and ``fedcbir.study.stats``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from common.errors import FedcbirError
from fedcbir.study.stats import clean_rows, num as _num

#: Reproducibility: what "same seed -> same numbers" means, per runtime (checked by
#: ``--repeat-check`` and by tests/test_study.py). Metric tolerances are absolute, but never
#: below ``min_queries`` test queries' worth (one query is 1/Q of Recall@1).
TOLERANCE = {
    "inprocess": {
        "recall@1": 0.0, "map@r": 0.0, "min_queries": 0, "weights_max_abs_diff": 0.0,
        "text": "in-process runtime: bit-identical (fixed node ids, hence a fixed aggregation order; one "
                "thread per client; seeded partitions, batches and augmentation): |diff| = 0 for Recall@1, "
                "mAP@R and every weight, for torch, tf and jax clients alike",
    },
    "simulation": {
        "recall@1": 0.02, "map@r": 0.02, "min_queries": 2, "weights_max_abs_diff": None,
        "text": "simulation runtime: Flower draws random node ids for every run; the server used to average "
                "the replies in node-id order, in float32 (Flower's aggregate_arrayrecords), and float addition "
                "is not associative, so a different draw rounded some weights differently by about 1e-7, which "
                "local AdamW training amplified (seen here: 2.4e-7 after round 1 grew to 0.4 in a BatchNorm "
                "running variance and 3.9 % relative L2 in the other weights after round 3, Recall@1 2 of 300 "
                "queries apart). Replies are now aggregated in partition-id order (server.strategies), so a "
                "repeat is expected to be bit-identical; the stated tolerance keeps a margin for what the "
                "runtime may still reorder: |diff| <= 0.02 (and at least 2 queries' worth) for Recall@1 and "
                "mAP@R in every round; weight differences are reported, not bounded",
    },
}


def tolerance_for(runtime: str, queries: int | None) -> dict[str, Any]:
    """The runtime's tolerance with the metric bounds raised to ``min_queries / queries``."""
    tol = dict(TOLERANCE[runtime])
    if queries:
        floor = tol["min_queries"] / float(queries)
        for k in ("recall@1", "map@r"):
            tol[k] = max(tol[k], floor)
    tol["queries"] = queries
    return tol


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Differences between two run folders of the same settings (reproducibility check)."""
    import numpy as np

    from common.flower import read_rows
    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    ra, rb = clean_rows(read_rows(a / "metrics.jsonl")), clean_rows(read_rows(b / "metrics.jsonl"))
    if [r["round"] for r in ra] != [r["round"] for r in rb]:
        raise FedcbirError(f"{a} and {b} hold different rounds")
    diff = {}
    for key in ("recall@1", "map@r"):
        diff[key] = max(abs((_num(x.get(key)) or 0.0) - (_num(y.get(key)) or 0.0)) for x, y in zip(ra, rb))
    from models import canonical
    from server.federation import CHECKPOINT_DIR

    def max_abs(x, y):
        return max(float(np.max(np.abs(x[k].astype(np.float64) - y[k]))) for k in x)

    wa, wb = load_checkpoint(latest_checkpoint(a))[0], load_checkpoint(latest_checkpoint(b))[0]
    if set(wa) != set(wb):
        raise FedcbirError(f"{a} and {b} hold different weight names")
    diff["weights_max_abs_diff"] = max_abs(wa, wb)
    diff["weights_max_abs_diff_at"] = max(wa, key=lambda k: float(np.max(np.abs(wa[k].astype(np.float64) - wb[k]))))
    diff["identical_weights"] = all(np.array_equal(wa[k], wb[k]) for k in wa)
    other = [k for k in wa if not canonical.is_bn(k)]
    num = sum(float(np.sum((wa[k].astype(np.float64) - wb[k]) ** 2)) for k in other)
    den = sum(float(np.sum(wa[k].astype(np.float64) ** 2)) for k in other)
    diff["non_bn_relative_l2_diff"] = math.sqrt(num / den) if den else 0.0
    by_round = []
    for r in ra:
        pa = a / CHECKPOINT_DIR / f"round-{int(r['round']):04d}"
        pb = b / CHECKPOINT_DIR / f"round-{int(r['round']):04d}"
        if pa.with_suffix(".json").is_file() and pb.with_suffix(".json").is_file():
            by_round.append(max_abs(load_checkpoint(pa)[0], load_checkpoint(pb)[0]))
    diff["weights_max_abs_diff_by_round"] = by_round
    return diff


def within_tolerance(diff: Mapping[str, Any], tol: Mapping[str, Any]) -> bool:
    return all(float(diff[k]) <= tol[k] + 1e-12 for k in ("recall@1", "map@r", "weights_max_abs_diff")
               if tol.get(k) is not None)
