"""``make bench``'s ratio table (benchmarks/run_all.py) from synthetic benchmark JSON."""
from __future__ import annotations


def test_bench_ratio_table_and_readme_markers(tmp_path):
    """make bench: the ratio table from the benchmarks' JSON, written between README markers."""
    from benchmarks.run_all import END, START, ratio_table, update_readme

    results = {
        "train_step": {"result": {"batch": 32, "results": [
            {"variant": "torch", "median_ms": 130.0, "ratio_to_fastest_default": 1.0},
            {"variant": "jax", "median_ms": 180.0, "ratio_to_fastest_default": 1.38}]}},
        "inference": {"result": {"goals": {"best_runtime": "model.int8.tflite", "speedup_goal": 3.0}, "results": [
            {"name": "torch eager", "median_ms": 4.6, "speedup_vs_torch_eager": 1.0},
            {"name": "model.int8.tflite", "median_ms": 0.38, "speedup_vs_torch_eager": 12.1, "size_vs_fp32": 0.3}]}},
        "federation": {"result": {"runtime": "simulation", "setup": {"clients": 3},
                                  "ratios": {"bytes_up_fp16_over_fp32": 0.52, "round_s_fp16_over_fp32": 0.97,
                                             "overhead_share_of_train_phase_fp32": 0.24}}},
        "search": {"seconds": 3.0, "error": "MemoryError", "exit_code": 1},
        "scale": {"result": {"sizes": [{"products": 1000}, {"products": 5000}], "summary": [
            {"step": "index", "ms_per_image_fit": 2.5, "rss_mb_per_100k_images": 3.0, "abo_seconds": 7200},
            {"step": "read", "ms_per_image_fit": 0.1, "rss_mb_per_100k_images": 40.0, "abo_seconds": 40}]}},
    }
    table = ratio_table(results)
    assert "| train step (batch 32, 1 core) | jax | 180 ms | 1.38x fastest | <= 1.5x |" in table
    assert "12.1x eager torch, size 30% of fp32" in table and ">= 3x (best)" in table
    assert "bytes up 0.52x" in table and "| search | FAILED | MemoryError |" in table
    assert "| scale (1k/5k products, 1 thread) | index | 2.50 ms per catalog photo (fit) | peak RSS +3 MB per 100k " \
           "photos; all of ABO ~2.0 h | time linear, RSS flat |" in table and "| read |" not in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold table\n{END}\nrest\n")
    assert update_readme(table, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith(f"{END}\nrest\n")
    assert table in text
    (tmp_path / "plain.md").write_text("no markers\n")
    assert not update_readme(table, tmp_path / "plain.md")


def test_scale_benchmark_summary_fits_lines_and_projects_to_abo():
    """benchmarks.scale: per step, a least-squares line through the sizes and its value at 398,212 photos."""
    from benchmarks.scale import ABO_IMAGES, markdown, summarize

    def size(images, seconds, rss):
        return {"products": images // 6, "views": 6, "images": images,
                "steps": {"index": {"seconds": seconds, "peak_rss_mb": rss},
                          "export": {"seconds": 40.0, "peak_rss_mb": 1300.0 - images / 1000},
                          "eval": {"error": "boom"}}}

    sizes = [size(6000, 14.0, 110.0), size(30000, 62.0, 114.0)]
    rows = {r["step"]: r for r in summarize(sizes)}
    assert set(rows) == {"export", "index"}
    ix = rows["index"]
    assert ix["ms_per_image_fit"] == 2.0 and ix["seconds_fixed"] == 2.0
    assert ix["abo_seconds"] == round(2.0 + 0.002 * ABO_IMAGES)
    assert ix["rss_mb_per_100k_images"] == round(4 / 24000 * 1e5, 1)
    assert [b["ms_per_image"] for b in ix["by_size"]] == [round(14 / 6, 3), round(62 / 30, 3)]
    # a flat or slightly falling step is projected at no less than its largest measurement
    assert rows["export"]["abo_seconds"] == 40 and rows["export"]["abo_peak_rss_mb"] == 1270
    table = markdown({"sizes": sizes, "summary": summarize(sizes)})
    assert "| index | 14.0 / 2.33 / 110 | 62.0 / 2.07 / 114 | 2.0 + 2.000 | +17 MB | 13 min, 175 MB |" in table


def test_scale_training_rss_projection_adds_the_activation_cache_cap():
    from benchmarks.scale import summarize

    sizes = [{"products": n // 6, "images": n, "steps": {"train_torch": {
        "seconds": n / 100, "peak_rss_mb": 500.0 + cache, "activation_cache_mb": cache,
        "activation_cache_cap_mb": 256}}} for n, cache in ((6000, 22.0), (30000, 110.0))]
    row = summarize(sizes)[0]
    assert row["rss_mb_per_100k_images"] == 0.0 and row["abo_peak_rss_mb"] == 756
    assert row["activation_cache_mb"] == [22, 110] and row["activation_cache_cap_mb"] == 256


def test_isolation_compares_the_same_federations_round_by_round(tmp_path, capsys):
    """benchmarks.isolation on two hand-written study folders: only rounds both have count, round 1
    apart, ratios process / inline; a folder without a common federation is a one-line error."""
    import json

    from benchmarks import isolation

    def run(root, name, rounds):
        d = root / "runs" / name
        d.mkdir(parents=True)
        lines = [{"round": 0, "clients": []}]
        for rnd, secs in rounds:
            lines.append({"round": rnd, "clients": [
                {"status": "ok", "framework": "tf", "process_seconds": secs, "build_seconds": secs / 2,
                 "first_step_seconds": 1.0, "steady_step_seconds": 0.5, "cpu_seconds": secs, "host_seconds": secs},
                {"status": "offline", "framework": "tf"}]})
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    run(tmp_path / "a", "tf-s0", [(1, 40.0), (2, 30.0), (3, 30.0)])
    run(tmp_path / "b", "tf-s0", [(1, 20.0), (2, 5.0)])  # interrupted after round 2
    res = isolation.compare(tmp_path / "a", tmp_path / "b")
    by_phase = {r["phase"]: r for r in res["rows"]}
    assert res["federations"] == ["tf-s0"]
    assert by_phase["round 1"]["process_seconds"]["ratio"] == 2.0
    assert by_phase["rounds 2+"]["client_rounds"] == 1  # round 3 exists only in the process run
    assert by_phase["rounds 2+"]["process_seconds"]["ratio"] == 6.0
    isolation.print_table(res)
    assert "| tf | rounds 2+ | 1 | 30.0 | 5.0 | 6.00× |" in capsys.readouterr().out
    run(tmp_path / "c", "torch-s0", [(1, 1.0)])
    try:
        isolation.compare(tmp_path / "a", tmp_path / "c")
    except SystemExit as exc:
        assert "no federation folder is in both" in str(exc)
    else:
        raise AssertionError("no common federation must be an error")
