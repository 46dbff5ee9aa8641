"""Tiny random models and a locally trained tokenizer, for tests and smoke runs.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a second on a few
files of the Python standard library, the models are random Llama/Qwen2/Qwen3.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|pard|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STDLIB_SAMPLE = ["textwrap.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py"]


def stdlib_texts(names=STDLIB_SAMPLE) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / n).read_text(encoding="utf-8") for n in names if (lib / n).is_file()]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, texts: list[str] | None = None, seed_extra: str = ""):
    """Train a byte-level BPE tokenizer with EOS, a PARD token and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (texts or stdlib_texts()) + ([seed_extra] if seed_extra else [])
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer=None,
    pard_token: int | None = None,
    eos_token_id: int | list[int] | None = None,
):
    """Save a random causal LM (``llama``, ``qwen2`` or ``qwen3``) and, if given, the
    tokenizer next to it. ``pard_token`` goes into config.json (a PARD draft)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    eos = eos_token_id if eos_token_id is not None else (tokenizer.eos_token_id if tokenizer is not None else 0)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        eos_token_id=eos, bos_token_id=None, pad_token_id=None,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    config = AutoConfig.for_model(arch, **kwargs)
    if pard_token is not None:
        config.pard_token = pard_token
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # larger-than-default init: random models with sharper, less tied logits
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.generation_config = GenerationConfig(eos_token_id=eos)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return model


def build_pair(root: str | Path, arch: str = "qwen2", draft_vocab_padding: int = 64, seed: int = 0, **target_kwargs):
    """A tiny target and a tiny PARD draft sharing one tokenizer; the draft's embedding
    is padded larger than the target's (as Qwen's 152064 vs 151936). Returns paths."""
    root = Path(root)
    tok = build_tokenizer(root / "tokenizer")
    vocab = len(tok)
    pard = tok.convert_tokens_to_ids("<|pard|>")
    target_dir, draft_dir = root / f"{arch}-target", root / f"{arch}-draft"
    build_model(target_dir, arch, vocab_size=vocab, seed=seed, tokenizer=tok,
                **{"num_layers": 3, "hidden_size": 64, **target_kwargs})
    build_model(draft_dir, arch, vocab_size=vocab + draft_vocab_padding, seed=seed + 1, tokenizer=tok,
                num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, pard_token=pard)
    (root / "pair.json").write_text(json.dumps({"target": str(target_dir), "draft": str(draft_dir), "pard_token": pard}))
    return str(target_dir), str(draft_dir)


def build_wordlevel_tokenizer(out_dir: str | Path, vocab_size: int):
    """A tokenizer with exactly ``vocab_size`` ids ("<|endoftext|>", "<|pard|>", then
    "w2", "w3", ... split on whitespace), for random models in real shapes, whose
    vocabularies (151936, 128256) no locally trained BPE reaches."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pard|>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|pard|>"])
    fast.save_pretrained(str(out_dir))
    return fast


class OracleDraft:
    """A draft with a fixed acceptance, for speed measurements of random-weight models:
    it runs (and pays for) a real draft runner's forward, then proposes the known
    continuation ``reference`` (the target's own greedy output), getting the first
    ``correct`` proposals of every step right and the next one wrong. So each step
    emits ``correct + 1`` tokens (all K+1 when ``correct >= K``), whatever the weights."""

    def __init__(self, runner, reference: list[int], correct: int, vocab_size: int | None = None):
        self.runner, self.reference, self.correct = runner, reference, correct
        # the ids it may propose: the target's (a reduced-vocabulary draft's cost, with
        # every reference token still proposable)
        self.vocab_limit = vocab_size or runner.vocab_limit

    @property
    def seq_len(self) -> int:
        return self.runner.seq_len

    def reset(self) -> None:
        self.runner.reset()

    def drop_last(self, num_tokens: int) -> None:
        self.runner.drop_last(num_tokens)

    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        logits = self.runner.forward(token_ids, num_logits)
        real = self.runner.seq_len - (num_logits - 1)  # tokens before the first proposal
        chosen = torch.empty(num_logits, dtype=torch.long)
        for i in range(num_logits):
            right = self.reference[real + i] if real + i < len(self.reference) else 0
            chosen[i] = right if i < self.correct else (right + 1) % self.vocab_limit
        out = torch.full((num_logits, self.vocab_limit), -1e4)
        out[torch.arange(num_logits), chosen] = 0.0
        return out


_HF_MODELS: dict = {}


def hf_model(path: str, dtype: str = "float32"):
    """transformers' own model for ``path`` (loaded once per path and dtype): the
    reference the engine's output is checked against (the engine's runners pack the
    weights they load into their own layout and keep no transformers model)."""
    from .loading import load_causal_lm

    key = (str(path), dtype)
    if key not in _HF_MODELS:
        _HF_MODELS[key] = load_causal_lm(str(path), dtype)
    return _HF_MODELS[key]


def hf_of(model, draft: bool = False):
    """:func:`hf_model` of an LLMModel's target (or draft), as configured."""
    cfg = model.config
    return hf_model(cfg.pard_config.model_name_or_path if draft else cfg.model_name_or_path, cfg.dtype)
