"""Multi-turn serving benchmark (issues 15, 24): conversations whose every turn resends
the whole history plus new user text, so a replica that served the previous turn holds
most of the prompt in its engine's prefix KV cache. Launches the app (`serve run`, N
replicas) once per configuration:

    a  no prefix cache, Serve's default routing   (model.prefix_cache_gb: 0, routing: power_of_two)
    b  prefix cache, Serve's default routing      (routing: power_of_two)
    c  prefix cache, cache-aware routing          (routing: cache_aware; the defaults)

and runs the same conversations against each: streaming /v1/chat/completions, greedy,
each conversation's id as the OpenAI ``user`` field and the X-Session-ID header; C
workers each run their conversations one turn after another (a turn starts when the
previous answer is complete). Turn 1 sends ``--first-tokens`` tokens of a held-out
Python standard-library file (the demo pair never trained on it); every later turn
appends the assistant's answer and the file's next ``--turn-tokens`` tokens. Two
workloads set those (WORKLOADS): ``short-turns`` (8 conversations x 6 turns, ~100 new
tokens a turn) and ``long-turns`` (issue 24's: 4 conversations x 5 turns, ~230 new
tokens a turn, 48-token answers); both have more conversations than replicas.

Per configuration: TTFT p50/p90 of turn 1 and of turns 2+, end-to-end latency, the
prefix-cache hit rate over turns 2+ (cached / prompt tokens, from each response's
usage.prompt_tokens_details.cached_tokens; and the share of requests with any cached
token, or with the previous turn's prompt cached, all its whole blocks: landed where
the history is), the server's own /metrics counters over the measured requests, where
each turn ran and how long it waited for its replica (serve run's log, by request id),
where each turn's time to first token went (the router's timing line: the HTTP proxy,
the router, the way to the engine, the engine's prepare, KV reuse and first step, the
way back), and the TTFT of 1-token answers (the HTTP overhead); the TTFT p50 ratios of
turns 2+, a/c and a/b; and the same conversations on the engine alone, in-process,
without and with the cache, whose first steps are the prefill of the uncached tokens:
issue 24's target for (c), TTFT p50 of turns 2+ <= 1.5 x (that prefill + the HTTP
overhead) and >= 3x lower than (a), is checked at the end of the table.

    python benchmarks/multi_turn.py                          # short-turns, a,b,c -> results/multi_turn
    python benchmarks/multi_turn.py --workload long-turns    # -> results/multi_turn_long_turns
    python benchmarks/multi_turn.py --configs a,c            # without (b)
    python benchmarks/multi_turn.py --smoke                  # tiny models, 2 x 3 turns, a temp dir (CI)

Each launch runs its own Ray under a private RAY_TMPDIR (and a private slot-lock
directory unless PACE_SLOT_DIR is set) and stops only that Ray. Traffic goes to
127.0.0.1 only. Writes <out>.json/.md/.png; progress on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import fmt, pct, pyplot, save_table  # noqa: E402
from serving import check_loopback, launch, stop, wait_ready  # noqa: E402

WORKLOADS = {  # conversations of turns; each later turn: the previous answer + turn_tokens of new text
    # the committed default (issue 15): 8 conversations of 6 turns, ~100 new tokens a turn
    "short-turns": {"conversations": 8, "turns": 6, "first_tokens": 560, "turn_tokens": 100, "max_tokens": 64},
    # issue 24's: fewer, longer turns, twice as many conversations as replicas
    "long-turns": {"conversations": 4, "turns": 5, "first_tokens": 700, "turn_tokens": 230, "max_tokens": 48},
}
CONFIGS = {  # key: (label, app arguments over the base config's; a dotted key is a nested field)
    "a": ("no cache", {"model.prefix_cache_gb": 0, "routing": "power_of_two"}),
    "b": ("cache, default routing", {"routing": "power_of_two"}),
    "c": ("cache, cache-aware routing", {"routing": "cache_aware"}),
}
# the parts of a served request's time to first token: the HTTP proxy (both ways), then
# the router's timing line (deployments.router._log_timing)
TIMING_PARTS = ("http", "http_in", "router", "to_engine", "prepare", "kv_load", "first_step", "engine_other", "back")
METRICS = ("pace_prefix_cache_hits_total", "pace_prefix_cache_queries_total", "pace_prefix_cache_cached_tokens_total",
           "pace_prompt_tokens_total", "pace_time_to_first_token_seconds_sum", "pace_time_to_first_token_seconds_count")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def set_arg(app_args: dict, key: str, value) -> None:
    """``app_args[key] = value``, a dotted key naming a nested field ("model.dtype")."""
    *parents, leaf = key.split(".")
    for name in parents:
        app_args = app_args.setdefault(name, {})
    app_args[leaf] = value


def get_arg(app_args: dict, key: str):
    for name in key.split("."):
        app_args = app_args.get(name) if isinstance(app_args, dict) else None
    return app_args


# ---------------------------------------------------------------- conversations
def chunk_lines(tokenizer, text: str, sizes: list[int]) -> list[str] | None:
    """Consecutive pieces of ``text``, whole lines each, the i-th at least ``sizes[i]``
    tokens (the first line that reaches it ends the piece); None if the text runs out."""
    lines = [line for line in text.splitlines(keepends=True)]
    pieces, i = [], 0
    for size in sizes:
        piece, n = [], 0
        while n < size:
            if i >= len(lines):
                return None
            piece.append(lines[i])
            n += len(tokenizer.encode(lines[i], add_special_tokens=False))
            i += 1
        pieces.append("".join(piece).rstrip("\n"))
    return pieces


def conversation_texts(tokenizer, n: int, turns: int, first_tokens: int, turn_tokens: int) -> list[dict]:
    """``n`` conversations' user messages (``turns`` each) cut from the held-out files of
    the demo corpus (pace_core.training.corpus: the stdlib, every 25th file), in sorted
    order, skipping the encodings tables and files too short."""
    from pace_core.training import corpus

    out = []
    sizes = [first_tokens] + [turn_tokens] * (turns - 1)
    for rel in corpus.split_files()[1]:
        if rel.startswith("encodings/"):
            continue
        text = (corpus.stdlib_dir() / rel).read_text(encoding="utf-8")
        pieces = chunk_lines(tokenizer, text, sizes)
        if pieces:
            out.append({"id": f"conv-{len(out)}", "source": rel, "user": pieces})
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} held-out files hold {sum(sizes)} tokens: lower --first-tokens/--turn-tokens")


def warmup_texts(tokenizer, tokens: int) -> list[str]:
    """Two prompts of benchmarks/prompts/heldout.txt's text (~``tokens`` tokens): not
    the conversations' files, so they share no cache block with them."""
    text = (ROOT / "benchmarks" / "prompts" / "heldout.txt").read_text(encoding="utf-8")
    pieces = chunk_lines(tokenizer, text, [tokens, tokens]) or [text[:2000], text[-2000:]]
    return pieces


# ---------------------------------------------------------------- one turn, one config
async def one_turn(client, url, model, messages, max_tokens, session, headers, request_id=None) -> dict:
    """One streamed chat turn; ``request_id`` becomes Serve's request id (X-Request-ID),
    which the replicas' log lines carry: where the turn ran (replica_of_requests)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "user": session}
    t0 = time.perf_counter()
    ttft, usage, text = None, None, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={**headers, "X-Session-ID": session,
                                      **({"X-Request-ID": request_id} if request_id else {})}) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:300]
            return {"ok": False, "status": resp.status_code, "error": detail, "e2e_s": time.perf_counter() - t0}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"ok": False, "status": 200, "error": str(event["error"])[:300],
                        "e2e_s": time.perf_counter() - t0}
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = time.perf_counter() - t0 if ttft is None else ttft
                    text.append(piece)
    e2e = time.perf_counter() - t0
    usage = usage or {}
    return {"ok": True, "status": 200, "ttft_s": ttft if ttft is not None else e2e, "e2e_s": e2e,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "answer": "".join(text)}


async def run_conversations(url, model, convs, concurrency, max_tokens, headers, label) -> list[dict]:
    """Worker w runs conversations w, w + C, ... in turn, each turn after the previous
    answer; returns one record per turn (start_s: since the first turn began)."""
    import httpx

    records = []
    t0 = time.perf_counter()
    tag = f"mt{os.getpid()}-{int(time.time())}-{label.strip('()')}"
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(w):
            for conv in convs[w::concurrency]:
                messages = []
                for turn, user in enumerate(conv["user"], 1):
                    messages.append({"role": "user", "content": user})
                    rid = f"{tag}-{conv['id']}-t{turn}"
                    start, wall = time.perf_counter() - t0, time.time()
                    r = await one_turn(client, url, model, messages, max_tokens, conv["id"], headers, rid)
                    r.update(conversation=conv["id"], turn=turn, worker=w, request_id=rid, start_s=start,
                             start_wall=wall)
                    records.append(r)
                    if not r["ok"]:
                        log(f"  {label} {conv['id']} turn {turn}: HTTP {r['status']} {r.get('error', '')}")
                        break
                    log(f"  {label} {conv['id']} turn {turn}: TTFT {1000 * r['ttft_s']:.0f} ms, e2e "
                        f"{1000 * r['e2e_s']:.0f} ms, prompt {r['prompt_tokens']}, cached {r['cached_tokens']}, "
                        f"answer {r['completion_tokens']} tokens")
                    messages.append({"role": "assistant", "content": r["answer"]})

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return records


def replica_of_requests(logfile: Path, records: list[dict]) -> None:
    """Each turn's replica ("r0", "r1", ... in order of first appearance) and how long
    after the client sent it the replica began it (``wait_s``: the proxy and router, and
    the wait for a replica), from the replicas' Serve access lines in serve run's log:
    "INFO <date> <time,ms> pace_LLMReplica <replica> <request id> -- CALL stream OK <ms>ms"
    (logged at the call's end, local time); and where its time to first token went
    (``timing_ms``: the router's "timing {...}" line, deployments.router._log_timing).
    None where the log has no line for a turn."""
    import re
    from datetime import datetime

    text = logfile.read_text(errors="replace") if logfile.is_file() else ""
    timing = {rid: json.loads(fields) for rid, fields in re.findall(r"pace_Router \S+ (\S+) -- timing (\{.*\})", text)}
    where = {}
    for stamp, rep, rid, ms in re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) pace_LLMReplica (\S+) (\S+) "
                                          r"-- CALL stream OK ([\d.]+)ms", text):
        end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        where[rid] = (rep, end - float(ms) / 1000)
    names: dict[str, str] = {}
    for r in sorted(records, key=lambda r: r.get("start_s", 0)):
        rep, began = where.get(r.get("request_id"), (None, None))
        r["replica"] = names.setdefault(rep, f"r{len(names)}") if rep else None
        r["wait_s"] = began - r["start_wall"] if began is not None and "start_wall" in r else None
        r["timing_ms"] = timing.get(r.get("request_id"))


def scrape(url: str, headers: dict, requests: int, timeout: float = 15) -> dict:
    """The METRICS counters of /metrics once they count ``requests`` generations (the
    router counts one when its stream has ended, which can be after the client's last
    chunk); {} without them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.time() + timeout
    while True:
        try:
            text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
        except httpx.HTTPError:
            return {}
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in METRICS:
                    out[s.name] = out.get(s.name, 0.0) + s.value
        if not out or out.get("pace_prefix_cache_queries_total", requests) >= requests or time.time() > deadline:
            return out
        time.sleep(0.2)


def summarize(records: list[dict], metrics: dict) -> dict:
    ok = [r for r in records if r["ok"]]
    first = [r for r in ok if r["turn"] == 1]
    later = [r for r in ok if r["turn"] > 1]
    prev = {(r["conversation"], r["turn"]): r for r in ok}
    # the previous turn's prompt, whole blocks of it, was cached: the turn landed where
    # its history was served (the engine caches 32-token blocks of the served sequence)
    landed = [r for r in later if (p := prev.get((r["conversation"], r["turn"] - 1)))
              and r["cached_tokens"] >= 32 * (p["prompt_tokens"] // 32)]
    ms = lambda xs, q: 1000 * pct(xs, q) if xs else None  # noqa: E731
    ttft = lambda rs: [r["ttft_s"] for r in rs]  # noqa: E731
    e2e = lambda rs: [r["e2e_s"] for r in rs]  # noqa: E731
    prompt_later = sum(r["prompt_tokens"] or 0 for r in later)
    turns = sorted({r["turn"] for r in ok})
    s = {
        "requests": len(records), "ok": len(ok), "errors": sorted({r["status"] for r in records if not r["ok"]}),
        "ttft_ms_turn1_p50": ms(ttft(first), 0.5), "ttft_ms_turn1_p90": ms(ttft(first), 0.9),
        "ttft_ms_later_p50": ms(ttft(later), 0.5), "ttft_ms_later_p90": ms(ttft(later), 0.9),
        "e2e_ms_p50": ms(e2e(ok), 0.5), "e2e_ms_p90": ms(e2e(ok), 0.9),
        "e2e_ms_later_p50": ms(e2e(later), 0.5), "e2e_ms_later_p90": ms(e2e(later), 0.9),
        "token_hit_rate_later": sum(r["cached_tokens"] for r in later) / prompt_later if prompt_later else None,
        "request_hit_rate_later": sum(r["cached_tokens"] > 0 for r in later) / len(later) if later else None,
        "previous_turn_hit_rate_later": len(landed) / len(later) if later else None,
        "prompt_tokens_last_turn_max": max((r["prompt_tokens"] or 0 for r in ok if r["turn"] == turns[-1]),
                                           default=None),
        "completion_tokens_mean": sum(r["completion_tokens"] or 0 for r in ok) / len(ok) if ok else None,
        "ttft_ms_p50_by_turn": {t: ms(ttft(r for r in ok if r["turn"] == t), 0.5) for t in turns},
        "cached_tokens_mean_by_turn": {t: sum(r["cached_tokens"] for r in ok if r["turn"] == t)
                                       / max(1, sum(r["turn"] == t for r in ok)) for t in turns},
        "server_metrics": metrics,
    }
    placed = [r for r in ok if r.get("replica")]
    if placed:
        # sessions that stayed on one replica; how long turns waited before their replica
        # began them (the affinity wait for a busy preferred replica shows here)
        by_conv: dict[str, set] = {}
        for r in placed:
            by_conv.setdefault(r["conversation"], set()).add(r["replica"])
        waits = [r["wait_s"] for r in placed if r["turn"] > 1 and r["wait_s"] is not None]
        waited = [r for r in placed if r["turn"] > 1 and r["wait_s"] is not None and r["wait_s"] > 0.05]
        s.update(turns_with_replica=len(placed), requests_by_replica={
                     rep: sum(r["replica"] == rep for r in placed) for rep in sorted({r["replica"] for r in placed})},
                 conversations_on_one_replica=sum(len(v) == 1 for v in by_conv.values()),
                 wait_ms_later_p50=ms(waits, 0.5), wait_ms_later_p90=ms(waits, 0.9),
                 turns_later_waited_over_50ms=len(waited), turns_later_placed=len(waits),
                 ttft_minus_wait_ms_later_p50=ms([r["ttft_s"] - r["wait_s"] for r in placed
                                                  if r["turn"] > 1 and r["wait_s"] is not None], 0.5))
    timed = [r for r in later if r.get("timing_ms")]
    if timed:
        # where the time to first token of turns 2+ went (p50 of each part, ms): the
        # router's timing line, and the rest of the client's TTFT (HTTP proxy, both ways)
        parts = {k: [r["timing_ms"][k] / 1000 for r in timed] for k in TIMING_PARTS if not k.startswith("http")}
        parts["http"] = [r["ttft_s"] - r["timing_ms"]["ttft"] / 1000 for r in timed]
        parts["http_in"] = [r["timing_ms"]["arrived_at"] - r["start_wall"] for r in timed]
        s["ttft_parts_ms_later_p50"] = {k: ms(v, 0.5) for k, v in parts.items()}
        s["uncached_tokens_later_p50"] = pct([r["timing_ms"]["prompt_tokens"] - r["timing_ms"]["cached_tokens"]
                                             for r in timed], 0.5)
    if metrics.get("pace_time_to_first_token_seconds_count"):
        s["server_ttft_ms_mean"] = 1000 * metrics["pace_time_to_first_token_seconds_sum"] / metrics[
            "pace_time_to_first_token_seconds_count"]
    if metrics.get("pace_prompt_tokens_total"):
        s["server_token_hit_rate"] = (metrics.get("pace_prefix_cache_cached_tokens_total", 0)
                                      / metrics["pace_prompt_tokens_total"])
    return s


# ---------------------------------------------------------------- launching
def run_config(key, config, args, convs, warmups, headers) -> dict:
    label, extra = CONFIGS[key]
    cfg = json.loads(json.dumps(config))
    app_args = cfg["applications"][0].setdefault("args", {})
    for k, v in extra.items():
        set_arg(app_args, k, v)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every replica's "engine ... loaded" line in the log
    proc, logfile = launch(cfg, args.replicas, args.port)
    log(f"({key}) {label}: serve run with {args.replicas} replicas, log {logfile}")
    url = f"http://127.0.0.1:{args.port}"
    try:
        model = wait_ready(url, timeout=args.ready_timeout, proc=proc)
        wait_replicas(logfile, args.replicas, proc, args.ready_timeout)
        # warm-up: two rounds of one request per replica, concurrent, sessions of their own
        async def warm():
            import httpx

            async with httpx.AsyncClient(timeout=600) as client:
                for rnd in range(2):
                    await asyncio.gather(*(one_turn(client, url, model, [{"role": "user", "content": text}],
                                                    args.max_tokens, f"warmup-{rnd}-{i}", headers)
                                           for i, text in enumerate(warmups[:args.replicas])))
        asyncio.run(warm())
        one_token = asyncio.run(one_token_ttfts(url, model, headers))
        warmed = 2 * min(args.replicas, len(warmups)) + len(one_token)
        before = scrape(url, headers, warmed)
        t0 = time.perf_counter()
        records = asyncio.run(run_conversations(url, model, convs, args.concurrency, args.max_tokens, headers,
                                                f"({key})"))
        wall = time.perf_counter() - t0
        after = scrape(url, headers, warmed + sum(r["ok"] for r in records))
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    finally:
        stop(proc, logfile)  # serve run and its own Ray only
    metrics = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in METRICS if k in after}
    replica_of_requests(logfile, records)
    s = summarize(records, metrics)
    s["wall_s"] = wall
    s["one_token_ttft_ms_p50"] = 1000 * pct(one_token, 0.5)
    # this host's 1-minute load average before the launch and after the conversations:
    # anything else running shares the CPUs with the replicas
    s["loadavg_1m"] = [load_before, load_after]
    log(f"({key}) {label}: TTFT turns 2+ p50 {fmt(s['ttft_ms_later_p50'])} ms, turn 1 p50 "
        f"{fmt(s['ttft_ms_turn1_p50'])} ms, token hit rate {fmt(s['token_hit_rate_later'], '.2f')}, "
        f"errors {s['errors']}")
    for r in records:
        r.pop("answer", None)
    return {"label": label, "app_args": {k: get_arg(app_args, k) for k in ("model.prefix_cache_gb", "routing")},
            "summary": s, "turns": records}


ONE_TOKEN = [{"role": "user", "content": "def f(x):"}]  # the HTTP overhead probe: a short prompt, a 1-token answer


async def one_token_ttfts(url, model, headers, n: int = 10) -> list[float]:
    """TTFT of ``n`` 1-token answers to a short prompt, one at a time on the idle server:
    with the engine alone's (engine_reference), what HTTP and Serve add to a first token."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        return [(await one_turn(client, url, model, ONE_TOKEN, 1, f"one-token-{i}", headers))["ttft_s"]
                for i in range(n)]


def wait_replicas(logfile: Path, replicas: int, proc, timeout: float = 300) -> None:
    """Until every replica logged its engine loaded (/v1/models answers as soon as one
    has; `serve run` of a config file does not log the app deployed)."""
    import re

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} (log {logfile})")
        text = logfile.read_text(errors="replace")
        if len(set(re.findall(r"replica pid (\d+): engine pid \d+ loaded", text))) >= replicas:
            return
        time.sleep(1)
    raise TimeoutError(f"fewer than {replicas} replicas loaded their engine within {timeout:.0f}s (log {logfile})")


def cpu_info() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wide = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    return {"model_name": fields.get("Model name", platform.processor()).strip(), "cpus": os.cpu_count(),
            "isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "neither avx2 nor avx512",
            "avx512_amx_flags": wide}


def engine_reference(app_args: dict, convs: list[dict], max_tokens: int) -> dict:
    """The same conversations on the engine alone, in this process (no HTTP, Serve or
    second replica), pinned as a replica's engine: this host's last ``cores_per_slot``
    CPUs, that many threads; without and with the prefix cache. TTFT per turn: to the
    first text chunk; the engine's own time_to_first_token_s, and its parts: the KV
    reuse and the first step (the prefill of the uncached tokens with the first
    proposals). Also the TTFT of 1-token answers to a short prompt (ONE_TOKEN), against
    which the served ones give the HTTP overhead."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments.args import AppArgs
    from pace_core import Final, LLMModel, SamplingConfig

    model = AppArgs.model_validate(app_args).model  # the replicas' engine config

    threads = app_args.get("cores_per_slot") or 1
    cpus = sorted(os.sched_getaffinity(0))[-threads:] if hasattr(os, "sched_getaffinity") else None
    pool = ThreadPoolExecutor(1, initializer=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def ttft(llm, messages, sampling):
        t0, first, text, final = time.perf_counter(), None, [], None
        for event in llm.chat(messages, sampling, stream=True):
            if isinstance(event, Final):
                final = event
                continue
            if event.text and first is None:
                first = time.perf_counter() - t0
            text.append(event.text)
        e2e = time.perf_counter() - t0
        return (first if first is not None else e2e), e2e, "".join(text), final.stats

    def run(cache_gb) -> tuple[list[dict], list[float]]:
        llm = LLMModel.from_config(model.model_copy(update={"prefix_cache_gb": cache_gb}), threads)
        llm.chat([{"role": "user", "content": "def f(x):\n    return x"}], SamplingConfig(max_new_tokens=8))  # warm-up
        one_token = [ttft(llm, ONE_TOKEN, SamplingConfig(max_new_tokens=1))[0] for _ in range(10)]
        rows = []
        for conv in convs:
            messages = []
            for turn, user in enumerate(conv["user"], 1):
                messages.append({"role": "user", "content": user})
                first, e2e, text, stats = ttft(llm, messages, SamplingConfig(max_new_tokens=max_tokens, temperature=0))
                rows.append({"conversation": conv["id"], "turn": turn, "ttft_s": first,
                             "engine_ttft_s": stats.time_to_first_token_s, "e2e_s": e2e,
                             "kv_load_s": stats.prefix_cache_load_s, "first_step_s": stats.first_step_s,
                             "cached_tokens": stats.num_cached_tokens})
                messages.append({"role": "assistant", "content": text})
        del llm
        return rows, one_token

    out = {"pinned_cpus": cpus, "threads": threads}
    for name, gb in (("no cache", 0), ("cache", model.prefix_cache_gb)):
        rows, one_token = pool.submit(run, gb).result()
        later = [r for r in rows if r["turn"] > 1]
        p50 = lambda key, rs=later: 1000 * pct([r[key] for r in rs], 0.5)  # noqa: E731
        out[name] = {"ttft_ms_turn1_p50": p50("ttft_s", [r for r in rows if r["turn"] == 1]),
                     "ttft_ms_later_p50": p50("ttft_s"), "engine_ttft_ms_later_p50": p50("engine_ttft_s"),
                     "kv_load_ms_later_p50": p50("kv_load_s"), "first_step_ms_later_p50": p50("first_step_s"),
                     "e2e_ms_later_p50": p50("e2e_s"), "one_token_ttft_ms_p50": 1000 * pct(one_token, 0.5),
                     "turns": rows}
        log(f"engine alone, {name}: TTFT turns 2+ p50 {out[name]['ttft_ms_later_p50']:.0f} ms "
            f"(engine's own {out[name]['engine_ttft_ms_later_p50']:.0f} ms, first step "
            f"{out[name]['first_step_ms_later_p50']:.0f} ms)")
    pool.shutdown()
    a, c = out["no cache"]["ttft_ms_later_p50"], out["cache"]["ttft_ms_later_p50"]
    out["ttft_p50_later_no_cache_over_cache"] = a / c if c else None
    return out


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="a,b,c", help="which of a (no cache), b (cache, power of two), "
                                                         "c (cache, cache-aware) to run, in order")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="short-turns",
                    help="the defaults of the five options below: " + "; ".join(
                        f"{k}: {', '.join(f'{n} {v}' for n, v in w.items())}" for k, w in WORKLOADS.items()))
    ap.add_argument("--conversations", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--concurrency", type=int, default=2, help="workers, each running its conversations in turn")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--first-tokens", type=int, help="user tokens of turn 1")
    ap.add_argument("--turn-tokens", type=int, help="new user tokens of each later turn")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    ap.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="override an app argument of --config (all configurations), e.g. affinity_wait_s=1 "
                         "or model.dtype=bfloat16")
    ap.add_argument("--engine-reference", type=int, default=-1, metavar="N",
                    help="also run the first N conversations (-1: all) on the engine alone, in-process, without "
                         "and with the prefix cache (0: not)")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--api-key", default=os.environ.get("PACE_API_KEY"))
    ap.add_argument("--out", help="output path without suffix (default: benchmarks/results/multi_turn for "
                                  "short-turns, benchmarks/results/multi_turn_<workload> otherwise)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 conversations x 3 turns, a temp dir (CI)")
    args = ap.parse_args(argv)
    for name, value in WORKLOADS[args.workload].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    default_out = args.out is None
    if default_out:
        suffix = "" if args.workload == "short-turns" else "_" + args.workload.replace("-", "_")
        args.out = str(ROOT / "benchmarks" / "results" / f"multi_turn{suffix}")
    import yaml

    config = yaml.safe_load(args.config.read_text())
    base = config["applications"][0].setdefault("args", {})
    for item in args.app_arg:
        key, _, value = item.partition("=")
        set_arg(base, key, yaml.safe_load(value))
    if args.smoke:
        from pace_core.testing import build_pair

        target, draft = build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")
        base["model"] = {"model_name_or_path": target, "dtype": "float32",
                         "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 3}}
        args.conversations, args.turns, args.first_tokens, args.turn_tokens, args.max_tokens = 2, 3, 40, 12, 8
        args.engine_reference = 1 if args.engine_reference < 0 else min(args.engine_reference, 1)
        if default_out:
            args.out = str(Path(tempfile.mkdtemp(prefix="pace-multi-turn-")) / "multi_turn")
        if args.port == ap.get_default("port"):
            args.port = 8767
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    if not keys or any(k not in CONFIGS for k in keys):
        ap.error(f"--configs: a comma-separated subset of {','.join(CONFIGS)}")
    check_loopback(f"http://127.0.0.1:{args.port}", False)
    os.environ.setdefault("PACE_SLOT_DIR", tempfile.mkdtemp(prefix="pace-slots-"))  # no other server's slot locks

    from transformers import AutoTokenizer

    from deployments.args import AppArgs
    from pace_core.loading import resolve_model_path

    model = AppArgs.model_validate(base).model  # the app's own validation: a bad --app-arg fails here
    target_path = Path(resolve_model_path(model.model_name_or_path))
    tokenizer_path = Path(resolve_model_path(model.tokenizer_name_or_path or model.model_name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    convs = conversation_texts(tokenizer, args.conversations, args.turns, args.first_tokens, args.turn_tokens)
    warmups = warmup_texts(tokenizer, args.first_tokens)
    context = json.loads((target_path / "config.json").read_text()).get("max_position_embeddings")
    # the longest possible last turn: every user text, every answer at max_tokens
    longest = max(len(tokenizer.apply_chat_template(
        [m for u in c["user"] for m in ({"role": "user", "content": u},
                                        {"role": "assistant", "content": "x " * args.max_tokens})][:-1],
        tokenize=True, add_generation_prompt=True, return_dict=False)) for c in convs)
    if context and longest + args.max_tokens > context:
        sys.exit(f"the last turn can reach ~{longest} prompt tokens + {args.max_tokens}: over the model's {context}")
    log(f"{len(convs)} conversations x {args.turns} turns from {', '.join(c['source'] for c in convs)}; "
        f"last turn <= ~{longest} prompt tokens")

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results = {}
    for key in keys:
        results[key] = run_config(key, config, args, convs, warmups, headers)
    engine = None
    if args.engine_reference:
        engine = engine_reference(base, convs[:args.engine_reference] if args.engine_reference > 0 else convs,
                                  args.max_tokens)
    write_outputs(Path(args.out), results, convs, args, longest, engine)
    if args.smoke:
        check_smoke(Path(args.out), keys, args)
        log(f"smoke: {args.out}.json/.md/.png look right")
    return 0


def ratio(results, num, den, field="ttft_ms_later_p50"):
    if num in results and den in results:
        a, b = results[num]["summary"][field], results[den]["summary"][field]
        return a / b if a and b else None
    return None


def write_outputs(out: Path, results: dict, convs, args, longest: int, engine: dict | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # the environment Ray starts with changes the figures: name it in the command
    env = " ".join(f"{k}={os.environ[k]}" for k in ("RAY_worker_niceness", "RAY_SERVE_PROXY_USE_GRPC") if k in os.environ)
    cmd = (env + " " if env else "") + "python benchmarks/multi_turn.py " + " ".join(sys.argv[1:])
    cpu = cpu_info()
    ratios = {"ttft_p50_later_a_over_c": ratio(results, "a", "c"), "ttft_p50_later_a_over_b": ratio(results, "a", "b"),
              "ttft_p50_later_b_over_c": ratio(results, "b", "c")}
    # greedy, and the cache never changes outputs: every configuration sent the same prompts
    prompts = {k: sorted((t["conversation"], t["turn"], t.get("prompt_tokens")) for t in r["turns"])
               for k, r in results.items()}
    same = len({json.dumps(v) for v in prompts.values()}) == 1
    settings = {"same_prompt_tokens_in_every_config": same, "conversations": len(convs), "turns": args.turns,
                "concurrency": args.concurrency,
                "replicas": args.replicas, "first_tokens": args.first_tokens, "turn_tokens": args.turn_tokens,
                "max_tokens": args.max_tokens, "sources": [c["source"] for c in convs],
                "python": platform.python_version(), "smoke": args.smoke}
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "cpu": cpu, "settings": settings, "ratios": ratios,
                                                    "engine_alone": engine, "workload": args.workload,
                                                    "target": target_check(results, engine) if engine else None,
                                                    "configs": results}, indent=1))
    lines = [f"Workload {args.workload}: {len(convs)} conversations x {args.turns} turns, {args.concurrency} workers, "
             f"{args.replicas} replicas; "
             f"streaming /v1/chat/completions, greedy, {args.max_tokens} max tokens; turn 1: {args.first_tokens}+ "
             f"tokens of a held-out stdlib file, each later turn the answer + {args.turn_tokens}+ more "
             f"(last turn <= ~{longest} prompt tokens). CPU: {cpu['model_name']} ({cpu['isa']}, {cpu['cpus']} CPUs). "
             f"`{cmd}`", "",
             "| config | TTFT ms turn 1 p50 | p90 | TTFT ms turns 2+ p50 | p90 | e2e ms p50 | p90 | "
             "token hit rate 2+ | request hit rate 2+ | previous turn cached 2+ | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    pc = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for key, r in results.items():
        s = r["summary"]
        lines.append(f"| ({key}) {r['label']} | {fmt(s['ttft_ms_turn1_p50'], '.0f')} | "
                     f"{fmt(s['ttft_ms_turn1_p90'], '.0f')} | "
                     f"{fmt(s['ttft_ms_later_p50'], '.0f')} | {fmt(s['ttft_ms_later_p90'], '.0f')} | "
                     f"{fmt(s['e2e_ms_p50'], '.0f')} | {fmt(s['e2e_ms_p90'], '.0f')} | "
                     f"{pc(s['token_hit_rate_later'])} | "
                     f"{pc(s['request_hit_rate_later'])} | {pc(s['previous_turn_hit_rate_later'])} | "
                     f"{s['ok']}/{s['requests']} ok {s['errors'] or ''} |")
    named = {"ttft_p50_later_a_over_c": "(a)/(c)", "ttft_p50_later_a_over_b": "(a)/(b)",
             "ttft_p50_later_b_over_c": "(b)/(c)"}
    got = [f"{named[k]} x{v:.2f}" for k, v in ratios.items() if v is not None]
    if got:
        lines += ["", "TTFT p50 of turns 2+: " + ", ".join(got) + "."]
    loads = [f"({k}) {r['summary']['loadavg_1m'][0]:.1f} -> {r['summary']['loadavg_1m'][1]:.1f}"
             for k, r in results.items() if None not in r["summary"].get("loadavg_1m", [None])]
    if loads:
        lines += ["", f"Host load average (1 min) before each launch -> after its conversations, on "
                      f"{cpu['cpus']} CPUs: " + ", ".join(loads) + "."]
    if len(results) > 1:
        lines += ["", "Every configuration sent the same prompts (prompt tokens per turn): " + ("yes." if same else
                  "NO: the answers differed, so the histories did.")]
    turns = sorted({t for r in results.values() for t in r["summary"]["ttft_ms_p50_by_turn"]})
    lines += ["", "TTFT ms p50 by turn (mean cached tokens):", "",
              "| config | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---|" + "---:|" * len(turns)]
    for key, r in results.items():
        by, cached = r["summary"]["ttft_ms_p50_by_turn"], r["summary"]["cached_tokens_mean_by_turn"]
        cells = [f"{fmt(by.get(t), '.0f')} ({cached.get(t, 0):.0f})" for t in turns]
        lines.append(f"| ({key}) | " + " | ".join(cells) + " |")
    server = [(k, r["summary"]) for k, r in results.items() if r["summary"]["server_metrics"]]
    if server:
        lines += ["", "The server's /metrics over the measured requests (router side):", "",
                  "| config | requests with a cache hit | token hit rate | TTFT ms mean (router) |",
                  "|---|---:|---:|---:|"]
        for key, s in server:
            m = s["server_metrics"]
            lines.append(f"| ({key}) | {m.get('pace_prefix_cache_hits_total', 0):.0f}/"
                         f"{m.get('pace_prefix_cache_queries_total', 0):.0f} | {pc(s.get('server_token_hit_rate'))} | "
                         f"{fmt(s.get('server_ttft_ms_mean'), '.0f')} |")
    placed = [(k, r["summary"]) for k, r in results.items() if r["summary"].get("turns_with_replica")]
    if placed:
        lines += ["", "Where the turns ran, and how long the turns 2+ waited from sent to begun by their replica "
                      "(each replica's access lines in serve run's log, by request id):", "",
                  "| config | turns per replica | conversations on one replica | wait ms p50 | p90 | turns waiting "
                  "> 50 ms | TTFT - wait ms p50 |", "|---|---|---:|---:|---:|---:|---:|"]
        for key, s in placed:
            lines.append(f"| ({key}) | {', '.join(f'{k}: {v}' for k, v in s['requests_by_replica'].items())} | "
                         f"{s['conversations_on_one_replica']}/{len(convs)} | {fmt(s['wait_ms_later_p50'], '.0f')} | "
                         f"{fmt(s['wait_ms_later_p90'], '.0f')} | "
                         f"{s['turns_later_waited_over_50ms']}/{s['turns_later_placed']} | "
                         f"{fmt(s['ttft_minus_wait_ms_later_p50'], '.0f')} |")
    timed = [(k, r["summary"]) for k, r in results.items() if r["summary"].get("ttft_parts_ms_later_p50")]
    if timed:
        lines += ["", "Where the time to first token of turns 2+ went, p50 of each part in ms (they need not add up "
                      "to the TTFT p50): the client's TTFT less the router's (`http`: Serve's HTTP proxy, both ways; "
                      "`http_in`: from the client's send to the router, wall clocks), "
                      "then the router's timing line (deployments.router._log_timing): `router` (checks, admission), "
                      "`to_engine` (the call to a replica until its engine began: waiting for a replica, the hops), "
                      "the engine's `prepare` (chat template, tokenizing), `kv_load` (reusing the cached prefix), "
                      "`first_step` (the prefill of the uncached tokens with the first proposals), `engine_other`, "
                      "and `back` (the first tokens' way to the router):", "",
                  "| config | TTFT | uncached tokens | " + " | ".join(TIMING_PARTS) + " |",
                  "|---|---:|---:|" + "---:|" * len(TIMING_PARTS)]
        for key, s in timed:
            parts = s["ttft_parts_ms_later_p50"]
            lines.append(f"| ({key}) | {fmt(s['ttft_ms_later_p50'], '.0f')} | {s['uncached_tokens_later_p50']:.0f} | "
                         + " | ".join(fmt(parts[k], '.1f') for k in TIMING_PARTS) + " |")
    if engine:
        lines += ["", f"The engine alone, in-process (no HTTP, Serve or concurrent request), pinned to CPU(s) "
                      f"{engine['pinned_cpus']}, {len(engine['cache']['turns']) // args.turns} conversation(s):", "",
                  "| engine alone | TTFT ms turn 1 p50 | TTFT ms turns 2+ p50 | engine's time_to_first_token ms "
                  "turns 2+ p50 | its KV reuse ms | its first step ms | e2e ms turns 2+ p50 | TTFT ms of a 1-token "
                  "answer |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ("no cache", "cache"):
            e = engine[name]
            lines.append(f"| {name} | {e['ttft_ms_turn1_p50']:.0f} | {e['ttft_ms_later_p50']:.0f} | "
                         f"{e['engine_ttft_ms_later_p50']:.0f} | {e['kv_load_ms_later_p50']:.1f} | "
                         f"{e['first_step_ms_later_p50']:.0f} | {e['e2e_ms_later_p50']:.0f} | "
                         f"{e['one_token_ttft_ms_p50']:.1f} |")
        if engine["ttft_p50_later_no_cache_over_cache"]:
            lines += ["", f"Engine alone, TTFT p50 of turns 2+ no cache / cache: "
                          f"x{engine['ttft_p50_later_no_cache_over_cache']:.2f}."]
        target = target_check(results, engine)
        if target:
            lines += ["", target["text"]]
    save_table(out, "\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, r in results.items():
        by = r["summary"]["ttft_ms_p50_by_turn"]
        ax.plot(list(by), list(by.values()), "o-", label=f"({key}) {r['label']}")
    ax.set_xlabel("turn"), ax.set_ylabel("TTFT ms, p50 over conversations")
    ax.set_title(f"Multi-turn TTFT, {args.replicas} replicas, concurrency {args.concurrency}")
    ax.set_ylim(bottom=0), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def target_check(results: dict, engine: dict) -> dict | None:
    """Issue 24's target for the defaults (c): TTFT p50 of turns 2+ at most 1.5 x (the
    engine alone's prefill of the uncached tokens, p50 of its first steps of turns 2+,
    + the HTTP overhead: the served 1-token answer's TTFT less the engine alone's), and
    at least 3x lower than without the cache (a)."""
    if "c" not in results:
        return None
    c = results["c"]["summary"]
    overhead = c["one_token_ttft_ms_p50"] - engine["cache"]["one_token_ttft_ms_p50"]
    bound = 1.5 * (engine["cache"]["first_step_ms_later_p50"] + overhead)
    out = {"ttft_ms_later_p50": c["ttft_ms_later_p50"], "http_overhead_ms": overhead, "bound_ms": bound,
           "within_bound": c["ttft_ms_later_p50"] <= bound}
    text = (f"Target (c): TTFT p50 of turns 2+ {c['ttft_ms_later_p50']:.0f} ms <= 1.5 x (prefill of the uncached "
            f"tokens in process {engine['cache']['first_step_ms_later_p50']:.0f} ms + HTTP overhead {overhead:.1f} ms"
            f" = {bound:.0f} ms): {'yes' if out['within_bound'] else 'NO'}")
    if "a" in results:
        out["a_over_c"] = results["a"]["summary"]["ttft_ms_later_p50"] / c["ttft_ms_later_p50"]
        text += f"; (a)/(c) x{out['a_over_c']:.2f} >= 3: {'yes' if out['a_over_c'] >= 3 else 'NO'}"
    out["text"] = text + "."
    return out


def check_smoke(out: Path, keys: list[str], args) -> None:
    """The output's structure (not its speed): every turn answered, usage present, the
    cache off in (a), the tables and the plot written."""
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["configs"]) == keys and result["cpu"]["model_name"] and result["command"]
    for key in keys:
        r = result["configs"][key]
        s = r["summary"]
        assert s["ok"] == s["requests"] == args.conversations * args.turns, (key, s)
        assert sorted({t["turn"] for t in r["turns"]}) == list(range(1, args.turns + 1))
        assert all(t["prompt_tokens"] and t["ttft_s"] > 0 and t["e2e_s"] >= t["ttft_s"] for t in r["turns"])
        assert s["ttft_ms_turn1_p50"] > 0 and s["ttft_ms_later_p50"] > 0 and 0 <= s["token_hit_rate_later"] <= 1
        if key == "a":
            assert s["token_hit_rate_later"] == 0, s
    if args.engine_reference:
        engine = result["engine_alone"]
        assert len(engine["cache"]["turns"]) == len(engine["no cache"]["turns"]) == args.turns * args.engine_reference
        assert engine["cache"]["first_step_ms_later_p50"] > 0 and engine["cache"]["one_token_ttft_ms_p50"] > 0
    for key in keys:  # every turn 2+ has the router's timing line, its parts adding up to its TTFT there
        s = result["configs"][key]["summary"]
        assert set(s["ttft_parts_ms_later_p50"]) == set(TIMING_PARTS) and s["one_token_ttft_ms_p50"] > 0, s
        for t in result["configs"][key]["turns"]:
            if t["turn"] > 1:
                timing = t["timing_ms"]
                assert timing and timing["first_step"] > 0 and timing["prompt_tokens"] == t["prompt_tokens"], t
                assert abs(sum(timing[k] for k in TIMING_PARTS if not k.startswith("http")) - timing["ttft"]) < 0.1, timing
        assert all(t["cached_tokens"] == 0 for t in engine["no cache"]["turns"]), engine["no cache"]
        assert all(t["cached_tokens"] > 0 for t in engine["cache"]["turns"] if t["turn"] > 1), engine["cache"]
    md = out.with_suffix(".md").read_text()
    assert all(f"| ({k}) " in md for k in keys) and "TTFT ms p50 by turn" in md
    assert out.with_suffix(".png").stat().st_size > 1000


if __name__ == "__main__":
    sys.exit(main())
