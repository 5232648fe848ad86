#!/usr/bin/env bash
# One device call: build the CUDA extension, run the GPU tests, the kernel and CPU-kernel benches.
# Usage (repo root, on the GPU machine): bash bench/gpu_checks.sh OUTDIR
set -u
out=${1:?usage: gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HYBRID_RUNTIME_CACHE=/tmp/hr_cache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp "gpu"; nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|L3" | tee -a "$out/gpu.txt"
stamp "build"; python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; echo "build rc=$?"
python3 -c "from hybrid_runtime.kernels import kernel_status as s; print(s())"
stamp "tests"; python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_runtime.py \
  --deselect tests/test_kernels.py::test_cuda_input_checks -rs > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
tail -4 "$out/gpu_tests.log"
