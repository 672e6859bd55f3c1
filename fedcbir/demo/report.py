"""The demo's report: ``report.md`` (tables, plots of recall per round and simulated round time
per device), ``results.html`` (query photos beside their top-5 products, images embedded).
Imports the lower packages; nothing of ``fedcbir`` but this job."""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from common.errors import FedcbirError
from fedcbir.demo.stages import DEVICES

def _device_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    header = ["round", "recall@1", "recall@10", "map@r"]
    for fw, prof in DEVICES:
        header += [f"{fw}/{prof} sim s", f"{fw}/{prof} peak MB"]
    header += ["bytes up", "bytes down", "wall s"]
    table = []
    for r in rows:
        by = {c.get("framework"): c for c in r.get("clients", [])}
        line: list[Any] = [r["round"], f"{r['recall@1']:.3f}", f"{r['recall@10']:.3f}", f"{r['map@r']:.3f}"]
        for fw, _ in DEVICES:
            c = by.get(fw)
            if r["round"] == 0:
                line += ["", ""]
            elif c is None or c.get("status") != "ok":
                line += [c.get("status", "absent") if c else "absent", ""]
            else:
                line += [f"{c['simulated_seconds']:.1f}", f"{c['peak_rss_mb']:.0f}"]
        line += [_mb(r.get("bytes_up")), _mb(r.get("bytes_down")), f"{r.get('seconds', 0):.1f}" if r["round"] else ""]
        table.append(line)
    return header, table


def _mb(n) -> str:
    return f"{(n or 0) / 1e6:.1f} MB" if n else ""


def plots(rows: list[dict[str, Any]], out: Path) -> dict[str, str]:
    from common.report import grouped_bars, line_plot

    xs = [r["round"] for r in rows]
    line_plot(out / "recall_per_round.png",
              {k: (xs, [r[k] for r in rows]) for k in ("recall@1", "recall@5", "recall@10")},
              xlabel="round (0 = before training)", ylabel="recall on test products",
              title="Global model after each round (server-side evaluation)")
    trained = [r for r in rows if r["round"] > 0]
    bars: dict[str, list[float]] = {}
    for fw, prof in DEVICES:
        vals = []
        for r in trained:
            c = next((c for c in r.get("clients", []) if c.get("framework") == fw and c.get("status") == "ok"), None)
            vals.append(float(c["simulated_seconds"]) if c else 0.0)
        bars[f"{fw} on {prof}"] = vals
    grouped_bars(out / "device_round_seconds.png", [str(r["round"]) for r in trained], bars,
                 ylabel="simulated seconds on the device", title="Local training time per round and device")
    return {"recall": "recall_per_round.png", "devices": "device_round_seconds.png"}


def _thumb(path: str, size: int = 128) -> str:
    from catalog.images import load_image

    try:
        img = load_image(path)
    except FedcbirError:
        return ""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def results_html(found: dict[str, Any], out: Path) -> Path:
    from common.io import write_text_atomic

    cards = []
    for e in found["examples"]:
        hit = f"found at rank {e['hit_rank']}" if e["hit_rank"] else "not in the top 5"
        row = [f'<div class="q"><img src="{_thumb(e["query"])}" alt="query"><div><b>query</b><br>'
               f'{html.escape(e["name"])}<br><small>{html.escape(e["product_type"])} · {hit}</small></div></div>']
        for i, m in enumerate(e["matches"], 1):
            cls = "m hit" if m["item_id"] == e["item_id"] else "m"
            row.append(f'<div class="{cls}"><img src="{_thumb(m["image"])}" alt="match {i}"><div>#{i} '
                       f'{html.escape(m["name"] or m["item_id"])}<br><small>{html.escape(m["product_type"])} · '
                       f'similarity {m["score"]:.3f}</small><div class="bar"><span style="width:'
                       f'{max(0.0, min(1.0, m["score"])) * 100:.0f}%"></span></div></div></div>')
        cards.append('<div class="row">' + "".join(row) + "</div>")
    ev = found["eval"]["index"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>fedcbir demo: query photos and their top-5 products</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}}
.row{{display:flex;flex-wrap:wrap;gap:.6rem;margin:0 0 1rem;align-items:flex-start}}
.bar{{height:4px;background:#eee;margin-top:2px}} .bar>span{{display:block;height:4px;background:#58a}}
.q,.m{{width:150px;font-size:.8rem;border:1px solid #ddd;border-radius:6px;padding:.3rem;background:#fff}}
.q{{background:#eef4ff;border-color:#8ab}} .hit{{border:3px solid #2a2}}
img{{width:128px;height:128px;object-fit:contain;display:block;margin:auto}}
</style></head><body>
<h1>fedcbir demo: query photos and their top-5 products</h1>
<p>Model: the federated global model, run with {html.escape(found['eval']['model'].get('runtime') or '')}
({html.escape(str(found['eval']['model'].get('precision')))}); index: usearch {html.escape(str(found['eval']['index_dtype']))}.
Test products: recall@1 {ev['recall@1']:.3f}, recall@5 {ev['recall@5']:.3f}, recall@10 {ev['recall@10']:.3f}.
A green frame marks the query's own product. Similarity is the cosine of the two embeddings
(1 = identical; not a calibrated probability).</p>
{''.join(cards)}
</body></html>
"""
    return write_text_atomic(out / "results.html", page)


def _privacy_md(fed: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The federation's differential-privacy paragraph ([] without DP)."""
    p = fed.get("privacy")
    if not p:
        return []
    per = ", ".join(f"{r['round']}: {'inf' if r['dp'].get('epsilon') is None else format(r['dp']['epsilon'], '.3g')}"
                    for r in rows if r.get("dp"))
    eps = "inf (no noise: clipping only)" if p.get("epsilon") is None else f"{p['epsilon']:.3g}"
    text = (f"**Device-level differential privacy** ({p['mode']}: clip {p['clip']:g}, noise multiplier "
            f"{p['noise_multiplier']:g}, {p['clients_per_round']} device(s) per round expected, {p['sampling']}): "
            f"epsilon **{eps}** at delta {p['delta']:g} after {p['rounds_accounted']} round(s), "
            f"{p['accountant']}, {p['neighbouring']}. Per round: {per}. Covers {p['covers']}. With three devices "
            "this epsilon is large: device-level DP needs many devices (README \"Privacy\").")
    if fed.get("stopped"):
        text += f" The privacy budget ended the federation early: {fed['stopped']}."
    return [text, ""]


def report_md(result: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> Path:
    from common.io import write_text_atomic
    from common.report import markdown_table

    s, fed, man, found = result["settings"], result["federation"], result["bundle"], result["search"]
    header, table = _device_table(rows)
    files = man.get("files", {})
    checks = {e["file"]: e for e in (man.get("verify") or {}).get("files", [])}
    ftable = []
    for name, f in sorted(files.items()):
        if f.get("role") != "model":
            continue
        e = checks.get(name, {})
        ftable.append([name, f.get("format"), f.get("precision"), f"{f.get('bytes', 0) / 1e6:.2f} MB",
                       f"{e['max_abs_diff']:.1e}" if e else "", f"{e['min_cosine']:.5f}" if e else "",
                       f"{e['recall@1']:.3f} / {e['reference_recall@1']:.3f}" if e else "",
                       ("ok" if e["ok"] else f"FAILED: {e.get('rule', '')}") if e else "not verified"])
    ev = found["eval"]
    text = [
        "# fedcbir demo report", "",
        f"Created {time.strftime('%Y-%m-%d %H:%M:%S')} by `fedcbir demo --out {out}` on {result['catalog']}.", "",
        "## Federation", "",
        f"Three emulated devices ({', '.join(f'{f} on {p}' for f, p in DEVICES)}), Flower simulation runtime, "
        f"{s['strategy']}, partition {s['partition']}, {s['rounds']} rounds x {s['local_epochs']} local epochs, "
        f"AdamW lr {s['lr']:g}, seed {s['seed']}. Server-side evaluation on the {fed.get('test_products')} test products after each "
        "round (round 0 = the initial weights). *sim s* = the device's simulated seconds for its local training "
        "(virtual clock of its profile), *peak MB* = the training process's peak RSS.", "",
        markdown_table(header, table),
        *_privacy_md(fed, rows),
        "![recall per round](recall_per_round.png)", "",
        "![simulated round time per device](device_round_seconds.png)", "",
        "## Exported bundle", "",
        f"`{result['bundle_dir']}`, checked by `fedcbir export verify`: every file loaded with its device runtime "
        "and compared with the reference framework on the test products' photos (rules: fp32 max |diff| <= 1e-4 "
        "and cosine >= 0.9999; fp16 cosine >= 0.999; int8 Recall@1 within 2 points of fp32).", "",
        markdown_table(["file", "format", "precision", "size", "max abs diff", "min cosine",
                        "recall@1 / reference", "verdict"], ftable),
        "## Catalog search on the device runtime", "",
        f"{ev['queries']} query photos (non-main photos of the {ev['test_products']} test products) against the "
        f"main photo of all {ev['gallery']} catalog products, embedded with {ev['model'].get('runtime')} "
        f"({ev['model'].get('precision')}), usearch {ev['index_dtype']} index. This is harder than the "
        f"federation's evaluation above, whose gallery holds only the {fed.get('test_products')} test products: "
        "here every training product is a distractor too.", "",
        markdown_table(["", "recall@1", "recall@5", "recall@10", "query p50 ms", "query p99 ms"],
                       [["index", *(f"{ev['index'][k]:.3f}" for k in ("recall@1", "recall@5", "recall@10")),
                         ev["latency_ms"]["query_p50"], ev["latency_ms"]["query_p99"]],
                        ["exact search", *(f"{ev['exact'][k]:.3f}" for k in ("recall@1", "recall@5", "recall@10")),
                         "", ""]]),
        f"Query photos beside their top-5 products: [results.html](results.html) "
        f"({sum(1 for e in found['examples'] if e['hit_rank'])}/{len(found['examples'])} found their product in "
        "the top 5).", "",
        "## Time per stage", "",
        markdown_table(["stage", "seconds"], [[k, f"{v} (reused)" if k in result["reused_stages"] else v]
                                              for k, v in result["stage_seconds"].items()]),
    ]
    return write_text_atomic(out / "report.md", "\n".join(text))
