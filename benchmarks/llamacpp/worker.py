"""Runs llama.cpp through its Python binding (llama-cpp-python, from the sdist setup.sh
fetched, on PYTHONPATH; the libraries it built at LLAMA_CPP_LIB_PATH) for one job of
benchmarks/llamacpp/llamacpp.py: greedy tokens, or the log-softmax of every position,
for each of a list of token-id sequences.

    python worker.py JOB.json   (JOB: gguf, threads, mode "greedy" | "logprobs", seqs, n, out)
"""
import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    seqs = [[int(t) for t in s] for s in job["seqs"]]
    n_ctx = max(len(s) for s in seqs) + int(job.get("n", 0)) + 8
    llm = Llama(job["gguf"], n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=job["threads"],
                n_threads_batch=job["threads"], logits_all=True, verbose=False)
    out = []
    for ids in seqs:
        llm.reset()
        llm.eval(ids)
        if job["mode"] == "greedy":
            tokens = []
            for _ in range(job["n"]):
                tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval(tokens[-1:])
            out.append(np.array(tokens, dtype=np.int64))
        else:
            logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            out.append((logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32))
    if job["mode"] == "greedy":
        np.savez(job["out"], tokens=np.stack(out))
    else:
        np.savez(job["out"], logprobs=np.concatenate(out), lengths=np.array([len(s) for s in seqs]))


if __name__ == "__main__":
    main()
