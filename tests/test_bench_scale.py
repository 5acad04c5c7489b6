"""`dust3r-ns bench scale` on a tiny oracle case: the rows, the cache and the per-process peak RSS."""

import json

import pytest

from dust3r_ns.bench.scale import ScaleBenchConfig, run


def test_bench_scale_tiny_oracle(tmp_path, capsys):
    cfg = ScaleBenchConfig(n=[6], paths=["loop"], sources=["oracle"], size=32, cache_dir=str(tmp_path / "cache"),
                           json_out=str(tmp_path / "out.json"))
    rows = run(cfg)
    assert [(r["n"], r["path"], r["source"], r["pairs"], r["cached"]) for r in rows] == [
        (6, "loop", "oracle", 30, False)]                                   # a complete graph up to 12 frames
    for r in rows:
        # oracle predictions: the solver recovers the poses (the target holds) and rejects nothing
        assert r["rra_max_deg"] < 1.0 and r["rra_mean_deg"] <= r["target_rra_mean_deg"] and r["edges_rejected"] == 0
        assert 0.05 < r["align_rss_gb"] < 4 and 0.05 < r["infer_rss_gb"] < 4
    assert "max < 20: ok" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out.json").read_text())["rows"]) == 1
    # predictions and their figures are cached for reruns
    info = json.loads(next((tmp_path / "cache").glob("n6_32_loop_*_oracle/info.json")).read_text())
    assert info["pairs"] == 30 and info["edge_err_median_deg"] < 1.0


def test_bench_scale_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown path"):
        run(ScaleBenchConfig(paths=["spiral"], cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="store must be"):
        run(ScaleBenchConfig(store="float32", cache_dir=str(tmp_path)))
