#!/usr/bin/env bash
# llama-cpp-python with CUDA on the GPU machine, which has no network (for bench/run_bench.py's
# llamacpp-gpu / llamacpp-offload systems).
#
#   bash bench/build_llamacpp_device.sh prepare   # HERE (has PyPI): sdist, repacked, + wheels -> .carry/llamacpp/
#   bash bench/build_llamacpp_device.sh install   # ON THE GPU MACHINE, with carry [".carry/llamacpp"]
#
# Why a repack: the llama-cpp-python sdist (0.3.36: 76.6 MB) carries its own .git (39 MB) and llama.cpp's
# docs and tokenizer test vocabularies (113 MB unpacked); the device call can carry 64 MiB in all, the
# repository included. Only those are removed (12.5 MB repack): CMake never reads them. (An earlier run
# of 2026-11-23 used a 3.7 MB repack that also dropped tools/, tests/, examples/ and the other GPU backends;
# the later diagnosis showed the segfaults it saw do not depend on the repack: the 12.5 MB one
# crashed the same way with the image's host compiler.)
#
# Host compiler: the image sets CUDAHOSTCXX=/opt/gcc/bin/g++ (a wrapper around the same GCC 13.3). Built with
# it (one host of 2026-11-23), llama.cpp segfaulted in llama_model::print_info in every
# process that had imported torch AND in bench/llamacpp_child.py started from the bench (no torch in it);
# built with the system g++ as nvcc's host compiler (below, second machine) and the child importing llama_cpp
# before numpy, the child loaded and ran both 7B systems; a process that imported torch first still
# segfaulted. The two changes were made together, so which of them fixed the child is not known. Run
# llama.cpp in a process without torch (the bench does: bench/llamacpp_child.py).
#
# What the device image already has (KINDS.md, "Python packages already there"): scikit-build-core,
# cmake, ninja, pathspec, packaging, numpy, jinja2, typing-extensions, pyyaml, requests, tqdm. Missing,
# so carried as wheels: diskcache (llama-cpp-python runtime dependency) and gguf (the GGUF writer).
# The build runs with --no-build-isolation against the image's scikit-build-core + cmake + ninja.
#
# Build time: ggml-cuda for one architecture (sm_90) on 16 cores takes several minutes. The CMake
# build directory is kept in build/llamacpp-cmake (ignored by git; kept between calls while the
# machine stays warm), so if one 600 s call runs out, running `install` again continues the build.
set -euo pipefail
VERSION="${LLAMACPP_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/.carry/llamacpp"

case "${1:-}" in
prepare)
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$CARRY"
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp/dl"
    tar xzf "$tmp/dl/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
    src="$tmp/llama_cpp_python-$VERSION"
    # not read by this build: the sdist's own .git (39 MB), llama.cpp's docs, media and test vocabularies
    rm -rf "$src/.git" "$src/vendor/llama.cpp/.git" "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/media" \
        "$src/vendor/llama.cpp/models"
    tar czf "$CARRY/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" "llama_cpp_python-$VERSION"
    pip download --no-deps "gguf==0.19.0" "diskcache==5.6.3" -d "$CARRY"
    du -ch "$CARRY"/*
    ;;
install)
    # A wheel built by an earlier call on this (still warm) machine installs in seconds. It cannot be
    # carried back: the sm_90 build is 265 MB (measured 2026-11-23), over what a call returns.
    wheel="$(ls "$ROOT"/build/llamacpp-wheel/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
    python3 -m pip install --no-index --no-deps "$CARRY"/gguf-*.whl "$CARRY"/diskcache-*.whl
    if [ -z "$wheel" ]; then
        test -f "$CARRY/llama_cpp_python-$VERSION.tar.gz" || { echo "no $CARRY/llama_cpp_python-$VERSION.tar.gz: run 'prepare' here and carry .carry/llamacpp" >&2; exit 2; }
        command -v nvcc >/dev/null && nvcc --version | tail -1
        # unpacked once at a fixed path: the CMake cache in build-dir is tied to the source path
        src="$ROOT/build/llamacpp-src/llama_cpp_python-$VERSION"
        [ -d "$src" ] || { mkdir -p "$ROOT/build/llamacpp-src"; tar xzf "$CARRY/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/build/llamacpp-src"; }
        mkdir -p "$ROOT/build/llamacpp-cmake" "$ROOT/build/llamacpp-wheel"
        log="$ROOT/build/llamacpp-build.log"
        echo "building (log: $log)"
        env -u CUDAHOSTCXX CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        CMAKE_ARGS="${LLAMACPP_CMAKE_ARGS:--DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=on -DCMAKE_CUDA_HOST_COMPILER=$(command -v g++)} \
-DLLAVA_BUILD=off -DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off -DLLAMA_BUILD_TOOLS=off -DLLAMA_BUILD_SERVER=off" \
        python3 -m pip wheel --no-index --no-deps --no-build-isolation -v -w "$ROOT/build/llamacpp-wheel" \
            -C build-dir="$ROOT/build/llamacpp-cmake" "$src" > "$log" 2>&1 \
            || { tail -60 "$log"; [ -n "${OUT:-}" ] && cp "$log" "$OUT/"; exit 1; }
        { grep -oE '\[[0-9]+/[0-9]+\]' "$log" || echo 'nothing to rebuild'; } | tail -1
        wheel="$(ls "$ROOT"/build/llamacpp-wheel/llama_cpp_python-"$VERSION"-*.whl | head -1)"
    fi
    ls -la "$wheel"
    python3 -m pip install --no-index --no-deps --force-reinstall "$wheel"
    python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())"
    ;;
*)
    echo "usage: $0 prepare|install" >&2
    exit 2
    ;;
esac
