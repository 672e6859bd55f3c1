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
    }
    table = ratio_table(results)
    assert "| train step (batch 32, 1 core) | jax | 180 ms | 1.38x fastest | <= 1.5x |" in table
    assert "12.1x eager torch, size 30% of fp32" in table and ">= 3x (best)" in table
    assert "bytes up 0.52x" in table and "| search | FAILED | MemoryError |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold table\n{END}\nrest\n")
    assert update_readme(table, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith(f"{END}\nrest\n")
    assert table in text
    (tmp_path / "plain.md").write_text("no markers\n")
    assert not update_readme(table, tmp_path / "plain.md")
