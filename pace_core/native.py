"""Native (C++) kernels, built on first use with the system C++ compiler and cached.

``csrc/model.cpp`` runs a Llama-family model's whole forward in one call over weights
packed at load (``csrc/kernels.h``: float32, bfloat16, int8, int4). Building needs only
a C++ compiler (``c++``/``g++``, or ``$CXX``) and the installed torch; it takes ~15 s once
per torch version and source change and is cached under ``$PACE_CACHE_DIR`` (default
``~/.cache/pace_core``). Without a compiler, or with ``PACE_NATIVE_KERNELS=0``, the
engine logs why and runs the Python loop with torch's ops (same model, slower; no
int8/int4 weights).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "model.cpp"]
HEADERS = [CSRC / "kernels.h"]
# weight formats of the packed linears (csrc/kernels.h Format)
FORMATS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "reason": why not


def cache_dir() -> Path:
    root = os.environ.get("PACE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pace_core")
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# -fopenmp: the forward's parallel region runs on torch's OpenMP threads (its libgomp).
# -ffp-contract=off: GCC would otherwise fuse a multiply and an add (vector intrinsics
# included) into an FMA where its scheduling allows, differently in kernels for different
# row counts: every rounding must be the same whatever the rows of a forward.
# -mtune=znver3: instruction scheduling for AMD EPYC (measured faster on Zen 5 than the
# generic tuning for the int8 kernels); the instruction sets are chosen at run time.
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-mtune=znver3", "-shared", "-fPIC", "-std=c++17", "-w"]


def library_path() -> Path:
    """Where the built library for these sources, flags and torch lives."""
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(FLAGS).encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"pace_kernels-{key}.so"


def _build(target: Path, compiler: str) -> None:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], *map(str, SOURCES), "-o", tmp,
           f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    logger.info("building native kernels (once per torch version, ~15 s): %s", target)
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent process sees all of it or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built native kernels in %.1f s", time.perf_counter() - started)


def load() -> bool:
    """Load (building if needed) the native kernels; False, with :func:`unavailable_reason`
    set and a warning logged once, when they cannot be used."""
    with _lock:
        if "loaded" in _state:
            return bool(_state["loaded"])
        reason = None
        if os.environ.get("PACE_NATIVE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
            reason = "disabled by PACE_NATIVE_KERNELS=0"
        else:
            try:
                target = library_path()
                if not target.exists():
                    compiler = _compiler()
                    if compiler is None:
                        raise RuntimeError("no C++ compiler found (install g++ or set $CXX)")
                    _build(target, compiler)
                torch.ops.load_library(str(target))
            except Exception as err:  # any failure: the Python loop still works
                reason = str(err)
                logger.warning("native kernels unavailable, using the Python layer loop (same results, slower): %s",
                               reason)
        _state.update(loaded=reason is None, reason=reason)
        return reason is None


def unavailable_reason() -> str | None:
    return _state.get("reason")  # type: ignore[return-value]
