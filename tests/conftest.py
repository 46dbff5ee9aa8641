"""Shared fixtures: tiny random models and a tokenizer, built locally (nothing is downloaded)."""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """{arch: (target_dir, draft_dir)} for Llama, Qwen2 and Qwen3; the draft's
    embedding is padded 64 rows larger than the target's."""
    from pace_core.testing import build_pair

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_pair(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_pair(tiny_pairs):
    return tiny_pairs["qwen2"]
