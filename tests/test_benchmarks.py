"""The benchmark scripts run end to end in their smoke mode (tiny models, few tokens)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_latency_benchmark_smoke(tmp_path):
    out = tmp_path / "latency"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names[:3] == ["HF greedy", "HF assisted", "pace_core K=0"]
    assert any(n.startswith("pace_core PARD K=") for n in names)
    for row in result["rows"]:  # float32: every variant produces HF greedy's tokens
        assert row["token_match_vs_hf_greedy"] == 1.0, row
        assert row["tokens_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| HF greedy |" in out.with_suffix(".md").read_text()
