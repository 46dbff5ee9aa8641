"""The benchmark scripts run end to end in their smoke mode (tiny models, few tokens)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _serving_script(script: str, tmp_path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a benchmark script that starts Ray Serve (its replicas take their slot locks in
    a directory of this test's own); fail with its stderr unless it succeeds."""
    env = {**os.environ, "PACE_SLOT_DIR": str(tmp_path / "slots")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_latency_benchmark_smoke(tmp_path):
    out = tmp_path / "latency"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names[:3] == ["HF greedy", "HF assisted", "pace_core K=0"]
    assert any(n.startswith("pace_core PARD K=") for n in names)
    assert any(n.startswith("pace_core PARD adaptive K<=") for n in names)
    assert "Best pace_core:" in out.with_suffix(".md").read_text()
    for row in result["rows"]:  # float32: every greedy variant produces HF greedy's tokens
        assert row["token_match_vs_hf_greedy"] == (None if ", T=0.7" in row["variant"] else 1.0), row
        assert row["tokens_per_s"] > 0
    assert names[-2:] == ["pace_core K=0, T=0.7", "pace_core PARD adaptive K<=2, T=0.7"]  # sampled rows
    assert result["rows"][-1]["mean_accepted"] >= 1
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| HF greedy |" in out.with_suffix(".md").read_text()


@pytest.mark.slow  # starts Ray Serve (the default suite covers Serve in test_serve.py)
def test_serving_benchmark_smoke(tmp_path):
    """Launches `serve run` on tiny models (1 replica), a concurrency sweep, and the
    in-process comparison."""
    out = tmp_path / "serving"
    _serving_script("serving.py", tmp_path, "--smoke", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["concurrency"] for r in result["rows"]] == [1, 2]
    assert all(r["ok"] == r["requests"] and r["throughput_tok_s"] > 0 for r in result["rows"])
    if sys.platform.startswith("linux"):  # CPU per streamed chunk by process role, from /proc
        cpu = result["rows"][0]["cpu_ms_per_chunk"]
        assert {"engine", "router", "proxy", "load generator"} <= set(cpu) and cpu["engine"] > 0
    paired = result["in_process"]
    assert paired["pairs"] == 3 and paired["in_process_tpot_ms_p50"] > 0 and paired["http_tpot_ms_p50"] > 0
    assert paired["tpot_ratio_p50"] > 0
    assert "vs the engine in-process" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow  # starts Ray Serve
def test_stream_cost_benchmark_smoke(tmp_path):
    """benchmarks/stream_cost.py on tiny models: every hop's chunks measured, each a few
    tokens' ids and text, from the first to the last (no statistics riding on them: the
    running statistics took >1.5 KB a chunk from the start and grew), and both ratios."""
    out = tmp_path / "stream_cost"
    _serving_script("stream_cost.py", tmp_path, "--smoke", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    for hop in ("engine_to_replica", "replica_to_router"):
        sizes = result[hop]
        assert sizes["chunks"] > 10 and sizes["bytes_max"] < 1000, sizes  # a chunk's size varies with its tokens
    assert result["http"]["last_over_first_median"] > 0 and result["in_process"]["last_over_first_median"] > 0
    assert "| HTTP |" in out.with_suffix(".md").read_text()


@pytest.mark.slow  # starts Ray Serve, three times
def test_multi_turn_benchmark_smoke(tmp_path):
    """benchmarks/multi_turn.py: 2 conversations x 3 turns on tiny models, 2 replicas,
    for no cache, cache with Serve's routing and cache-aware routing; the script checks
    its own output's structure too."""
    out = tmp_path / "multi_turn"
    _serving_script("multi_turn.py", tmp_path, "--smoke", "--out", str(out), timeout=900)
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["configs"]) == ["a", "b", "c"]
    assert result["configs"]["a"]["app_args"] == {"model.prefix_cache_gb": 0, "routing": "power_of_two"}
    assert result["configs"]["c"]["app_args"]["routing"] == "cache_aware"
    for key, config in result["configs"].items():
        turns = sorted(config["turns"], key=lambda t: (t["conversation"], t["turn"]))
        expected = [(f"conv-{c}", n) for c in range(2) for n in (1, 2, 3)]
        assert [(t["conversation"], t["turn"]) for t in turns] == expected, key
        assert all(t["ok"] and t["ttft_s"] > 0 and t["prompt_tokens"] > 0 for t in turns), key
        for c in range(2):  # each turn resends the history: its prompt grows
            sizes = [t["prompt_tokens"] for t in turns if t["conversation"] == f"conv-{c}"]
            assert sizes == sorted(sizes) and sizes[0] < sizes[-1], (key, sizes)
    assert all(t["cached_tokens"] == 0 for t in result["configs"]["a"]["turns"])  # no cache
    assert result["ratios"]["ttft_p50_later_a_over_c"] > 0 and result["cpu"]["isa"]
    assert [t["turn"] for t in result["engine_alone"]["cache"]["turns"]] == [1, 2, 3]  # engine alone, 1 conversation
    md = out.with_suffix(".md").read_text()
    assert "(a)/(c) x" in md and "| (c) cache, cache-aware routing |" in md
    assert out.with_suffix(".png").stat().st_size > 1000


def test_engine_bench_speaks_pace_bench_json(tmp_path):
    """benchmarks/engine_bench.py: pace_core under AMD PACE's measuring protocol, with
    pace_bench.py's JSON fields, so latency.py can run both the same way."""
    from pace_core.testing import build_pair

    target, draft = build_pair(tmp_path / "models", "qwen2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nimport os\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--target", target,
                          "--draft", draft, "--k", "3", "--prompts", str(prompts), "--max-new-tokens", "6",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["engine"] == "pace_core" and out["k"] == 3 and out["mode"] == "pard-adaptive"
    assert [r["prompt"] for r in out["results"]] == ["def add(a, b):", "import os\n"]
    assert all(len(r["new_token_ids"]) <= 6 and r["seconds"] > 0 for r in out["results"])
    assert out["tokens"] == sum(len(r["new_token_ids"]) for r in out["results"]) and out["tokens_per_second"] > 0


@pytest.mark.slow  # starts Ray Serve
def test_replica_overhead_smoke(tmp_path):
    """benchmarks/replica_overhead.py: the engine's own time inside a Serve replica,
    streamed and not, against in-process (tiny models, 2 pairs)."""
    run = _serving_script("replica_overhead.py", tmp_path, "--smoke")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    ratios = out["engine_tpot_in_replica_over_in_process"]
    assert out["pairs"] == 2 and set(ratios) == {"streamed", "not streamed"}
    assert all(r > 0 for r in ratios.values())


def test_forward_profile_smoke():
    """Stage times of the native forward per weight format, and the kernels' rates beside
    the core's measured peaks."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forward_profile.py"), "--smoke", "--formats",
                          "float32,int4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    forwards = [r for r in rows if "tokens" in r]
    assert [(r["format"], r["tokens"]) for r in forwards] == [("float32", 1), ("float32", 9), ("int4", 1), ("int4", 9)] * 2
    for r in forwards:
        assert r["read_bandwidth_gbs"] > 0 and r["forward_ms"] > 0 and r["weight_gb"] > 0
        if r["forward_kind"] == "lean-native":
            stages = r["stages_ms"]
            assert stages["qkv"] > 0 and stages["head"] > 0 and stages["gate_up_silu"] > 0 and stages["down"] > 0
            assert (stages["down_prepare"] > 0) == (r["format"] == "int4")  # int8 inputs prepared for int4
    rates = rows[-1]["kernel_gmacs_per_core"]
    assert rates["peak_gmacs"]["fma"] > 0 and set(rates) == {"peak_gmacs", "float32", "int4"}
    assert all(v > 0 for v in rates["float32"].values())


def test_real_shapes_benchmark_smoke(tmp_path):
    """Builds a random model and its sliced draft and measures every weight format: load,
    forwards of 1..13 tokens against the bandwidth floor, decode, prefill, PARD with the
    random and the oracle draft, transformers; PARD's output is greedy's in every format."""
    out = tmp_path / "real_shapes"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_shapes.py"), "--smoke", "--out", str(out),
                          "--cache", str(tmp_path / "models")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["format"] for r in results] == ["float32", "bfloat16", "int8", "int4"]
    for r in results:
        assert r["floor_ms"] > 0 and r["bandwidth_gbs"] > 0 and r["load"]["rss_gb"] > 0
        assert [int(n) for n in r["forward"]] == [1, 2, 5, 9, 13] and all(v["min_ms"] > 0 for v in r["forward"].values())
        assert r["decode"]["pace_core"] and r["prefill"]["pace_core"][0] > 0 and r["decode"]["llama.cpp"] == []
        assert r["pard"]["oracle draft"]["tokens_per_step"] == 4.0  # 3 right per step + the correction, K = 4
        assert all(p["same_tokens_as_greedy"] for p in r["pard"].values()), r["format"]
    assert results[0]["baselines"]["transformers generate"]["same_tokens_as_pace_core"]
    assert results[2]["weight_gb"] < results[1]["weight_gb"] < results[0]["weight_gb"]  # int8 < bf16 < f32 bytes
    md = out.with_suffix(".md").read_text()
    assert "| int4 (q4_0) |" in md and "| float32 | transformers generate |" in md
    assert out.with_suffix(".png").stat().st_size > 1000


def test_quality_benchmark_smoke(tmp_path):
    """benchmarks/quality.py on a tiny random pair: KL, perplexity, agreement per format,
    and acceptance with quantized drafts."""
    out = tmp_path / "quality"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["rows"]) == ["pace_core bfloat16", "pace_core int8", "pace_core int4"]
    for row in result["rows"].values():
        assert row["kl_mean"] >= 0 and 0 < row["top1_agreement"] <= 1 and row["ppl"] > 0
    assert result["rows"]["pace_core bfloat16"]["kl_mean"] < result["rows"]["pace_core int4"]["kl_mean"]
    assert len(result["acceptance"]) == 9 and all(v >= 1 for v in result["acceptance"].values())
