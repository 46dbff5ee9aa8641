#!/usr/bin/env bash
# Builds llama.cpp (the CPU engine most people run) from the llama-cpp-python source
# distribution on PyPI, so that benchmarks/real_shapes.py and benchmarks/quality.py can
# run it beside this engine on the same random-weight / demo checkpoints.
#
#   bash benchmarks/llamacpp/setup.sh [DIR]     (default ~/.cache/pace_core/llamacpp)
#
# DIR gets: src/ (llama-cpp-python's sdist: the Python binding and vendor/llama.cpp,
# whose convert_hf_to_gguf.py and gguf-py write the GGUF files), build/bin/ (llama-bench,
# llama-quantize, llama-speculative-simple, llama-perplexity and libllama.so, built with
# -DGGML_NATIVE=ON for this CPU: ~15 min on 2 cores, once). Nothing is installed into the
# current Python: the binding is used from src/ with LLAMA_CPP_LIB_PATH pointing at the
# build (benchmarks/llamacpp/runner.py does that). Prints DIR when done.
set -euo pipefail
version=0.3.36
dir=${1:-${PACE_LLAMACPP_DIR:-$HOME/.cache/pace_core/llamacpp}}
bins=(llama-bench llama-quantize llama-speculative-simple llama-perplexity)
if [[ -f $dir/.built-$version ]]; then echo "$dir"; exit 0; fi
mkdir -p "$dir"
if [[ ! -d $dir/src/vendor/llama.cpp ]]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" 2>&1 \
    | grep -v '^WARNING: Location' >&2 || true
  rm -rf "$dir/src" && mkdir -p "$dir/src"
  tar xzf "$tmp"/llama_cpp_python-$version.tar.gz -C "$dir/src" --strip-components 1
  rm -rf "$tmp"
fi
# what the converter and the binding import (numpy, gguf's own needs, jinja2 for chat templates)
python3 -m pip install -q numpy sentencepiece pyyaml diskcache jinja2 typing_extensions 2>&1 \
  | grep -v '^WARNING: Location' >&2 || true
echo "building llama.cpp $version in $dir/build (~15 min on 2 cores, once)" >&2
cmake -S "$dir/src/vendor/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$dir/build" -j "$(nproc)" --target "${bins[@]}" llama >&2
for b in "${bins[@]}"; do test -x "$dir/build/bin/$b"; done
touch "$dir/.built-$version"
echo "$dir"
