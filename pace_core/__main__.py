"""Command line: ``python -m pace_core generate --prompt "def fib(n):" -k 8``.

Without --target/--draft it runs the bundled demo pair (models/demo-target and
models/demo-draft); ``--draft none`` runs the target alone (plain greedy decoding).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import get_args

from .configs import DTYPE_NAMES, MAX_SPECULATIVE_TOKENS, ModelConfig, PardSpecDecodeConfig, Quantization

DEMO_TARGET = "models/demo-target"
DEMO_DRAFT = "models/demo-draft"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pace_core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt and print it with the decoding stats")
    g.add_argument("--target", default=DEMO_TARGET, help="target model directory or hub name (default: the demo target)")
    g.add_argument("--draft", default=DEMO_DRAFT, help="PARD draft directory or hub name; 'none' for plain decoding")
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the target's)")
    pard = PardSpecDecodeConfig.model_fields  # the defaults and choices are the engine's own
    g.add_argument("-k", "--num-speculative-tokens", type=int, default=pard["num_speculative_tokens"].default,
                   help=f"tokens the draft proposes per step (1..{MAX_SPECULATIVE_TOKENS}; default: %(default)s)")
    g.add_argument("--speculation-schedule", default=pard["speculation_schedule"].default,
                   choices=get_args(pard["speculation_schedule"].annotation),
                   help="adaptive: K is a cap, each step follows the recent acceptance; fixed: always K")
    g.add_argument("--pard-token", type=int, default=None, help="override the draft config's PARD token id")
    g.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--max-new-tokens", type=int, help="default: pace_core's DEFAULT_MAX_NEW_TOKENS, lowered to the "
                   "room the prompt leaves in the context")
    g.add_argument("--temperature", type=float, default=None,
                   help="0: greedy; > 0 samples (default: the model's generation_config.json, else greedy)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (the same output every time)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--dtype", default=ModelConfig.model_fields["dtype"].default, choices=DTYPE_NAMES,
                   help="weights' dtype (default: as stored in the checkpoint)")
    g.add_argument("--quantization", default=None, choices=get_args(Quantization),
                   help="the target's linear weights in int8 or int4, quantized at load (default: as stored)")
    g.add_argument("--draft-quantization", default=None, choices=get_args(Quantization),
                   help="the draft's linear weights in int8 or int4 (the output stays the target's)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--stream", action="store_true", help="print text as it is accepted")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text + stats")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    from . import Final, LLMModel, ModelLoadError, RequestError, SamplingConfig

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        pard = None
        if args.draft and args.draft.lower() != "none":
            pard = PardSpecDecodeConfig(model_name_or_path=args.draft, pard_token=args.pard_token,
                                        num_speculative_tokens=args.num_speculative_tokens,
                                        speculation_schedule=args.speculation_schedule,
                                        quantization=args.draft_quantization)
        given = {k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
                                  **given)
        t0 = time.perf_counter()
        model = LLMModel(args.target, dtype=args.dtype, pard_config=pard, tokenizer_name_or_path=args.tokenizer,
                         num_threads=args.threads, quantization=args.quantization)
        load_s = time.perf_counter() - t0
        messages = [{"role": "user", "content": prompt}]
        chunks = model.chat(messages, sampling, stream=True) if args.chat else model.stream(prompt, sampling)
        text, ids, final = [], [], None
        for event in chunks:
            if isinstance(event, Final):
                final = event
                continue
            text.append(event.text)
            ids += event.token_ids
            if args.stream and not args.json:
                print(event.text, end="", flush=True)
    except (ValidationError, ModelLoadError, RequestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats = final.stats
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": ids, "finish_reason": final.finish_reason,
                          "load_s": load_s, "stats": stats.to_dict()}))
        return 0
    if not args.stream:
        print("".join(text), end="")
    k = model.num_speculative_tokens
    spec = f"PARD K={k} ({model.speculation_schedule})" if k else "no draft"
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"\n\n--- {len(ids)} tokens in {stats.total_time_s:.3f}s ({stats.tokens_per_s:.1f} tok/s), "
          f"finish_reason={final.finish_reason}, {spec}, dtype={dtype}, weights={model.weight_format}, "
          f"forward={model.forward_kind}\n"
          f"    steps={stats.steps}  mean accepted/step={stats.mean_accepted_length:.2f}  "
          f"ttft={stats.time_to_first_token_s * 1000:.1f}ms  draft={stats.draft_time_s:.3f}s  "
          f"target={stats.target_time_s:.3f}s  load={load_s:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
