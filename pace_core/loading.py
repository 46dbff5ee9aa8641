"""Loading models and tokenizers, and the checks that keep a target/draft pair sane.

Everything here raises :class:`ModelLoadError` with a message that names the fix.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from .configs import DTYPE_NAMES

logger = logging.getLogger(__name__)

DTYPES = {name: name if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}  # configs.DType's names
PARD_TOKEN_KEYS = ("pard_token", "mask_token_id", "ptd_token_id")


class ModelLoadError(ValueError):
    """A model, tokenizer or target/draft pair that cannot be used, with the reason."""


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve_model_path(name_or_path: str) -> str:
    """A local directory (absolute, relative to the working directory, or relative to
    the project root, so ``models/demo-target`` works from anywhere), else the name
    unchanged for the Hugging Face cache/hub."""
    p = Path(os.path.expanduser(name_or_path))
    for cand in (p, project_root() / p):
        if cand.is_dir():
            if not (cand / "config.json").is_file():
                raise ModelLoadError(f"{cand} is a directory but has no config.json: point to a saved model directory")
            return str(cand.resolve())
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep == "\\"
    if looks_like_path:
        raise ModelLoadError(f"model path {name_or_path!r} does not exist: pass a directory containing config.json")
    return name_or_path


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """Local directory, else the local HF cache, else the hub; a clear error if none works."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        return loader(path, **kwargs)
    try:
        return loader(path, local_files_only=True, **kwargs)
    except Exception as local_err:  # not cached: try the hub unless offline
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelLoadError(
                f"{what} {name!r} not found: it is not a local directory and not in the Hugging Face cache "
                f"(HF_HUB_OFFLINE=1). Pass a directory containing config.json. ({local_err})"
            ) from None
        try:
            return loader(path, **kwargs)
        except Exception as hub_err:
            raise ModelLoadError(
                f"{what} {name!r} not found: it is not a local directory, not in the Hugging Face cache, "
                f"and the hub could not provide it. Pass a directory containing config.json. ({hub_err})"
            ) from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer", trust_remote_code=trust_remote_code)


def load_causal_lm(name: str, dtype: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    _refuse_prequantized(name, trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained(
            AutoModelForCausalLM.from_pretrained, name, "model", dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    model.eval()
    model.requires_grad_(False)
    return model


def _refuse_prequantized(name: str, trust_remote_code: bool) -> None:
    """A checkpoint stored quantized (GPTQ, AWQ, bitsandbytes, FP8, ...: a
    ``quantization_config`` in its config.json) cannot be read by the kernels: say so
    before transformers tries to load it with libraries this engine does not use."""
    from transformers import AutoConfig

    try:
        config = _from_pretrained(AutoConfig.from_pretrained, name, "model", trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception:  # let from_pretrained report what is wrong with the checkpoint
        return
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else getattr(quant, "quant_method",
                                                                                               "unknown")
        raise ModelLoadError(
            f"{name} is already quantized (quant_method {method!r}), which this engine cannot read: load the "
            "original float32 / bfloat16 / float16 checkpoint and pass quantization='int8' or 'int4' "
            "(LLMModel(..., quantization=...), app argument model.quantization) to quantize it at load")


def return_freed_memory() -> None:
    """Hand the memory freed while packing back to the OS (glibc keeps freed heap pages of
    the many mid-sized tensors a load allocates; without this ~0.1 GB of a 0.5B model's
    load stays resident). A no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_pard_token(draft_config, explicit: int | None) -> int:
    """The draft's PARD (mask) token id: an explicit value wins (with a warning when the
    config disagrees); else the config's ``pard_token``/``mask_token_id``/``ptd_token_id``."""
    from_config = None
    for key in PARD_TOKEN_KEYS:
        value = getattr(draft_config, key, None)
        if value is not None:
            from_config = int(value)
            break
    if explicit is not None:
        if from_config is not None and from_config != explicit:
            logger.warning("pard_token=%d overrides the draft config's value %d", explicit, from_config)
        token = explicit
    elif from_config is None:
        raise ModelLoadError(
            "the draft has no PARD token: its config.json has none of "
            f"{', '.join(PARD_TOKEN_KEYS)}; pass PardSpecDecodeConfig(pard_token=ID) or add 'pard_token' to config.json"
        )
    else:
        token = from_config
    vocab = draft_config.vocab_size
    if not 0 <= token < vocab:
        raise ModelLoadError(f"pard_token {token} is outside the draft's vocabulary (size {vocab})")
    return token


def check_same_tokenizer(target_tok, draft_tok) -> None:
    """A PARD draft must share its target's tokenizer. Embedding sizes may differ by
    padding, so only the real token ids of both are compared."""
    t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if t_vocab == d_vocab:
        return
    t_by_id = {i: s for s, i in t_vocab.items()}
    d_by_id = {i: s for s, i in d_vocab.items()}
    for i in sorted(set(t_by_id) | set(d_by_id)):
        a, b = t_by_id.get(i), d_by_id.get(i)
        if a is None or b is None:
            continue  # a token only one side has (e.g. the draft's added PARD token)
        if a != b:
            raise ModelLoadError(
                f"the draft's tokenizer differs from the target's: token id {i} is {a!r} in the target and {b!r} "
                "in the draft. A PARD draft must share its target's tokenizer; pick the draft trained for this target"
            )
    common = set(t_by_id) & set(d_by_id)
    if len(common) < 0.9 * len(t_by_id):
        raise ModelLoadError(
            f"the draft's tokenizer covers only {len(common)} of the target's {len(t_by_id)} token ids: "
            "a PARD draft must share its target's tokenizer"
        )


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids, as transformers uses them: generation_config.json's
    ``eos_token_id`` (often a list) together with the tokenizer's eos token."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
        break  # generation_config wins over config, as in transformers
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def sampling_defaults(generation_config, name: str = "the model") -> dict:
    """The sampling defaults a checkpoint ships in its ``generation_config.json`` (as
    loaded by transformers: ``model.generation_config``), as
    :class:`~pace_core.configs.SamplingConfig` fields. As in transformers,
    ``repetition_penalty`` applies to greedy decoding too, while ``temperature`` (1.0 when
    absent), ``top_k``, ``top_p`` and ``min_p`` apply only with ``do_sample: true``
    (without it, transformers' ``generate()`` is greedy). Fields the file does not set are
    not defaults (transformers' own fallbacks, such as top_k=50, are not applied)."""
    from .configs import SamplingConfig

    gen = generation_config
    if gen is None:
        return {}
    out: dict = {}
    if gen.repetition_penalty is not None and gen.repetition_penalty != 1.0:
        out["repetition_penalty"] = float(gen.repetition_penalty)
    temperature = 1.0 if gen.temperature is None else float(gen.temperature)
    if gen.do_sample and temperature > 0:
        out["temperature"] = temperature
        if gen.top_k:
            out["top_k"] = int(gen.top_k)
        if gen.top_p is not None and gen.top_p < 1.0:
            out["top_p"] = float(gen.top_p)
        if gen.min_p:
            out["min_p"] = float(gen.min_p)
    try:
        SamplingConfig(**out)
    except ValueError as err:
        raise ModelLoadError(f"{name}: generation_config.json has sampling values this engine cannot use ({err}); "
                             "fix the file, or load with generation_config_defaults=False") from None
    return out
