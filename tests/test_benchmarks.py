"""Both benchmark scripts run end to end at a tiny size on the CPU, every peer included: a row with numbers, or
a note saying why the peer cannot run here. (A GPU session has minutes of device time: a benchmark that dies
of a Python error there costs a call.) No timing is asserted."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_from_logits  # noqa: E402
import bench_fused_linear  # noqa: E402


def test_from_logits_every_peer_has_a_row(tmp_path):
    out = tmp_path / "rows.json"
    rows = bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32,bf16", "--repeats", "1", "--json", str(out),
                                   "--markdown", str(tmp_path / "rows.md")])
    assert [row["peer"] for row in rows] == bench_from_logits.PEERS * 2
    by_peer = {row["peer"]: row for row in rows if row["dtype"] == "fp32"}
    for name in ("ours", "ours_inplace", "eager", "compile"):
        assert by_peer[name]["ms"] > 0, by_peer[name]
    assert "CUDA" in by_peer["ours_unchecked"]["note"] and "CUDA" in by_peer["liger"]["note"]
    assert by_peer["ours"]["time_vs_ours"] == pytest.approx(1.0)
    assert len(json.loads(out.read_text())["rows"]) == len(rows)
    assert "| 2x8x64 | fp32 | ours |" in (tmp_path / "rows.md").read_text()


def test_fused_linear_default_cpu_methods_run(tmp_path):
    out = tmp_path / "rows.json"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--json", str(out),
                             "--markdown", str(tmp_path / "rows.md")])
    assert "| 2x8x16x64 | fp32 | fused |" in (tmp_path / "rows.md").read_text()
    rows = json.loads(out.read_text())["results"]
    assert [row["method"] for row in rows] == bench_fused_linear.DEFAULT_METHODS["cpu"].split(",")
    assert all(row["ms"] > 0 and row["note"] is None for row in rows), rows


def test_fused_linear_gpu_peers_say_why_they_cannot_run_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    peers = "cce_filter,cce_nofilter,liger_simpo,trl_chunked"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--methods", f"fused,{peers}",
                             "--json", str(out)])
    rows = {row["method"]: row for row in json.loads(out.read_text())["results"]}
    for name in peers.split(","):
        assert rows[name]["ms"] is not None or rows[name]["note"], rows[name]
