"""Run llama.cpp's own converter (convert_hf_to_gguf.py from the vendored tree that
setup.sh fetched) on a checkpoint of this repository's benchmarks.

The benchmarks' random-weight models carry a word-level tokenizer and the demo pair a
locally trained byte-level BPE: llama.cpp's converter knows neither pre-tokenizer (it
recognises tokenizers by the hash of a test string's tokens) and wants at least one BPE
merge. Both only concern tokenizer metadata, so this wrapper names a known
pre-tokenizer ("qwen2") when the hash is unknown and adds one harmless merge when there
are none; a word-level vocabulary ("w2", "w3", ...) also gets the 256 byte-level
characters as the names of ids 2..257, so that llama.cpp's tools that take text (its
speculative example) can be given a prompt: byte_prompt() below. The weights are
converted untouched (benchmarks/real_shapes.py checks that llama.cpp's f32 greedy tokens
equal this engine's).

    python benchmarks/llamacpp/convert.py LLAMACPP_DIR MODEL_DIR --outfile OUT.gguf --outtype f32|bf16|q8_0
"""
import sys
from pathlib import Path


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table: what llama.cpp's BPE splits text into first."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def byte_prompt(ids: list[int]) -> str:
    """Text that a converted word-level model's llama.cpp tokenizer reads as ``ids``
    (each in 2..257: byte id - 2)."""
    return bytes(i - 2 for i in ids).decode("latin-1")


def main() -> None:
    llamacpp_dir, rest = Path(sys.argv[1]), sys.argv[2:]
    tree = llamacpp_dir / "src" / "vendor" / "llama.cpp"
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    import gguf
    from conversion import base

    recognised = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            return "qwen2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    vocab_base = base.TextModel.get_vocab_base

    def get_vocab_base(self):
        tokens, toktypes, tokpre = vocab_base(self)
        if len(tokens) > 258 and tokens[2:4] == ["w2", "w3"]:  # the benchmarks' word-level vocabulary
            tokens[2:258] = byte_alphabet()
        return tokens, toktypes, tokpre

    base.TextModel.get_vocab_base = get_vocab_base
    add_to_gguf = gguf.SpecialVocab.add_to_gguf

    def add_with_a_merge(self, gw, *args, **kwargs):
        if self.load_merges and not self.merges:
            self.merges = ["w 2"]
        return add_to_gguf(self, gw, *args, **kwargs)

    gguf.SpecialVocab.add_to_gguf = add_with_a_merge
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *rest]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
