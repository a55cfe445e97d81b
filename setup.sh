#!/usr/bin/env bash
# Create .venv with the toolkit (editable), its test dependencies and every backend's runtime.
# Safe to re-run; slow steps are cached under ~/.cache/mobilevlm.
#
# - torch is installed first and pinned (2.13.0, the CPU build on local disk) so that no later
#   requirement can make the resolver pull a multi-GB CUDA build.
# - llama-cpp-python (the `gguf` extra) is built from source once (about 6-8 minutes on 2 cores) and
#   its wheel cached. On CPUs with AVX-512 the build must not use the AMX kernels of a native build
#   (they die with "Illegal instruction" on these VMs), so the instruction sets are named.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
CACHE=${MOBILEVLM_CACHE:-$HOME/.cache/mobilevlm}
LLAMA_CPP_VERSION=0.3.36

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0

if grep -q avx512f /proc/cpuinfo 2>/dev/null; then
  flavor=avx512
  llama_args="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  flavor=native
  llama_args="-DGGML_NATIVE=ON"
fi
wheels="$CACHE/wheels/$flavor"
if ! ls "$wheels"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl >/dev/null 2>&1; then
  if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
    apt-get update -qq && apt-get install -y -qq cmake g++ ninja-build >/dev/null
  fi
  echo "building llama-cpp-python $LLAMA_CPP_VERSION ($flavor; several minutes, cached in $wheels) ..."
  mkdir -p "$wheels"
  CMAKE_ARGS="$llama_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    .venv/bin/python -m pip wheel -q --no-deps --no-binary llama-cpp-python -w "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
"${PIP[@]}" -c <(echo torch==2.13.0) "$wheels"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl
"${PIP[@]}" -c <(echo torch==2.13.0) -e '.[test,onnx,coreml,gguf]'
.venv/bin/python -c "import mobilevlm.export, mobilevlm.benchmarks, torch, llama_cpp, onnxruntime, coremltools; print('mobilevlm ready: torch', torch.__version__)"
