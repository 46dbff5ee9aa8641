"""Run AMD PACE 1.3 on a target (+ optional PARD draft) pair and print one JSON line.

Run it with the Python of the venv that setup_pace.sh prints:
  PY=$(benchmarks/pace/setup_pace.sh)
  $PY benchmarks/pace/pace_bench.py --target DIR [--draft DIR] [--k 8] \
      [--prompts prompts.txt] [--max-new-tokens 128] [--dtype bfloat16] [--threads N]

The JSON holds, per prompt, the new token ids (for parity checks against this
project) and wall time, plus totals: tokens/s and PACE's mean accepted tokens.
Prompts file: one prompt per paragraph (separated by a blank line); default: 4 built-in prompts.
--prompt-ids: a JSON list of token-id lists instead (random-weight models in real shapes).
"""
import argparse, json, logging, os, sys, time

DEFAULT_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts")
    ap.add_argument("--prompt-ids", help="a JSON file: a list of token-id lists, used instead of --prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per prompt (after one warm-up run)")
    a = ap.parse_args()
    # PACE logs to stdout: keep stdout for the JSON line alone
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.disable(logging.WARNING)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from pace.llm import LLMModel, PardSpecDecodeConfig, SamplingConfig

    prompts = DEFAULT_PROMPTS
    if a.prompts:
        prompts = [p for p in open(a.prompts, encoding="utf-8").read().split("\n\n") if p.strip()]
    spec = PardSpecDecodeConfig(model_name_or_path=a.draft, num_speculative_tokens=a.k) if a.draft else None
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model = LLMModel(a.target, dtype=dtype, spec_config=spec, disable_tqdm=True)
    load_s = time.perf_counter() - t0
    tok = model.get_tokenizer()
    results, total_tokens, total_s, accepted = [], 0, 0.0, []
    if a.prompt_ids:
        from transformers import BatchEncoding

        prompts = json.load(open(a.prompt_ids))
    for p in prompts:
        if isinstance(p, list):  # token ids
            ids_in = torch.tensor([p])
            enc = BatchEncoding({"input_ids": ids_in, "attention_mask": torch.ones_like(ids_in)})
        else:
            enc = tok(p, return_tensors="pt")
        n_prompt = enc["input_ids"].shape[1]
        sc = SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=False)
        model.generate(enc, sc)  # warm-up
        best = None
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = model.generate(enc, sc)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        ids = out.output_token_ids[0, n_prompt:].tolist()[: a.max_new_tokens]
        stats = getattr(out, "speculative_stats", None)
        if stats is not None and getattr(stats, "mean_accepted_tokens", None) is not None:
            accepted.append(float(stats.mean_accepted_tokens))
        results.append({"prompt": p, "new_token_ids": ids, "seconds": best})
        total_tokens += len(ids)
        total_s += best
    print(json.dumps({
        "engine": "amd-pace-1.3.0", "mode": "pard" if a.draft else "autoregressive",
        "k": a.k if a.draft else 0, "dtype": a.dtype, "threads": torch.get_num_threads(),
        "load_seconds": load_s, "tokens": total_tokens, "seconds": total_s,
        "tokens_per_second": total_tokens / total_s if total_s else None,
        "mean_accepted_tokens_incl_bonus": sum(accepted) / len(accepted) if accepted else None,
        "results": results,
    }), file=json_out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
