"""The study's report: ``report.md`` (results, device protocol and paired tests, where a
client's time goes, per-round and per-seed tables, export and latency, reproducibility,
notes) and the summary table printed at the end of the command.

Reads only the study dict (what ``study.json`` holds) and the plot file names.

May import: ``common``, and ``fedcbir.study.plan`` / ``fedcbir.study.stats``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedcbir.study.plan import MIXED
from fedcbir.study.stats import fmt_ci


def _fmt(ms: Mapping[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    m = ms["mean"] * scale
    if ms.get("std") is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def _fmt_rounds(rt: Mapping[str, Any]) -> str:
    n, k = rt["n"], rt["reached"]
    if k == 0:
        return f"not reached ({n}/{n} seeds)" if n > 1 else "not reached"
    if k == n:
        if rt.get("std") is None:
            return f"{rt['mean']:.0f}"
        return f"{rt['mean']:.1f} ± {rt['std']:.1f}"
    per = ", ".join("not reached" if r is None else str(r) for r in rt["per_seed"])
    return f"{per} (reached in {k}/{n} seeds)"


def label_text(label: str, frameworks: Sequence[str]) -> str:
    if label in (MIXED, f"{MIXED}-iid"):
        return f"mixed ({'/'.join(frameworks)})" + (", IID" if label != MIXED else "")
    return label


def render_report(study: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    from common.report import markdown_table

    s = study["settings"]
    target = s["target_recall"]
    res = study["results"]
    labels = list(res)
    fws = s["frameworks"]
    n_seeds = len(s["seeds"])
    lines = ["# Framework study", ""]
    lines += [f"Same catalog, test split, client partitions, initial weights, hyper-parameters, device profile "
              f"and server-side evaluation for every federation; only the clients' training framework differs. "
              f"Seeds {', '.join(map(str, s['seeds']))} (mean ± sample std over {n_seeds} seed"
              f"{'s' if n_seeds > 1 else ''}; one seed sets the test split, the partitions, the initial weights "
              f"and the batch order).", ""]
    lines += ["```bash", study["command"], "```", ""]
    qs = sorted({v["test_queries"] for v in study["data"].values()})
    hit = 1.0 / min(qs) if qs and min(qs) else None
    lines += [f"Catalog `{s['catalog']}`: {_data_line(study['data'])}. "
              f"{s['clients']} clients on `{s['profiles']}`, partition `{s['partition']}`, strategy "
              f"`{s['strategy']}`, {s['rounds']} rounds × {s['local_epochs']} local epoch(s); model width "
              f"{s['run_config']['width']}, {s['run_config']['input-size']} px, {s['run_config']['embedding-dim']}-d; "
              f"runtime `{s['runtime']}`; client isolation `{s['run_config']['client-isolation']}`; "
              f"BN policy `{s['run_config']['bn-policy']}`. Wall time: {study['federation_wall_seconds'] / 60:.1f} "
              f"min for the federations" + (f" (+ {_export_seconds(study['export']) / 60:.1f} min of export "
                                            f"conversions)" if study.get("export") else "")
              + f", {study['wall_seconds'] / 60:.1f} min for the last invocation of the command."
              + (f" One query hit is {hit:.4f} of Recall@1." if hit else ""),
              ""]
    if study.get("initial_weights_identical") is not None:
        lines += ["Initial weights identical across federation types of each seed (sha256 of round-0 "
                  f"checkpoints): **{'yes' if study['initial_weights_identical'] else 'NO'}**.", ""]
    header = ["federation", "Recall@1", "mAP@R", f"rounds to Recall@1 ≥ {target:g}",
              f"simulated s/round ({s['profiles']})", "host s/round", "client train s", "client process s",
              "peak RSS MB", "MB/round (up+down)"]
    rows = []
    for label in labels:
        a = res[label]["aggregate"]
        rows.append([label_text(label, fws), _fmt(a["final_recall@1"]), _fmt(a["final_map@r"]),
                     _fmt_rounds(a["rounds_to_target"]), _fmt(a["simulated_seconds_per_round"], 1),
                     _fmt(a["host_seconds_per_round"], 1), _fmt(a["client_train_seconds"], 1),
                     _fmt(a["client_process_seconds"], 1), _fmt(a["peak_rss_mb"], 0),
                     _fmt(a["bytes_per_round"], 2, 1e-6)])
    lines += ["## Results", "", markdown_table(header, rows)]
    lines += [
        "- **Recall@1, mAP@R**: server-side evaluation (PyTorch for every federation) of the global model after the "
        "last round on the test products (gallery = their main photos, queries = their other photos).",
        f"- **rounds to Recall@1 ≥ {target:g}**: first round (0 = before training) at or above the target; "
        "\"not reached\" within the rounds run.",
        "- **simulated s/round**: emulated seconds of the slowest device per round (compute scaled from this host "
        "to the profile by the calibrated virtual clock, plus transfer time); includes TF tracing and JAX "
        "compilation wherever the client process paid them (every round with client-isolation=process, once "
        "per process with inline: see Notes).",
        "- **host s/round**: wall-clock seconds of a round on this host (all clients, aggregation, server "
        "evaluation); **client train s** / **client process s**: mean per client and round of the training loop "
        "alone / of the whole child process (interpreter + framework import + data + training).",
        "- **peak RSS**: largest VmHWM of one client's process (one framework each with client-isolation=process); "
        "**MB/round**: model bytes down + up summed over clients (same canonical arrays for every framework).",
        ""]
    lines += _device_section(study, labels, fws)
    lines += _cost_section(study, labels, fws)
    if plots.get("recall"):
        lines += [f"![Recall@1 per round]({plots['recall']})", ""]
    # per-round curve table
    rounds = res[labels[0]]["aggregate"]["curve"]["round"]
    header = ["round", *[label_text(lb, fws) for lb in labels]]
    rows = []
    for i, r in enumerate(rounds):
        row = [str(r)]
        for lb in labels:
            c = res[lb]["aggregate"]["curve"]
            if r in c["round"]:
                j = c["round"].index(r)
                row.append(_fmt({"mean": c["recall@1_mean"][j], "std": c["recall@1_std"][j]}))
            else:
                row.append("–")
        rows.append(row)
    lines += ["### Recall@1 per round", "", markdown_table(header, rows)]
    rows = []
    for lb in labels:
        for seed, p in res[lb]["per_seed"].items():
            rt = p.get("rounds_to_target")
            wall = p.get("wall_seconds")
            rows.append([label_text(lb, fws), str(seed),
                         f"{p['initial']['recall@1']:.3f} → {p['final']['recall@1']:.3f}",
                         f"{p['final']['map@r']:.3f}", "not reached" if rt is None else str(rt),
                         ", ".join(f"{k} {v}" for k, v in sorted(p["client_status"].items())),
                         f"{wall:.0f}" if wall else "–", p.get("run_state") or ""])
    lines += ["### Per seed", "", markdown_table(["federation", "seed", "Recall@1 start → end", "mAP@R",
                                                  "rounds to target", "client rounds", "wall s", "run"], rows)]
    eps = [(lb, seed, p) for lb in labels for seed, p in res[lb]["per_seed"].items() if p.get("dp_delta")]
    if eps:
        lines += [f"Device-level differential privacy (run config `dp = {s.get('run_config', {}).get('dp', '?')}`; "
                  "README \"Privacy\"): epsilon after the last round, " + "; ".join(
                      f"{label_text(lb, fws)} seed {seed}: "
                      f"{'inf' if p.get('epsilon') is None else format(p['epsilon'], '.3g')} at delta {p['dp_delta']:g}"
                      for lb, seed, p in eps) + ".", ""]
    for key, alt in (("seconds", "seconds per round"), ("rss", "peak RSS")):
        if plots.get(key):
            lines += [f"![{alt}]({plots[key]})", ""]
    mixed = res.get(MIXED)
    if mixed:
        bf = mixed["aggregate"]["by_framework"]
        rows = [[fw, _fmt(bf[fw]["client_train_seconds"], 1), _fmt(bf[fw]["client_process_seconds"], 1),
                 _fmt(bf[fw]["client_simulated_seconds"], 1), _fmt(bf[fw]["peak_rss_mb"], 0)] for fw in bf]
        lines += ["### Inside the mixed federation (per client framework)", "",
                  markdown_table(["client framework", "train s", "process s", "simulated s", "peak RSS MB"], rows)]
    ex = study.get("export")
    if ex:
        c = ex["config"]
        lines += ["## Exported models (first seed's final global model)", "",
                  f"Batch 1, one thread, process pinned to CPU {c.get('pinned_cpus')}, {c['repeats']} calls per "
                  f"candidate interleaved (warm-up {c['warmup']}), median and p90; CPU {c.get('cpu')}"
                  + (f"; 1-min load average {c['loadavg_before'][0]:.1f} before, {c['loadavg_after'][0]:.1f} after "
                     f"on {study.get('host', {}).get('cpus')} cores" if c.get("loadavg_before") else "")
                  + ". Exported files are fp32 (no quantization).", ""]
        rows = []
        for fw, e in ex["frameworks"].items():
            if e["eager"]:
                rows.append([fw, f"eager: {e['eager']['name']}", "", f"{e['eager']['median_ms']:.2f}",
                             f"{e['eager']['p90_ms']:.2f}", "1.0×", ""])
            for f in e["files"]:
                par = f.get("parity") or {}
                ptxt = (f"max abs {par['max_abs_diff']:.1e}" if par.get("max_abs_diff") is not None else
                        ("ok" if par.get("ok") else ""))
                rows.append([fw, f"`{f['file']}` ({f.get('runtime')})", f"{f['bytes'] / 1e6:.2f} MB",
                             f"{f['median_ms']:.2f}", f"{f['p90_ms']:.2f}",
                             f"{f['speedup_vs_eager']:.1f}×" if f.get("speedup_vs_eager") else "", ptxt])
        lines += [markdown_table(["framework", "model", "size", "median ms", "p90 ms", "vs own eager",
                                  "parity vs reference"], rows)]
        routes = "; ".join(f"{fw}: {e['route']}" for fw, e in ex["frameworks"].items())
        lines += [f"Routes: {routes}.", ""]
        if plots.get("latency"):
            lines += [f"![batch-1 latency]({plots['latency']})", ""]
    tol = study["tolerance"]
    bound = (f" Here: |ΔRecall@1| ≤ {tol['recall@1']:.4f}, |ΔmAP@R| ≤ {tol['map@r']:.4f}"
             + (f", weights max |Δ| ≤ {tol['weights_max_abs_diff']:g}" if tol.get("weights_max_abs_diff") is not None
                else "") + f" ({tol.get('queries')} test queries)." if tol.get("queries") else "")
    lines += ["## Reproducibility", "", f"Tolerance (stated): {tol['text']}.{bound}", ""]
    rep = study.get("repeat_check")
    if rep:
        d = rep["diff"]
        detail = ""
        if d.get("weights_max_abs_diff_by_round"):
            detail = (" Weights max |Δ| per round: " + ", ".join(f"{v:.1e}" for v in d["weights_max_abs_diff_by_round"])
                      + f"; after the last round the largest is in `{d.get('weights_max_abs_diff_at')}`, and the "
                      f"non-BatchNorm weights differ by {d.get('non_bn_relative_l2_diff', 0.0):.1%} (relative L2).")
        lines += [f"Repeat check: `{rep['federation']}` run twice → max |ΔRecall@1| over rounds "
                  f"{d['recall@1']:.4f}, max |ΔmAP@R| {d['map@r']:.4f}, weights max |Δ| "
                  f"{d['weights_max_abs_diff']:.2e} (identical: {d['identical_weights']}) → "
                  f"**{'within' if rep['within_tolerance'] else 'OUTSIDE'} tolerance**.{detail}", ""]
    else:
        lines += ["No repeat check in this study (`--repeat-check` reruns the first federation and compares).", ""]
    notes = study.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _device_section(study: Mapping[str, Any], labels: Sequence[str], fws: Sequence[str]) -> list[str]:
    """Device-protocol accuracy (mean ± 95 % CI over seeds) and the paired framework tests."""
    from common.report import markdown_table

    res = study["results"]
    if not study.get("comparisons"):
        return []
    n = len(study["settings"]["seeds"])
    rows = [[label_text(lb, fws), fmt_ci(res[lb]["device"]["recall@1"]), fmt_ci(res[lb]["device"]["recall@5"]),
             fmt_ci(res[lb]["device"]["recall@10"]),
             ", ".join(f"{res[lb]['per_seed'][s]['device']['recall@1']:.3f}" for s in res[lb]["per_seed"])]
            for lb in labels]
    out = ["## Search quality on the device protocol", "",
           f"Each final global model exported to fp32 TFLite, the whole catalog indexed with LiteRT (f16 usearch), "
           f"`catalog-search eval`: queries = the test products' other photos, gallery = the main photos of every "
           f"catalog product. Mean ± 95 % confidence half-width over {n} seeds (Student t, {n - 1} d.f.).", "",
           markdown_table(["federation", "Recall@1", "Recall@5", "Recall@10", "Recall@1 per seed"], rows)]
    rows = []
    for key, what in (("device_recall@1", "device Recall@1"), ("server_recall@1", "server Recall@1")):
        for pair, d in study["comparisons"][key].items():
            p = d.get("p_value")
            verdict = ("–" if p is None else ("differs (p < 0.05)" if d.get("significant") else "no difference shown"))
            rows.append([what, f"{d['a']} − {d['b']}" if "a" in d else pair,
                         fmt_ci(d), ", ".join(f"{x:+.3f}" for x in d.get("differences", [])),
                         "–" if p is None else f"{p:.3f}", verdict])
    out += ["### Paired differences between federation types (same seed = same split, partitions, initial weights)",
            "", markdown_table(["metric", "a − b", "mean ± 95 % CI", "per seed", "paired t-test p", "verdict"],
                               rows),
            "With few seeds only large differences can show; \"no difference shown\" is not proof of equality.", ""]
    return out


def _cost_section(study: Mapping[str, Any], labels: Sequence[str], fws: Sequence[str]) -> list[str]:
    """Where a client's time goes, per framework (host seconds, mean over clients, rounds and seeds)."""
    from common.report import markdown_table

    res = study["results"]
    rows = []
    for lb in labels:
        for fw, d in res[lb]["aggregate"]["by_framework"].items():
            if d.get("steady_step_seconds", {}).get("mean") is None:
                continue
            proc, train = d["client_process_seconds"]["mean"], d["client_train_seconds"]["mean"]
            build = d["build_seconds"]["mean"]
            rows.append([label_text(lb, fws), fw, _fmt(d["client_process_seconds"], 1), _fmt(d["build_seconds"], 1),
                         f"{max(0.0, (proc or 0) - (build or 0) - (train or 0)):.1f}" if proc else "–",
                         _fmt(d["first_step_seconds_round1"], 2), _fmt(d["first_step_seconds_later"], 2),
                         _fmt(d["steady_step_seconds"], 3), _fmt(d["client_train_seconds"], 1),
                         _fmt(d["cache_hit_rate"], 2), _fmt(d["peak_rss_mb"], 0)])
    if not rows:
        return []
    return ["## Where a device's time goes (host seconds per client and round)", "",
            markdown_table(["federation", "client framework", "whole process", "import + build",
                            "interpreter + data", "first step, round 1", "first step, later rounds",
                            "steady step", "training loop", "trunk cache hit rate", "peak RSS MB"], rows),
            "- **import + build**: framework import and model construction in the fresh client process; "
            "**first step**: tracing (TF) / XLA compilation (JAX; later rounds read XLA's persistent compilation "
            "cache on disk, which is what a real device can keep between rounds) plus the frozen trunk of its "
            "batch; **steady step**: median of the other steps (trunk output from the cache when hit).",
            ""]


def _export_seconds(export: Mapping[str, Any]) -> float:
    """Converter seconds of every exported file (recorded in the manifests, so also right
    when the bundles were reused)."""
    return sum(f.get("export_seconds") or 0.0 for e in export["frameworks"].values() for f in e["files"])


def _data_line(data: Mapping[Any, Mapping[str, Any]]) -> str:
    parts = []
    for s, d in data.items():
        parts.append(f"seed {s}: {d['train_products']} train / {d['test_products']} test products, "
                     f"{d['test_queries']} queries, partition sizes {d['partition_products']}")
    return "; ".join(parts)


def summary_table(study: Mapping[str, Any]) -> str:
    from common.report import markdown_table

    fws = study["settings"]["frameworks"]
    rows = []
    for label, r in study["results"].items():
        a = r["aggregate"]
        rows.append([label_text(label, fws), _fmt(a["final_recall@1"]), _fmt(a["final_map@r"]),
                     _fmt_rounds(a["rounds_to_target"]), _fmt(a["simulated_seconds_per_round"], 1),
                     _fmt(a["host_seconds_per_round"], 1), _fmt(a["peak_rss_mb"], 0)])
    return markdown_table(["federation", "Recall@1", "mAP@R", "rounds to target", "sim s/round", "host s/round",
                           "peak RSS MB"], rows)
