"""llama.cpp beside this engine, from the build that benchmarks/llamacpp/setup.sh makes.

    from llamacpp import LlamaCpp
    lc = LlamaCpp.find()                      # None when setup.sh has not been run
    path = lc.gguf(model_dir, "q4_0", cache)  # converted once with llama.cpp's own tools
    lc.bench(path, threads=2, n_gen=32, depth=64)   # llama-bench: tokens/s
    lc.greedy(path, [prompt_ids], 32)         # its greedy tokens (the Python binding)
    lc.logprobs(path, [ids])                  # log-softmax of every position (numpy)
    lc.speculative(target, draft, ...)        # llama-speculative-simple

GGUF formats: f32, bf16, q8_0 (llama.cpp's converter: convert.py here runs it), q4_0
(llama-quantize from the f32 or, for a bfloat16 checkpoint, bf16 file, with its default recipe: the output projection / tied
embedding stays at higher precision, as users get it). Every llama.cpp run is a separate
process, so its threads never share the cores with this engine's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = Path(os.environ.get("PACE_LLAMACPP_DIR", Path.home() / ".cache" / "pace_core" / "llamacpp"))
# this engine's format -> llama.cpp's at the same bits
PEER_FORMAT = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}


class LlamaCpp:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.bin = self.root / "build" / "bin"
        self.src = self.root / "src"

    @classmethod
    def find(cls, root: Path | None = None) -> "LlamaCpp | None":
        root = Path(root or DEFAULT_DIR)
        if list(root.glob(".built-*")) and (root / "build" / "bin" / "llama-bench").is_file():
            return cls(root)
        return None

    def version(self) -> str:
        return next(iter(self.root.glob(".built-*"))).name.removeprefix(".built-")

    # ---------------------------------------------------------------- files
    def gguf(self, model_dir: Path, fmt: str, cache: Path) -> Path:
        """``model_dir`` converted to GGUF ``fmt`` (f32, bf16, q8_0, q4_0), once, under ``cache``."""
        model_dir = Path(model_dir)
        out = Path(cache) / f"{model_dir.name}-{fmt}.gguf"
        if out.is_file() and out.stat().st_mtime >= (model_dir / "config.json").stat().st_mtime:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "q4_0":  # from the checkpoint's own precision, as a user would quantize it
            stored = json.loads((model_dir / "config.json").read_text())
            stored = stored.get("dtype") or stored.get("torch_dtype") or "float32"
            source = self.gguf(model_dir, "bf16" if stored == "bfloat16" else "f32", cache)
            self._run([str(self.bin / "llama-quantize"), str(source), str(out), "q4_0"], f"quantizing {out.name}")
        else:
            self._run([sys.executable, str(HERE / "convert.py"), str(self.root), str(model_dir), "--outfile", str(out),
                       "--outtype", fmt], f"converting {model_dir.name} to {fmt}")
        return out

    def _run(self, cmd: list[str], what: str, timeout: float = 3600) -> str:
        print(f"  llama.cpp: {what} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp {what} failed: {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout + done.stderr

    # ---------------------------------------------------------------- speed
    def bench(self, gguf: Path, threads: int, n_prompt: int = 0, n_gen: int = 0, depth: int = 0,
              reps: int = 3) -> float:
        """llama-bench: tokens/s of prompt processing (n_prompt) or of generating n_gen
        tokens after ``depth`` tokens of context."""
        cmd = [str(self.bin / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n",
               str(n_gen), "-d", str(depth), "-r", str(reps), "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {out.stderr[-1500:]}")
        return float(json.loads(out.stdout)[0]["avg_ts"])

    def speculative(self, target: Path, draft: Path, prompt: str, n: int, k: int, threads: int) -> dict:
        """llama-speculative-simple, greedy, drafting up to k tokens: decode tokens/s and
        how many drafted tokens were accepted."""
        out = self._run([str(self.bin / "llama-speculative-simple"), "-m", str(target), "-md", str(draft),
                         "--spec-type", "draft-simple", "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0",
                         "-p", prompt, "-n", str(n), "-t", str(threads), "-td", str(threads), "--temp", "0",
                         "-c", "2048", "--ignore-eos"], "speculative decoding")
        speed = re.search(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s+seconds, speed:\s+([\d.]+)\s+t/s", out)
        drafted = re.search(r"n_drafted\s*=\s*(\d+)", out)
        accepted = re.search(r"n_accept\s*=\s*(\d+)", out)
        if not speed:
            raise RuntimeError(f"llama-speculative-simple printed no speed: {out[-1500:]}")
        return {"tokens": int(speed.group(1)), "seconds": float(speed.group(2)), "tokens_per_s": float(speed.group(3)),
                "drafted": int(drafted.group(1)) if drafted else None,
                "accepted": int(accepted.group(1)) if accepted else None}

    # ---------------------------------------------------------------- outputs (the Python binding)
    def _binding(self, job: dict) -> dict:
        """Run benchmarks/llamacpp/worker.py with the binding from the sdist on its path."""
        with tempfile.TemporaryDirectory() as tmp:
            job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.npz"
            job_file.write_text(json.dumps({**job, "out": str(out_file)}))
            env = {**os.environ, "PYTHONPATH": str(self.src), "LLAMA_CPP_LIB_PATH": str(self.bin)}
            done = subprocess.run([sys.executable, str(HERE / "worker.py"), str(job_file)], env=env,
                                  capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"llama.cpp binding failed: {done.stderr[-1500:]}")
            import numpy as np

            with np.load(out_file) as data:
                return {key: data[key] for key in data.files}

    def greedy(self, gguf: Path, prompts: list[list[int]], n: int, threads: int = 2) -> list[list[int]]:
        """llama.cpp's greedy continuation (argmax of its own logits) of each prompt's token ids."""
        out = self._binding({"gguf": str(gguf), "threads": threads, "mode": "greedy", "seqs": prompts, "n": n})
        return out["tokens"].tolist()

    def logprobs(self, gguf: Path, seqs: list[list[int]], threads: int = 2):
        """Log-softmax of llama.cpp's logits at every position of each sequence, the
        sequences' rows one after the other (sum of lengths, vocab)."""
        return self._binding({"gguf": str(gguf), "threads": threads, "mode": "logprobs", "seqs": seqs})["logprobs"]
