"""Checks on every client update before it may reach aggregation.

A reply is *rejected* (dropped from the round, logged, the round goes on) when its arrays
do not have exactly the global model's names and shapes, are not float32/float16 (fp16
uploads are upcast to float32 here), contain NaN/inf or a negative BN variance, or when
its update norm ``||w_client - w_global||`` (over every tensor except BN running
statistics, whose scale is data-dependent and which stay local under FedBN) is an
outlier: more than ``outlier_factor`` x the round's median update norm (the lower
median, so that with two replies the smaller is the reference), or more than
``max_update_ratio`` x the global model's norm (an absolute cap that also works with a
single reply).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from models import canonical

ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class Rejected(Exception):
    """An update that must not be aggregated; ``str(exc)`` is the reason."""


def checked_arrays(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` as float32, in the reference's order, or raise :class:`Rejected`."""
    names, got = set(reference), set(arrays)
    if names != got:
        missing, extra = sorted(names - got), sorted(got - names)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if extra:
            parts.append(f"unexpected {len(extra)} ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
        raise Rejected("wrong tensor names: " + "; ".join(parts))
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        a = np.asarray(arrays[name])
        if a.shape != np.shape(ref):
            raise Rejected(f"wrong shape for {name}: {a.shape}, expected {np.shape(ref)}")
        if a.dtype not in ACCEPTED_DTYPES:
            raise Rejected(f"wrong dtype for {name}: {a.dtype} (float32 or float16 expected)")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise Rejected(f"non-finite values (NaN/inf) in {name}")
        if canonical.is_bn_stat(name) and name.endswith("running_var") and np.any(a < 0):
            raise Rejected(f"negative variance in {name}")
        out[name] = a
    return out


def norm_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    return [n for n in reference if not canonical.is_bn_stat(n)]


def model_norm(weights: Mapping[str, np.ndarray]) -> float:
    names = norm_names(weights)
    return float(np.sqrt(sum(float(np.sum(np.square(weights[n], dtype=np.float64))) for n in names)))


def update_norm(reference: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for n in norm_names(reference):
        d = np.asarray(weights[n], np.float64) - np.asarray(reference[n], np.float64)
        total += float(np.sum(d * d))
    return float(np.sqrt(total))


def outliers(norms: Mapping[object, float], global_norm: float, factor: float, ratio: float) -> dict[object, str]:
    """Keys whose update norm is an outlier, with the reason."""
    out: dict[object, str] = {}
    cap = ratio * max(global_norm, 1e-12)
    values = sorted(norms.values())
    median = values[(len(values) - 1) // 2] if len(values) >= 2 else None
    for key, v in norms.items():
        if v > cap:
            out[key] = f"update norm {v:.4g} exceeds {ratio:g} x the global model's norm ({global_norm:.4g})"
        elif median is not None and median > 0 and v > factor * median:
            out[key] = f"update norm {v:.4g} exceeds {factor:g} x the round's median update norm ({median:.4g})"
    return out
