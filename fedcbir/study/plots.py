"""The study's plots: Recall@1 per round, seconds per round, peak RSS and (when exported)
batch-1 latency, as PNG files in the study folder (``common.report``'s matplotlib helpers).

May import: ``common``, and ``fedcbir.study.report`` (the federation labels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedcbir.study.report import label_text


def make_plots(study: Mapping[str, Any], out: Path) -> dict[str, str]:
    from common.report import grouped_bars, line_plot

    s = study["settings"]
    res = study["results"]
    labels = list(res)
    fws = s["frameworks"]
    names = [label_text(lb, fws) for lb in labels]
    plots: dict[str, str] = {}
    series, bands = {}, {}
    for lb, name in zip(labels, names):
        c = res[lb]["aggregate"]["curve"]
        series[name] = (c["round"], c["recall@1_mean"])
        if any(v is not None for v in c["recall@1_std"]):
            bands[name] = [v or 0.0 for v in c["recall@1_std"]]
    line_plot(out / "recall_at_1.png", series, xlabel="round (0 = before training)", ylabel="Recall@1",
              title=f"Recall@1 per round (mean ± std over {len(s['seeds'])} seed(s))", bands=bands or None,
              hline=(s["target_recall"], f"target {s['target_recall']:g}"), integer_x=True)
    plots["recall"] = "recall_at_1.png"

    def col(key, scale=1.0):
        return [(res[lb]["aggregate"][key]["mean"] or 0.0) * scale for lb in labels]

    def err(key, scale=1.0):
        return [(res[lb]["aggregate"][key]["std"] or 0.0) * scale for lb in labels]

    grouped_bars(out / "seconds_per_round.png", names,
                 {f"simulated ({s['profiles']})": col("simulated_seconds_per_round"),
                  "host wall": col("host_seconds_per_round")},
                 errors={f"simulated ({s['profiles']})": err("simulated_seconds_per_round"),
                         "host wall": err("host_seconds_per_round")},
                 ylabel="seconds per round", title="Seconds per round")
    plots["seconds"] = "seconds_per_round.png"
    grouped_bars(out / "peak_rss.png", names, {"peak RSS": col("peak_rss_mb")}, errors={"peak RSS": err("peak_rss_mb")},
                 ylabel="MB", title="Peak RSS of one client process")
    plots["rss"] = "peak_rss.png"
    ex = study.get("export")
    if ex:
        groups, vals = [], []
        for fw, e in ex["frameworks"].items():
            if e["eager"]:
                groups.append(f"{fw}\neager")
                vals.append(e["eager"]["median_ms"])
            for f in e["files"]:
                groups.append(f"{fw}\n{f['file'].replace('model', '')}")
                vals.append(f["median_ms"])
        grouped_bars(out / "latency.png", groups, {"median ms": vals}, ylabel="ms (batch 1, one thread)",
                     title="Batch-1 latency: eager vs exported")
        plots["latency"] = "latency.png"
    return plots
