"""``fedcbir export verify``: every bundle file, run by its device runtime, against the
reference framework on a catalog's photos.

Rules (per file):
    fp32   max |file - reference| <= 1e-4 and min cosine >= 0.9999 (un-normalised embeddings)
    fp16   min cosine >= 0.999
    int8   a paired rule on Recall@1 plus a check of the file on this CPU:

      queries    the non-main photos of up to ``INT8_QUERIES`` (2000) query photos' worth of
                 products — the test products first, then training products (both are in a
                 device's index) — against a gallery of those products' main photos.  Each
                 query is a hit or a miss for the fp32 reference and for the int8 file:
                 lost = reference hit & int8 miss, gained = the reverse.
      bounds     one-sided 95 % confidence bounds L <= U on d = Recall@1(int8) - Recall@1(fp32)
                 from Tango's score interval for paired proportions (the interval that goes
                 with McNemar's test; it accounts for the number of queries, also when few or
                 none differ).
      verdict    fail  if the int8 check (``export.int8check``: fast vs reference kernels,
                       floor against fp32) fails on this CPU, or U < -2 points (int8 loses
                       more than 2 points of Recall@1, with 95 % confidence);
                 pass  if L >= -2 points (it loses at most 2 points, with 95 % confidence);
                 otherwise "not enough queries to judge": neither pass nor fail — the data
                       cannot tell a loss above 2 points from one below.  The report gives
                       the number of queries that would decide if the observed rates held.
      A pass or fail is wrong by chance at most ~5 % of the time; nothing is decided on a
      raw difference (with 80 queries one query is 1.25 points).  Recall@1 on the held-out
      test products (``recall@1``) is still reported for every file.

The references: PyTorch for .onnx / .pte, Keras for Keras-made .tflite, Flax for
jax2tf-made .tflite — each built from ``reference.npz`` (the weights the files came
from), so a bundle can be verified anywhere those frameworks are installed.  The bundle
is only read.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable

import numpy as np

from export.bundle import (FP16_MIN_COS, FP32_MAX_ABS, FP32_MIN_COS, INT8_CONFIDENCE, INT8_MAX_RECALL_DROP,
                           compare, resolve_catalog)
from export.manifest import REFERENCE_FILE
from common.errors import FedcbirError

INT8_QUERIES = 2000  # query photos for the int8 rule (test products first, then training products)
UNDECIDED = "not enough queries"
_CHECK_IMAGES = 256  # images of the int8 check (fp32 floor; its kernel part uses the first 64)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


def _restricted_lost_rate(n: int, lost: int, gained: int, d: float) -> float:
    """Maximum-likelihood P(lost) when P(gained) - P(lost) = d (multinomial lost / gained /
    same); the roots of its score equation 2n p^2 - B p - lost d (1 - d) = 0 and the ends."""
    lo, hi = max(0.0, -d), (1.0 - d) / 2.0
    if hi <= lo:
        return lo
    same = n - lost - gained
    b = (lost + gained) * (1 - d) - 2 * d * (lost + same)
    disc = b * b + 8 * n * lost * d * (1 - d)
    cands = [lo, hi]
    if disc >= 0:
        cands += [r for r in ((b + math.sqrt(disc)) / (4 * n), (b - math.sqrt(disc)) / (4 * n)) if lo <= r <= hi]

    def loglik(p):
        total = 0.0
        for k, q in ((lost, p), (gained, p + d), (same, 1 - 2 * p - d)):
            if k:
                if q <= 0:
                    return -math.inf
                total += k * math.log(q)
        return total

    return max(cands, key=loglik)


def _tango_score(n: int, lost: int, gained: int, d: float) -> float:
    p = _restricted_lost_rate(n, lost, gained, d)
    var = n * (2 * p + d - d * d)
    diff = gained - lost - n * d
    if var <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(var)


def paired_bounds(queries: int, lost: int, gained: int,
                  confidence: float = INT8_CONFIDENCE) -> tuple[float, float]:
    """One-sided ``confidence`` bounds (L, U) on Recall@1(int8) - Recall@1(fp32) from
    ``queries`` paired queries of which ``lost`` / ``gained`` changed (Tango 1998, score
    interval for a difference of paired proportions)."""
    n, lost, gained = int(queries), int(lost), int(gained)
    if n < 1 or lost < 0 or gained < 0 or lost + gained > n:
        raise ValueError(f"bad paired counts: {n} queries, {lost} lost, {gained} gained")
    z = _z(confidence)
    est = (gained - lost) / n

    def solve(lo, hi, target):  # the score decreases in d
        for _ in range(80):
            mid = (lo + hi) / 2
            if _tango_score(n, lost, gained, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return max(-1.0, solve(-1.0, est, z)), min(1.0, solve(est, 1.0, -z))


def queries_needed(queries: int, lost: int, gained: int, margin: float = INT8_MAX_RECALL_DROP,
                   confidence: float = INT8_CONFIDENCE) -> int | None:
    """About how many queries would decide (either way) if the observed rates held; None
    when the observed difference sits on the margin."""
    n = int(queries)
    est = (gained - lost) / n
    var = (lost + gained) / n - est * est
    gap = abs(est + margin)
    if gap < 1e-9:
        return None
    return max(n + 1, int(math.ceil(_z(confidence) ** 2 * max(var, 1.0 / n) / gap ** 2)))


def judge_int8(queries: int, lost: int, gained: int, check_ok: bool = True, check_reason: str = "",
               margin: float = INT8_MAX_RECALL_DROP, confidence: float = INT8_CONFIDENCE) -> dict[str, Any]:
    """The int8 verdict (see the module docstring): {"verdict": "pass" | "fail" |
    "not enough queries", "ok": verdict != "fail", "rule": one line, the numbers}."""
    lo, up = paired_bounds(queries, lost, gained, confidence)
    est = (gained - lost) / queries
    pts = f"{confidence * 100:g} %"
    stats = (f"{queries} queries, {lost} lost / {gained} gained: Recall@1 {est * 100:+.2f} points, "
             f"{pts} bounds [{lo * 100:+.2f}, {up * 100:+.2f}]")
    need = None
    if not check_ok:
        verdict, rule = "fail", f"{check_reason}; {stats}"
    elif up < -margin:
        verdict, rule = "fail", f"{stats}: loses more than {margin * 100:g} points (upper bound < -{margin * 100:g})"
    elif lo >= -margin:
        verdict, rule = "pass", f"{stats}: loses at most {margin * 100:g} points (lower bound >= -{margin * 100:g})"
    else:
        need = queries_needed(queries, lost, gained, margin, confidence)
        verdict = UNDECIDED
        rule = (f"not enough queries to judge: {stats} straddle -{margin * 100:g} points"
                + (f" (about {need} queries would decide)" if need else ""))
    return {"verdict": verdict, "ok": verdict != "fail", "rule": rule, "queries": int(queries),
            "lost": int(lost), "gained": int(gained), "difference": est, "lower_bound": lo, "upper_bound": up,
            "confidence": confidence, "margin": margin, "queries_needed": need}


def judge(precision: str, max_abs_diff: float, min_cosine: float, recall: float | None = None,
          reference_recall: float | None = None, *, queries: int | None = None, lost: int | None = None,
          gained: int | None = None, check_ok: bool = True, check_reason: str = "") -> tuple[bool, str]:
    """(ok, reason) for one file by the rules above; int8 needs the paired counts
    (``queries``, ``lost``, ``gained``) and is ok unless its verdict is "fail" (see
    ``judge_int8`` for the three-way verdict)."""
    if precision == "fp32":
        ok = max_abs_diff <= FP32_MAX_ABS and min_cosine >= FP32_MIN_COS
        return ok, (f"max|diff| {max_abs_diff:.2e} (<= {FP32_MAX_ABS:g}), min cos {min_cosine:.6f} "
                    f"(>= {FP32_MIN_COS})")
    if precision == "fp16":
        return min_cosine >= FP16_MIN_COS, f"min cos {min_cosine:.6f} (>= {FP16_MIN_COS})"
    if precision == "int8":
        if queries is None or lost is None or gained is None:
            raise ValueError("int8 is judged on paired queries: pass queries=, lost=, gained= "
                             "(a raw Recall@1 difference is not a rule)")
        j = judge_int8(queries, lost, gained, check_ok, check_reason)
        return j["ok"], j["rule"]
    raise ValueError(precision)


def top1_hits(ev, emb: np.ndarray) -> np.ndarray:
    """Per query: is the top-1 gallery image the same product (bool array)."""
    from models.metrics import rank_gallery

    q, g = ~ev.is_main, ev.is_main
    labels = ev.table.labels
    top = rank_gallery(emb[q], emb[g], 1)[:, 0]
    return labels[g][top] == labels[q]


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value for paired hit/miss outcomes (binomial on the
    discordant queries): how surprising the difference is if both files were equally good."""
    from math import comb

    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return float(min(1.0, 2.0 * tail))


def load_reference(bundle) -> dict[str, np.ndarray]:
    import zipfile

    path = bundle.file_path(REFERENCE_FILE)
    if REFERENCE_FILE not in bundle.files:
        raise FedcbirError(f"bundle {bundle.path} has no {REFERENCE_FILE}: cannot build the reference models")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedcbirError(f"{path} cannot be read: {exc}") from None


def int8_products(split, seed: int, queries: int = INT8_QUERIES) -> list:
    """Products whose photos judge the int8 files: the test products, then training products
    (each group in a seeded order), until their non-main photos reach ``queries``."""
    rng = np.random.default_rng([int(seed), 3])
    out, n = [], 0
    for group in (split.test, split.train):
        for i in rng.permutation(len(group)):
            if n >= queries:
                return out
            p = group[int(i)]
            out.append(p)
            n += len(p.other_images) if p.main_image else 0
    return out


def verify_bundle(path, catalog=None, seed: int | None = None, test_fraction: float | None = None,
                  threads: int = 1, log: Callable[[str], None] | None = None,
                  int8_queries: int = INT8_QUERIES) -> dict[str, Any]:
    from catalog.dataset import CatalogSplit
    from export.int8check import check_int8_file, check_reason, cpu_info, cpu_line
    from export.reference import framework_version, reference_embedder
    from export.runtime import load_embedder, open_bundle
    from models.spec import ArchSpec
    from models.evaluate import RetrievalEval

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if int(int8_queries) < 1:
        raise FedcbirError("--int8-queries must be >= 1")
    bundle = open_bundle(path, check="all")
    man = bundle.manifest
    spec = ArchSpec.from_dict(man["architecture"])
    weights = load_reference(bundle)
    data = man.get("data") or {}
    seed = int(data.get("seed", 0) if seed is None else seed)
    test_fraction = float(data.get("test_fraction", 0.2) if test_fraction is None else test_fraction)
    recorded = {"catalog": data.get("catalog")}
    root, how = resolve_catalog(catalog, recorded, log)
    split = CatalogSplit.load(root, seed=seed, test_fraction=test_fraction)
    pre = bundle.preprocess
    ev = RetrievalEval.from_split(split, pre=pre)
    n_query = int((~ev.is_main).sum())
    n_gallery = int(ev.is_main.sum())
    cpu = cpu_info()
    log(f"verifying {bundle.path} on {root} ({how}): {len(split.test)} test products, "
        f"{n_gallery} gallery + {n_query} query images; CPU {cpu_line(cpu)}")
    has_int8 = any(prec == "int8" for _, prec, _ in bundle.models())
    ev8 = None
    if has_int8:
        chosen = int8_products(split, seed, int(int8_queries))
        ev8 = RetrievalEval.from_split(split, products=chosen, pre=pre)
        test_ids = {id(p) for p in split.test}
        n_test = sum(1 for p in chosen if id(p) in test_ids)
        log(f"int8 rule: {int((~ev8.is_main).sum())} query photos of {len(chosen)} products "
            f"({n_test} test, {len(chosen) - n_test} training products)")
    from catalog.images import normalize

    xk = normalize(ev8.table.images[:_CHECK_IMAGES], ev8.table.pre) if ev8 is not None else None

    refs: dict[str, dict] = {}
    entries = []
    for rt, prec, name in bundle.models():
        src = bundle.files[name]["reference"]
        if src not in refs:
            fn = reference_embedder(src, spec, weights)
            emb_ref = ev.embed_all(fn, batch_size=64)
            refs[src] = {"fn": fn, "emb": emb_ref, "metrics": ev.metrics_for(emb_ref),
                         "hits": top1_hits(ev, emb_ref)}
        ref = refs[src]
        emb_obj = load_embedder(bundle, file=name, threads=threads)
        emb = ev.embed_all(emb_obj.embed, batch_size=32)
        m = compare(emb, ref["emb"])
        metrics = ev.metrics_for(emb)
        ref_r1 = float(ref["metrics"]["recall@1"])
        entry = {"file": name, "runtime": rt, "runtime_version": emb_obj.runtime_version,
                 "precision": prec, "reference": framework_version(src),
                 "max_abs_diff": m["max_abs_diff"], "min_cosine": m["min_cosine"],
                 "mean_cosine": m["mean_cosine"], "recall@1": float(metrics["recall@1"]),
                 "recall@5": float(metrics["recall@5"]), "reference_recall@1": ref_r1}
        if prec != "int8":
            ok, reason = judge(prec, m["max_abs_diff"], m["min_cosine"])
            entry.update({"ok": bool(ok), "verdict": "pass" if ok else "fail", "rule": reason})
        else:
            if "hits8" not in ref:
                ref["emb8"] = ev8.embed_all(ref["fn"], batch_size=64)
                ref["hits8"] = top1_hits(ev8, ref["emb8"])
            emb8 = ev8.embed_all(emb_obj.embed, batch_size=32)
            hits8 = top1_hits(ev8, emb8)
            ref_hits = ref["hits8"]
            lost, gained = int((ref_hits & ~hits8).sum()), int((~ref_hits & hits8).sum())
            # the check of export.int8check on the first images of the same set
            check = check_int8_file(bundle, name, xk, emb8[:len(xk)], ref["emb8"][:len(xk)], cpu=cpu,
                                    threads=threads)
            j = judge_int8(len(hits8), lost, gained, check["ok"], check_reason(check))
            entry.update({"ok": j["ok"], "verdict": j["verdict"], "rule": j["rule"],
                          "queries_lost": lost, "queries_gained": gained, "mcnemar_p": mcnemar_p(lost, gained),
                          "int8_rule": {k: v for k, v in j.items() if k not in ("ok", "verdict", "rule")} | {
                              "recall@1": float(hits8.mean()), "reference_recall@1": float(ref_hits.mean()),
                              "products": len(chosen)},
                          "int8_check": check})
        entries.append(entry)
    verdicts = [e["verdict"] for e in entries]
    overall = "fail" if "fail" in verdicts else (UNDECIDED if UNDECIDED in verdicts else "pass")
    return {"bundle": str(bundle.path), "catalog": str(root), "catalog_chosen": how, "seed": seed,
            "test_fraction": test_fraction, "test_products": len(split.test), "queries": n_query,
            "gallery": n_gallery, "threads": threads, "cpu": cpu,
            "int8_queries": int((~ev8.is_main).sum()) if ev8 is not None else 0,
            "references": {k: {kk: float(vv) for kk, vv in v["metrics"].items()} for k, v in refs.items()},
            "files": entries, "verdict": overall, "ok": overall != "fail"}
