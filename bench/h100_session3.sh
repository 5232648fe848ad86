#!/usr/bin/env bash
# The device work of 2026-11-23 (third session) on the H100 machine: one background job per machine
# (`chain`), fetched by `collect` calls. Results land in $OUT; the lead copies them to bench/results/.
# (The second session's `prep`/`bench13b` calls are in git history: bench/h100_session2.sh at e026735.)
#
#   chain    llama.cpp CUDA build (5.3 min; its 265 MB wheel cannot be carried back, so every fresh machine
#            builds it) || CUDA extension, GPU tests, 7B build; then llama.cpp's own GPU test, the cold-kernel
#            A/B on a DRAM-sized pool (it ran as --compare-4way while the runtime read eight rows at a time),
#            the 7B bench (every system, llama.cpp in a child process, budget sweep, step profile), then the
#            13B bench (7B work removed first: 64 GiB of disk).
#            Start: mkdir -p /tmp/chain && (setsid nohup bash bench/h100_session3.sh chain \
#                       > /tmp/chain/chain.log 2>&1 < /dev/null &)
#   chain13  the 13B bench alone (what ran on the second machine, without llama.cpp; started the same way)
#   collect  STAGE MAX_WAIT_S: wait for /tmp/chain/STAGE.done (at most MAX_WAIT_S), pack what is finished into $OUT
set -u
out=${OUT:?run on the device machine}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HYBRID_RUNTIME_CACHE=/tmp/hr_cache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
R=/tmp/chain
case "${1:-}" in
chain)
    mkdir -p $R/b7 $R/b13
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; lscpu | grep -E "Model name|^CPU\(s\)|L3|Thread"; \
      cat /sys/kernel/mm/transparent_hugepage/enabled; df -h /tmp | tail -1; } > $R/machine.txt 2>&1
    ( bash bench/build_llamacpp_device.sh install > $R/llbuild.log 2>&1; echo $? > $R/llbuild.rc ) &
    stamp "CUDA extension (while llama.cpp compiles)"
    python3 setup.py build_ext --inplace > $R/ext_build.log 2>&1 || tail -30 $R/ext_build.log
    stamp "input-check test alone (it segfaulted before the checks moved ahead of the binding)"
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py::test_cuda_input_checks > $R/input_checks.log 2>&1
    echo "input-check test rc=$?" | tee -a $R/input_checks.log
    stamp "GPU tests"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu_runtime.py \
        tests/test_decode_fusion.py tests/test_bench.py tests/test_cpu_ffn.py > $R/gpu_tests.log 2>&1
    echo "gpu tests rc=$?" | tee -a $R/gpu_tests.log
    stamp "7B model build (while llama.cpp compiles; untimed)"
    python3 -m bench.run_bench --systems dense-gpu --runs 1 --new-tokens 8 --sweep none --out $R/prep \
        --time-budget-s 400 > $R/prep7b.log 2>&1
    stamp "waiting for llama.cpp"; while [ ! -f $R/llbuild.rc ]; do sleep 2; done; tail -3 $R/llbuild.log
    stamp "llama.cpp GGUF test on the GPU build"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_gguf.py > $R/gguf_tests.log 2>&1
    echo "gguf tests rc=$?" | tee -a $R/gguf_tests.log
    touch $R/tests.done
    stamp "cold kernel A/B, 6 GB pool (no L3 reuse), the runtime's 8 GiB active-set shape"
    python3 -m bench.bench_cpu_ffn --threads 16 --formats fp16 --n-cold 7346 --active-frac 0.052 --superset 1.99 \
        --skewed --seconds 2 --batch-tokens 0 --total-gb 6 --compare-8way --json $R/cpu_ffn_ab.json \
        > $R/cpu_ffn_ab.txt 2>&1
    cat $R/cpu_ffn_ab.txt
    stamp "7B bench"
    python3 -m bench.run_bench --out $R/b7 --profile-time --time-budget-s 480 > $R/b7/console.log 2>&1
    touch $R/b7.done
    stamp "13B bench"
    python3 -m bench.run_bench --model synthetic-13b --out $R/b13 --clean-work --gpu-memory 12GiB \
        --systems dense-gpu,hybrid,dense-offload,hybrid-gpu,hf-gpu,llamacpp-gpu,llamacpp-offload \
        --sweep 12,16,24 --profile-time --time-budget-s 560 > $R/b13/console.log 2>&1
    touch $R/b13.done
    stamp "chain done"; touch $R/all.done
    ;;
chain13)  # the second machine of the session (the first was given back during the 13B bench): 13B only
    mkdir -p $R/b13
    stamp "CUDA extension"
    python3 setup.py build_ext --inplace > $R/ext_build.log 2>&1 || tail -30 $R/ext_build.log
    stamp "kernel tests (capacity now checked before the binding)"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py > $R/kernel_tests.log 2>&1
    echo "kernel tests rc=$?" | tee -a $R/kernel_tests.log
    stamp "13B bench (no llama.cpp on this machine: its build takes 5.3 min)"
    python3 -m bench.run_bench --model synthetic-13b --out $R/b13 --gpu-memory 12GiB \
        --systems dense-gpu,hybrid,dense-offload,hybrid-gpu,hf-gpu --sweep 12,16,24 --profile-time \
        --time-budget-s 480 > $R/b13/console.log 2>&1
    touch $R/b13.done; stamp "chain13 done"
    ;;
collect)
    stage=${2:?stage}; max=${3:-560}
    while [ ! -f $R/$stage.done ] && [ $(( $(date +%s) - t0 )) -lt $max ]; do sleep 3; done
    ls $R; tail -4 $R/chain.log
    for d in b7 b13; do [ -f $R/$d.done ] && [ ! -f $R/$d.collected ] && tar czf $out/$d.tgz -C $R $d && touch $R/$d.collected; done
    tar czf $out/logs.tgz -C $R --exclude=b7 --exclude=b13 --exclude=prep . 2>/dev/null
    tail -3 $R/input_checks.log $R/gpu_tests.log $R/gguf_tests.log 2>/dev/null
    for d in b7 b13; do [ -f $R/$d/console.log ] && tail -30 $R/$d/console.log; done
    ;;
*)
    echo "usage: $0 chain|collect STAGE MAX_WAIT_S" >&2; exit 2 ;;
esac
