#!/usr/bin/env bash
# The device calls of 2026-11-23 (second session) on the H100 machine, one subcommand per call.
# Results land in $OUT; the lead copies them to bench/results/.
#
#   prep     CPU cold-kernel microbench (runtime-like active sets, thread counts, spin), then the
#            llama-cpp-python CUDA build (5.3 min; its wheel is 265 MB: too large to bring back, so every
#            fresh machine builds it again)
#   bench13b the benchmark on the synthetic 13B (not run yet)
#   chain    (what ran) all of one machine's work as one background job: llama.cpp build || CUDA
#            extension + GPU tests + 7B build; then the 7B bench, then the PowerInfer-profile bench.
#            Start: setsid nohup bash bench/h100_session2.sh chain > /tmp/chain/chain.log 2>&1 &
#   collect  STAGE MAX_WAIT_S: wait for a chain stage, pack the finished results into $OUT
set -u
out=${OUT:?run on the device machine}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HYBRID_RUNTIME_CACHE=/tmp/hr_cache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
cpu_ffn() {  # the runtime's shape at 8 GiB: 7342 cold rows per layer, ~507 firing + ~188 predicted-but-dead
    python3 -m bench.bench_cpu_ffn --formats bf16,fp16 --n-cold 7342 --active-frac 0.069 --superset 1.37 \
        --skewed --seconds 1 --batch-tokens 0 "$@"
}
case "${1:-}" in
prep)
    stamp machine
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; lscpu | grep -E "Model name|^CPU\(s\)|L3|Thread"; \
      python3 -c "import numba, llvmlite.binding as l; print('numba', numba.__version__, 'f16c', l.get_host_cpu_features().get('f16c'))"; \
      df -h /tmp . | tail -2; } | tee "$out/machine.txt"
    stamp "cold kernel microbench"
    {   # session 1's setting first (random 10% of 7500 rows, all firing): compare with 120 / 56 GB/s (bf16 / fp16)
        python3 -m bench.bench_cpu_ffn --threads 16 --formats bf16,fp16 --seconds 1 --batch-tokens 0
        cpu_ffn --threads 16 --compare-blocked
        cpu_ffn --threads 16 --gap-us 200 --compare-blocked
        GOMP_SPINCOUNT=20000000 cpu_ffn --threads 16 --gap-us 200
        cpu_ffn --threads 8 --gap-us 200
    } 2>&1 | grep -v "^wrote" | tee "$out/cpu_ffn.txt"
    stamp "llama.cpp build"
    bash bench/build_llamacpp_device.sh install 2>&1 | tail -20
    cp build/llamacpp-build.log "$out/" 2>/dev/null
    stamp done
    ;;
bench13b)
    stamp "llama.cpp"; bash bench/build_llamacpp_device.sh install 2>&1 | tail -3
    stamp "CUDA extension"; python3 setup.py build_ext --inplace > /tmp/ext_build.log 2>&1 || tail -30 /tmp/ext_build.log
    stamp "bench"
    shift; python3 -m bench.run_bench --model synthetic-13b --out "$out" "$@" 2>&1 | tail -60
    stamp done
    ;;
chain)  # everything of one machine in one background job (run it with setsid; `collect` fetches)
    R=/tmp/chain; mkdir -p $R/b7 $R/pi
    ( bash bench/build_llamacpp_device.sh install > $R/llbuild.log 2>&1; echo $? > $R/llbuild.rc ) &
    stamp "CUDA extension (while llama.cpp compiles)"
    python3 setup.py build_ext --inplace > $R/ext_build.log 2>&1 || tail -30 $R/ext_build.log
    stamp "GPU tests"
    python3 -m pytest -q -s -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu_runtime.py \
        tests/test_decode_fusion.py tests/test_bench.py --deselect tests/test_kernels.py::test_cuda_input_checks \
        > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu_tests.log
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py::test_cuda_input_checks > $R/input_checks.log 2>&1
    echo "input-check test rc=$?" | tee -a $R/input_checks.log
    touch $R/tests.done
    stamp "7B model build (while llama.cpp compiles; untimed)"
    python3 -m bench.run_bench --systems dense-gpu --runs 1 --new-tokens 8 --sweep none --out $R/prep \
        --time-budget-s 400 > $R/prep7b.log 2>&1
    stamp "waiting for llama.cpp"; while [ ! -f $R/llbuild.rc ]; do sleep 2; done; tail -3 $R/llbuild.log
    stamp "7B bench"
    python3 -m bench.run_bench --out $R/b7 --profile-time --time-budget-s 420 > $R/b7/console.log 2>&1
    touch $R/b7.done
    stamp "PowerInfer-profile bench"
    python3 -m bench.run_bench --out $R/pi --sparsity-profile powerinfer --clean-work \
        --systems dense-gpu,hybrid,dense-offload,hybrid-gpu --sweep 4,6,8,12,16 --profile-time --time-budget-s 280 \
        > $R/pi/console.log 2>&1
    touch $R/pi.done
    stamp "chain done"; touch $R/all.done
    ;;
collect)  # collect STAGE MAX_WAIT_S: wait for /tmp/chain/STAGE.done, then pack what exists into $OUT
    R=/tmp/chain; stage=${2:?stage}; max=${3:-560}
    while [ ! -f $R/$stage.done ] && [ $(( $(date +%s) - t0 )) -lt $max ]; do sleep 3; done
    ls $R; tail -5 $R/chain.log
    for d in b7 pi; do [ -f $R/$d.done ] && [ ! -f $R/$d.collected ] && tar czf $out/$d.tgz -C $R $d && touch $R/$d.collected; done
    tar czf $out/logs.tgz -C $R --exclude=b7 --exclude=pi --exclude=prep . 2>/dev/null
    tail -4 $R/gpu_tests.log $R/input_checks.log 2>/dev/null
    for d in b7 pi; do [ -f $R/$d/console.log ] && tail -25 $R/$d/console.log; done
    ;;
*)
    echo "usage: $0 prep|bench13b|chain|collect [options]" >&2; exit 2 ;;
esac
