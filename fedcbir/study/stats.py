"""The study's numbers: per federation from its metrics.jsonl rows, mean ± std over seeds,
95 % confidence intervals over seeds and paired framework comparisons.

``federation_stats`` reads one federation's rows (one per round, the last one written wins)
into its final / initial metrics, rounds to a target Recall@1, seconds, memory and bytes per
round; ``aggregate`` takes mean ± sample std of those over seeds and the per-round curves.

Seeds are the unit of replication: every federation type runs once per seed, and for one
seed all federation types share the catalog split, the client partitions and the initial
weights.  So two frameworks are compared *paired by seed*: the per-seed difference
``a - b`` of a metric, its mean, a 95 % confidence interval from Student's t with ``n - 1``
degrees of freedom, and the two-sided p-value of the paired t-test (``scipy.stats``) of
"the mean difference is zero".  With n = 3 seeds the interval is wide (t = 4.30): a
difference is called significant only when p < 0.05; otherwise the report says the data do
not separate the two.  Exactly equal samples (zero variance) give p = 1 when their mean
difference is 0.

May import: ``common``; nothing of ``fedcbir.study``.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Iterable, Mapping, Sequence

from common.errors import FedcbirError


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


def num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mean(values: Iterable[Any]) -> float | None:
    xs = [v for v in (num(x) for x in values) if v is not None]
    return sum(xs) / len(xs) if xs else None


def mean_std(values: Iterable[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (n-1); std is None for fewer than two values."""
    xs = [v for v in (num(x) for x in values) if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "values": []}
    m = sum(xs) / len(xs)
    std = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": m, "std": std, "n": len(xs), "values": xs}


def clean_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows sorted by round, one per round (the last one written wins)."""
    by_round: dict[int, dict[str, Any]] = {}
    for r in rows:
        if isinstance(r, Mapping) and "round" in r:
            by_round[int(r["round"])] = dict(r)
    return [by_round[k] for k in sorted(by_round)]


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float, key: str = "recall@1") -> int | None:
    """First round (0 = before training) whose ``key`` is >= ``target``; None if never."""
    for r in clean_rows(rows):
        v = num(r.get(key))
        if v is not None and v >= target - 1e-12:
            return int(r["round"])
    return None


def federation_stats(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Numbers of one federation from its metrics.jsonl rows."""
    rows = clean_rows(rows)
    if not rows:
        raise FedcbirError("a federation without any metrics row")
    train = [r for r in rows if int(r["round"]) >= 1]
    clients = [c for r in train for c in (r.get("clients") or [])]
    ok = [c for c in clients if c.get("status") == "ok"]
    status: dict[str, int] = {}
    for c in clients:
        status[str(c.get("status"))] = status.get(str(c.get("status")), 0) + 1
    rss = [v for v in (num(c.get("peak_rss_mb")) for c in ok) if v is not None]
    by_fw: dict[str, dict[str, Any]] = {}
    for fw in sorted({str(c.get("framework")) for c in clients}):
        mine = [c for c in ok if str(c.get("framework")) == fw]
        frss = [v for v in (num(c.get("peak_rss_mb")) for c in mine) if v is not None]
        by_fw[fw] = {"client_rounds_ok": len(mine),
                     "client_rounds": sum(1 for c in clients if str(c.get("framework")) == fw),
                     "peak_rss_mb": max(frss) if frss else None,
                     "client_train_seconds": _mean(c.get("host_seconds") for c in mine),
                     "client_process_seconds": _mean(c.get("process_seconds") for c in mine),
                     "client_simulated_seconds": _mean(c.get("simulated_seconds") for c in mine),
                     # where a client's time goes (host seconds; see edge_client.app)
                     "build_seconds": _mean(c.get("build_seconds") for c in mine),
                     "first_step_seconds": _mean(c.get("first_step_seconds") for c in mine),
                     "first_step_seconds_round1": _mean(c.get("first_step_seconds") for r in train
                                                        if int(r["round"]) == 1 for c in (r.get("clients") or [])
                                                        if c.get("status") == "ok" and str(c.get("framework")) == fw),
                     "first_step_seconds_later": _mean(c.get("first_step_seconds") for r in train
                                                       if int(r["round"]) > 1 for c in (r.get("clients") or [])
                                                       if c.get("status") == "ok" and str(c.get("framework")) == fw),
                     "steady_step_seconds": _mean(c.get("steady_step_seconds") for c in mine),
                     "cache_hit_rate": _ratio(sum(num(c.get("cache_hits")) or 0 for c in mine),
                                              sum((num(c.get("cache_hits")) or 0) + (num(c.get("cache_misses")) or 0)
                                                  for c in mine))}
    final, first = rows[-1], rows[0]
    pick = ("recall@1", "recall@5", "recall@10", "map@r")
    return {
        "rounds": int(final["round"]),
        "curve": {"round": [int(r["round"]) for r in rows], "recall@1": [num(r.get("recall@1")) for r in rows],
                  "map@r": [num(r.get("map@r")) for r in rows]},
        "initial": {k: num(first.get(k)) for k in pick},
        "final": {k: num(final.get(k)) for k in pick},
        "best_recall@1": max((num(r.get("recall@1")) or 0.0) for r in rows),
        "rounds_to_target": rounds_to_target(rows, target),
        "simulated_seconds_per_round": _mean(r.get("simulated_round_seconds") for r in train),
        "host_seconds_per_round": _mean(r.get("seconds") for r in train),
        "client_train_seconds": _mean(c.get("host_seconds") for c in ok),
        "client_process_seconds": _mean(c.get("process_seconds") for c in ok),
        "peak_rss_mb": max(rss) if rss else None,
        "bytes_up_per_round": _mean(r.get("bytes_up") for r in train),
        "bytes_down_per_round": _mean(r.get("bytes_down") for r in train),
        "bytes_per_round": _mean((num(r.get("bytes_up")) or 0) + (num(r.get("bytes_down")) or 0) for r in train),
        "client_status": status,
        "by_framework": by_fw,
        # device-level DP (run config dp): epsilon after the last round, at its delta; None without DP
        "epsilon": num((final.get("dp") or {}).get("epsilon")) if final.get("dp") else None,
        "dp_delta": (final.get("dp") or {}).get("delta"),
    }


#: per-federation numbers that get mean +- std over seeds
SEED_METRICS = ("final_recall@1", "final_map@r", "final_recall@5", "initial_recall@1", "best_recall@1",
                "simulated_seconds_per_round", "host_seconds_per_round", "client_train_seconds",
                "client_process_seconds", "peak_rss_mb", "bytes_per_round", "bytes_up_per_round",
                "bytes_down_per_round", "wall_seconds")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _flat(stats: Mapping[str, Any]) -> dict[str, Any]:
    d = {k: stats.get(k) for k in SEED_METRICS}
    for k in ("recall@1", "map@r", "recall@5"):
        d[f"final_{k}"] = (stats.get("final") or {}).get(k)
    d["initial_recall@1"] = (stats.get("initial") or {}).get("recall@1")
    return d


def aggregate(stats_by_seed: Mapping[int, Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Mean +- std over seeds of one federation type; the Recall@1 / mAP@R curves per round
    (over the rounds every seed has); rounds to the target per seed (None = not reached)."""
    seeds = sorted(stats_by_seed)
    flats = [_flat(stats_by_seed[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "n": len(seeds)}
    for k in SEED_METRICS:
        out[k] = mean_std(f[k] for f in flats)
    rt = [stats_by_seed[s].get("rounds_to_target") for s in seeds]
    reached = [r for r in rt if r is not None]
    out["rounds_to_target"] = {"target": target, "per_seed": rt, "reached": len(reached), "n": len(rt),
                               **{k: v for k, v in mean_std(reached).items() if k in ("mean", "std")}}
    common = None
    for s in seeds:
        rs = set(stats_by_seed[s]["curve"]["round"])
        common = rs if common is None else common & rs
    rounds = sorted(common or [])
    curve: dict[str, Any] = {"round": rounds}
    for key in ("recall@1", "map@r"):
        per_round = []
        for r in rounds:
            vals = []
            for s in seeds:
                c = stats_by_seed[s]["curve"]
                vals.append(c[key][c["round"].index(r)])
            per_round.append(mean_std(vals))
        curve[f"{key}_mean"] = [p["mean"] for p in per_round]
        curve[f"{key}_std"] = [p["std"] for p in per_round]
    out["curve"] = curve
    fws = sorted({fw for s in seeds for fw in (stats_by_seed[s].get("by_framework") or {})})
    out["by_framework"] = {}
    for fw in fws:
        got = [stats_by_seed[s]["by_framework"][fw] for s in seeds if fw in stats_by_seed[s]["by_framework"]]
        out["by_framework"][fw] = {k: mean_std(g.get(k) for g in got)
                                   for k in ("peak_rss_mb", "client_train_seconds", "client_process_seconds",
                                             "client_simulated_seconds", "build_seconds", "first_step_seconds",
                                             "first_step_seconds_round1", "first_step_seconds_later",
                                             "steady_step_seconds", "cache_hit_rate")}
    return out


def client_schema(rows: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The metric fields an ok client row carries (None-valued ones excluded): equal for runs
    made by the same code."""
    for r in clean_rows(rows):
        for c in r.get("clients") or []:
            if c.get("status") == "ok":
                return tuple(sorted(k for k, v in c.items() if v is not None))
    return ()
