"""The demo corpus: the Python standard library's own source, present on every machine
with Python. A fixed, deterministic set of files is held out for evaluation."""
from __future__ import annotations

import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}
HELDOUT_EVERY = 25  # every 25th file (sorted by path) is held out


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Relative paths of the stdlib's .py files (tests and vendored code excluded), sorted."""
    lib = stdlib_dir()
    rel = []
    for p in lib.rglob("*.py"):
        parts = p.relative_to(lib).parts
        if any(part in SKIP_PARTS or part.startswith("test") for part in parts):
            continue
        rel.append(p.relative_to(lib).as_posix())
    return sorted(rel)


def split_files() -> tuple[list[str], list[str]]:
    """(training files, held-out files)."""
    files = stdlib_files()
    heldout = files[HELDOUT_EVERY - 1 :: HELDOUT_EVERY]
    held = set(heldout)
    return [f for f in files if f not in held], heldout


def read(rel_paths: list[str]) -> list[str]:
    lib = stdlib_dir()
    out = []
    for rel in rel_paths:
        try:
            out.append((lib / rel).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def heldout_prompts(texts: list[str], n: int, max_lines: int = 12, min_lines: int = 3) -> list[str]:
    """Prompts cut from held-out files: a `def`/`class` line and the lines after it, up to
    the first blank line (so prompts never contain blank lines), at most ``max_lines``."""
    prompts = []
    for text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if not line.lstrip().startswith(("def ", "class ")):
                continue
            block = []
            for l in lines[i : i + max_lines]:
                if not l.strip():
                    break
                block.append(l)
            if len(block) >= min_lines:
                prompts.append("\n".join(block[: max(min_lines, len(block) // 2)]))
                break  # one prompt per file keeps them diverse
        if len(prompts) >= n:
            break
    return prompts
