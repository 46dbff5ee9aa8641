"""Closed-loop HTTP load against the OpenAI-compatible endpoint: streaming completions,
a concurrency sweep, throughput and TTFT / inter-token latency percentiles; optionally
replicas 1 vs 2 (it launches `serve run` itself) and the overhead of HTTP + Serve over
the in-process engine at concurrency 1.

    serve run serve_config.yaml &                      # then:
    python benchmarks/serving.py --concurrency 1,2,4,8
    python benchmarks/serving.py --launch-replicas 1,2 --concurrency 1,2,4 --in-process
    python benchmarks/serving.py --smoke               # tiny models, launches its own server (CI)

Traffic goes to loopback only unless --allow-remote is given. Writes <out>.json/.md/.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import fmt, load_prompts, pct, pyplot, save_table  # noqa: E402


def check_loopback(url: str, allow_remote: bool) -> None:
    host = urlparse(url).hostname or ""
    if not allow_remote and not (host in ("localhost", "::1") or host.startswith("127.")):
        sys.exit(f"refusing to load {host}: not a loopback address (pass --allow-remote for your own remote server)")


async def one_request(client, url, model, prompt, max_tokens, headers) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, usage = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return {"ok": False, "status": resp.status_code, "latency": time.perf_counter() - t0}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                arrivals.append(time.perf_counter() - t0)
    n = usage["completion_tokens"] if usage else len(arrivals)
    latency = time.perf_counter() - t0
    # inter-token latency: gaps between text chunks, shared by the tokens they carry;
    # TPOT from the first to the last text chunk (as vLLM's benchmark_serving: the
    # usage chunk and [DONE] after the last token are not token latency)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    per_token = (arrivals[-1] - arrivals[0]) / max(n - 1, 1) if arrivals else None
    return {"ok": True, "status": 200, "latency": latency, "ttft": arrivals[0] if arrivals else latency,
            "tokens": n, "tpot": per_token, "gaps": gaps}


async def closed_loop(url, model, prompts, concurrency, num_requests, max_tokens, headers, raw=False):
    import httpx

    queue = list(range(num_requests))
    results = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(w):
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, model, prompts[i % len(prompts)], max_tokens, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    if raw:
        return results
    ok = [r for r in results if r["ok"]]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "errors": sorted({r["status"] for r in results if not r["ok"]}),
        "throughput_tok_s": sum(r["tokens"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
        "ttft_ms_p50": 1000 * pct([r["ttft"] for r in ok], 0.5), "ttft_ms_p90": 1000 * pct([r["ttft"] for r in ok], 0.9),
        "tpot_ms_p50": 1000 * pct(tpot, 0.5), "tpot_ms_p90": 1000 * pct(tpot, 0.9),
        "tokens": sum(r["tokens"] for r in ok), "chunks": sum(len(r["gaps"]) + 1 for r in ok if r["tpot"] is not None),
        "latency_s_p50": pct([r["latency"] for r in ok], 0.5), "latency_s_p90": pct([r["latency"] for r in ok], 0.9),
    }


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds used so far by this host's serving processes, by role (Linux /proc;
    empty elsewhere): where a streamed chunk's CPU goes, next to the engine's own."""
    roles = {"engine": ("deployments.engine_process",), "replica (Serve side)": ("LLMReplica",),
             "router": (":Router",), "proxy": ("ProxyActor",), "Ray control plane": ("ray::", "/ray/")}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    totals: dict[str, float] = {}
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        role = "load generator" if int(pid) == os.getpid() else next(
            (r for r, keys in roles.items() if any(key in cmd for key in keys)), None)
        if role:
            totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {role: totals[role] for role in [*roles, "load generator"] if role in totals}


def wait_ready(url: str, timeout: float = 300, proc=None) -> str:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/v1/models", timeout=5)
            if r.status_code == 200 and r.json().get("data"):
                return r.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no answer from {url}/v1/models within {timeout:.0f}s")


def launch(config: dict, replicas: int, port: int):
    """`serve run` a copy of the serve config with `replicas` replicas on 127.0.0.1:port,
    under a Ray of its own (RAY_TMPDIR in the launch's temporary directory, beside the
    log): :func:`stop` stops that Ray and nothing else. Returns (process, log path)."""
    import yaml

    cfg = json.loads(json.dumps(config))
    cfg.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    app.setdefault("args", {})["num_replicas"] = replicas
    app["args"].pop("autoscaling", None)
    path = Path(tempfile.mkdtemp(prefix="pace-serving-")) / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # as the README's command: deployments.NODE_ENV (a value set in the benchmark's
    # environment wins, e.g. RAY_SERVE_PROXY_USE_GRPC=0 to measure without)
    from deployments import NODE_ENV

    env = {**NODE_ENV, **os.environ, "RAY_DASHBOARD_ENABLED": "0", "RAY_TMPDIR": str(path.parent / "ray")}
    log = open(path.with_suffix(".log"), "w")
    proc = subprocess.Popen(["serve", "run", str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return proc, path.with_suffix(".log")


def stop(proc, log: Path) -> None:
    """Stop what :func:`launch` started: serve run's process group, then whatever is left
    of its own Ray (the processes under its RAY_TMPDIR). Never `ray stop`, which stops
    every Ray of this user on the host."""
    import shutil
    import signal

    import psutil

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    ray_tmp = str(log.parent / "ray")
    for _ in range(3):
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(ray_tmp in arg for arg in p.info["cmdline"] or ()):
                    left.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left:
            break
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
    shutil.rmtree(ray_tmp, ignore_errors=True)  # that Ray's session files (the log stays)


def replica_cpus(app_args: dict) -> list[int] | None:
    """The CPUs of the slot a running replica holds on this host (None: none held)."""
    from pace_core.numa import slot_status

    held = [s for s in slot_status(cores_per_slot=app_args.get("cores_per_slot")) if not s["free"]]
    return held[0]["cpus"] if len(held) == 1 else None


def http_vs_in_process(args, url, model, prompts, headers, pairs: int) -> dict:
    """Overhead of HTTP + Serve over the engine itself, at concurrency 1: the same
    engine in this process, pinned to the CPU(s) of the (single, idle meanwhile)
    replica, alternating request by request with HTTP requests for the same prompts,
    so machine drift hits both alike. Reports medians and the median paired ratio."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments.args import AppArgs
    from pace_core import LLMModel, SamplingConfig

    cpus = replica_cpus(args.app_args)
    pool = ThreadPoolExecutor(1, initializer=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    model_config = AppArgs.model_validate(args.app_args).model  # the replicas' engine config
    llm = pool.submit(LLMModel.from_config, model_config, len(cpus) if cpus else 1).result()

    def engine(prompt: str) -> dict:
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for event in llm.stream(prompt, SamplingConfig(max_new_tokens=args.max_tokens)):
            if getattr(event, "text", ""):  # the same definition as one_request: first and last text chunk
                last = time.perf_counter() - t0
                first = last if first is None else first
            n += len(getattr(event, "token_ids", ()))
        first = first if first is not None else time.perf_counter() - t0
        return {"ttft": first, "tpot": ((last or first) - first) / max(n - 1, 1)}

    http, local = [], []
    for i in range(pairs + 1):
        prompt = prompts[i % len(prompts)]
        h = asyncio.run(closed_loop(url, model, [prompt], 1, 1, args.max_tokens, headers, raw=True))[0]
        e = pool.submit(engine, prompt).result()
        if i and h["ok"]:  # the first pair is warm-up
            http.append(h)
            local.append(e)
    pool.shutdown()
    med = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    return {"pairs": len(http), "pinned_cpus": cpus,
            "in_process_ttft_ms_p50": med([e["ttft"] for e in local]), "in_process_tpot_ms_p50": med([e["tpot"] for e in local]),
            "http_ttft_ms_p50": med([h["ttft"] for h in http]), "http_tpot_ms_p50": med([h["tpot"] for h in http]),
            "tpot_ratio_p50": statistics.median(h["tpot"] / e["tpot"] for h, e in zip(http, local)),
            "ttft_added_ms_p50": med([h["ttft"] - e["ttft"] for h, e in zip(http, local)])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("PACE_API_KEY"))
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=Path, default=ROOT / "benchmarks" / "prompts" / "heldout.txt")
    ap.add_argument("--launch-replicas", default=None, help="e.g. 1,2: run `serve run` on serve_config.yaml per count")
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    ap.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="override an app argument of --config for launched servers, e.g. stream_interval_ms=0 "
                         "or model.dtype=bfloat16")
    ap.add_argument("--in-process", action="store_true",
                    help="also measure HTTP + Serve against the engine in-process, interleaved, at concurrency 1 "
                         "(with the first server, ideally 1 replica)")
    ap.add_argument("--pairs", type=int, default=24, help="interleaved HTTP / in-process request pairs")
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving"))
    ap.add_argument("--smoke", action="store_true", help="tiny models, 1 replica, few requests (CI)")
    args = ap.parse_args(argv)
    check_loopback(args.url, args.allow_remote)
    import yaml

    config = yaml.safe_load(args.config.read_text())
    for item in args.app_arg:
        key, _, value = item.partition("=")
        config["applications"][0].setdefault("args", {})[key] = yaml.safe_load(value)
    if args.smoke:
        from pace_core.testing import build_pair

        target, draft = build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")
        config["applications"][0]["args"]["model"] = {
            "model_name_or_path": target, "dtype": "float32",
            "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 3}}
        args.launch_replicas, args.concurrency, args.requests, args.max_tokens = "1", "1,2", 4, 48
        args.in_process, args.prompts, args.pairs = True, None, 3
        args.url = "http://127.0.0.1:8765"
    args.app_args = config["applications"][0].get("args", {})
    prompts = load_prompts(args.prompts, 32)
    levels = [int(c) for c in args.concurrency.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows, in_proc = [], None
    for replicas in ([int(r) for r in args.launch_replicas.split(",")] if args.launch_replicas else [None]):
        proc = None
        if replicas is not None:
            port = urlparse(args.url).port or 8000
            proc, log = launch(config, replicas, port)
            print(f"launched serve run with {replicas} replica(s), log {log}", file=sys.stderr)
        try:
            model = args.model or wait_ready(args.url, proc=proc)
            asyncio.run(closed_loop(args.url, model, prompts, 1, 2, args.max_tokens, headers))  # warm-up
            for c in levels:
                cpu0 = cpu_seconds_by_role() if proc is not None else {}
                row = asyncio.run(closed_loop(args.url, model, prompts, c, max(args.requests, c), args.max_tokens, headers))
                row["replicas"] = replicas
                if cpu0 and row["chunks"]:  # a server launched here: its processes are on this host
                    cpu1 = cpu_seconds_by_role()
                    row["cpu_ms_per_chunk"] = {k: 1000 * (v - cpu0.get(k, 0.0)) / row["chunks"] for k, v in cpu1.items()}
                rows.append(row)
                print(f"  replicas={replicas} concurrency={c}: {row['throughput_tok_s']:.1f} tok/s, "
                      f"TTFT p50 {row['ttft_ms_p50']:.1f} ms, TPOT p50 {row['tpot_ms_p50']:.2f} ms, "
                      f"errors {row['errors']}", file=sys.stderr)
            if args.in_process and in_proc is None:
                in_proc = http_vs_in_process(args, args.url, model, prompts, headers, args.pairs)
                in_proc["replicas"] = replicas
                print(f"  HTTP vs in-process: TPOT x{in_proc['tpot_ratio_p50']:.3f}, "
                      f"TTFT +{in_proc['ttft_added_ms_p50']:.1f} ms", file=sys.stderr)
        finally:
            if proc is not None:
                stop(proc, log)
    write_outputs(Path(args.out), rows, in_proc, args)
    return 0


def write_outputs(out: Path, rows, in_proc, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "in_process": in_proc, "command": cmd,
                                                    "max_tokens": args.max_tokens}, indent=1))
    lines = [f"streaming /v1/completions, {args.max_tokens} tokens per request, greedy; `{cmd}`", "",
             "| replicas | concurrency | requests ok | throughput tok/s | TTFT ms p50 | TTFT ms p90 | TPOT ms p50 | TPOT ms p90 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['replicas'] or '-'} | {r['concurrency']} | {r['ok']}/{r['requests']} | "
                     f"{fmt(r['throughput_tok_s'])} | {fmt(r['ttft_ms_p50'])} | {fmt(r['ttft_ms_p90'])} | "
                     f"{fmt(r['tpot_ms_p50'], '.2f')} | {fmt(r['tpot_ms_p90'], '.2f')} |")
    cpu_rows = [r for r in rows if r.get("cpu_ms_per_chunk")]
    if cpu_rows:
        roles = list(cpu_rows[0]["cpu_ms_per_chunk"])
        lines += ["", "CPU ms per streamed chunk, by process role (this host's /proc, over each level's requests):", "",
                  "| replicas | concurrency | tokens/chunk | " + " | ".join(roles) + " |",
                  "|---:|---:|---:|" + "---:|" * len(roles)]
        for r in cpu_rows:
            lines.append(f"| {r['replicas']} | {r['concurrency']} | {r['tokens'] / r['chunks']:.1f} | "
                         + " | ".join(f"{r['cpu_ms_per_chunk'].get(k, 0.0):.2f}" for k in roles) + " |")
    if in_proc:
        p = in_proc
        where = f"pinned to CPU(s) {p['pinned_cpus']}, the replica's" if p["pinned_cpus"] else "unpinned"
        lines += ["", f"HTTP + Serve vs the engine in-process ({where}), {p['pairs']} interleaved request pairs at "
                      f"concurrency 1 with {p['replicas'] or '?'} replica(s):", "",
                  "| | TTFT ms p50 | TPOT ms p50 |", "|---|---:|---:|",
                  f"| in-process | {p['in_process_ttft_ms_p50']:.1f} | {p['in_process_tpot_ms_p50']:.2f} |",
                  f"| HTTP + Serve | {p['http_ttft_ms_p50']:.1f} | {p['http_tpot_ms_p50']:.2f} |", "",
                  f"Paired medians: TPOT x{p['tpot_ratio_p50']:.3f} ({100 * (p['tpot_ratio_p50'] - 1):+.1f}%), "
                  f"TTFT +{p['ttft_added_ms_p50']:.1f} ms."]
    save_table(out, "\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for replicas in sorted({r["replicas"] or 0 for r in rows}):
        sel = [r for r in rows if (r["replicas"] or 0) == replicas]
        label = f"{replicas} replica(s)" if replicas else "server"
        ax1.plot([r["concurrency"] for r in sel], [r["throughput_tok_s"] for r in sel], "o-", label=label)
        ax2.plot([r["concurrency"] for r in sel], [r["tpot_ms_p50"] for r in sel], "o-", label=f"{label} TPOT p50")
        ax2.plot([r["concurrency"] for r in sel], [r["ttft_ms_p90"] for r in sel], "s--", label=f"{label} TTFT p90")
    ax1.set_xlabel("concurrent clients"), ax1.set_ylabel("tokens / s"), ax1.set_title("Throughput")
    ax2.set_xlabel("concurrent clients"), ax2.set_ylabel("ms"), ax2.set_title("Latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
