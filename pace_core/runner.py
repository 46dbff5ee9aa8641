"""One causal LM plus its KV cache, behind the three operations the decoder needs:
feed tokens (getting the logits of the last few), drop the last tokens from the cache, reset.

The same class runs the target and the draft, with or without speculation, so the
plain greedy baseline is measured with exactly the same machinery. Model-specific
details (cache classes, keyword names) stay here, out of the decoder loop.
"""
from __future__ import annotations

import torch


class CausalLMRunner:
    native = False  # transformers' own forward (its GEMMs round by shape: a verify's rows
    # may differ from decode steps' in the last bit; the native lean runner's never do)
    weight_format = None

    def __init__(self, model, vocab_limit: int | None = None):
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        # ids >= vocab_limit are padding rows of the embedding: never proposed
        self.vocab_limit = vocab_limit or model.config.vocab_size
        self.cache = None
        self.seq_len = 0

    def weight_bytes(self) -> int:
        return linear_weight_bytes(self.model)

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        # sliding-window layers keep the states drop_last may bring back (rejected proposals)
        # until the drop_last that follows every forward
        self.cache.activate_past_recording()
        self.seq_len = 0

    @torch.inference_mode()
    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Append ``token_ids`` to the sequence; return the float logits of the last
        ``num_logits`` positions, shape (num_logits, vocab)."""
        input_ids = torch.tensor([token_ids], dtype=torch.long)
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=num_logits)
        self.seq_len += len(token_ids)
        return out.logits[0, -num_logits:, : self.vocab_limit].float()

    def drop_last(self, num_tokens: int) -> None:
        """Drop the last ``num_tokens`` entries of the KV cache. The decoder calls it after
        every forward (0 included): sliding-window layers then trim back to their window."""
        self.cache.crop(-max(num_tokens, 0))
        self.seq_len -= max(num_tokens, 0)


def linear_weight_bytes(model) -> int:
    """Bytes of weights one forward of ``model`` streams (every linear, the output projection included)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def make_runner(model, kind: str = "auto", vocab_limit: int | None = None, quantization: str | None = None,
                release_weights: bool = False):
    """The lean Llama-family runner where it applies (``auto``), or transformers' own
    forward with a DynamicCache (``transformers``); ``lean`` insists on the former.
    ``quantization`` ("int8", "int4") needs the lean runner with its native kernels;
    ``release_weights``: the lean runner drops the model's weights once packed (the
    caller gives the model up)."""
    from . import lean

    if kind == "transformers" or (kind == "auto" and not lean.supports(model)):
        if quantization:
            why = ("runner='transformers'" if kind == "transformers"
                   else f"model_type {model.config.model_type!r} runs through transformers' own forward")
            raise ValueError(f"quantization={quantization!r} needs the lean runner, which supports the Llama family "
                             f"({', '.join(sorted(lean.LLAMA_FAMILY))}, no sliding window); {why}: "
                             "load it without quantization")
        return CausalLMRunner(model, vocab_limit)
    if not lean.supports(model):
        raise ValueError(f"runner='lean' does not support model_type {model.config.model_type!r}: use runner='auto'")
    return lean.LeanRunner(model, vocab_limit, quantization=quantization, release_weights=release_weights)
