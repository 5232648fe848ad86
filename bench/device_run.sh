#!/usr/bin/env bash
# The recipe for the lent GPU machine (no network; a device call carries at most 64 MiB and the machine
# is given back 30 s after a call returns): one background job, fetched by `collect` calls. Results land
# in $OUT; copy them to bench/results/ as <device>-<date>[-what].* and describe them in its README.
# Before: `bash bench/build_llamacpp_device.sh prepare` here (the llama.cpp sdist to carry).
#
#   start [STAGE]  launch STAGE (default run) in its own process session (it outlives the call)
#   checks         the CUDA extension build, the GPU tests, the kernel and cold-kernel benches (about 5 min)
#   run            llama.cpp built with the system g++ as nvcc's host compiler || CUDA extension + the 7B model;
#                  the llama.cpp diagnosis (bench/llamacpp_diag.sh); the 7B bench with every system; llama.cpp's
#                  tests (about 15 device minutes)
#   bench13b       the 13B bench at 12 GiB (after `run`: reuses its llama.cpp build)
#   collect STAGE MAX_WAIT_S  wait for /tmp/chain/STAGE.done (at most MAX_WAIT_S), pack what is finished into $OUT;
#                  exits at once when /tmp/chain is missing (a fresh machine)
#
# Kill a background stage with a pattern that does not match the killing command itself, e.g.
# pkill -f "device_run[.]sh run" (a plain one kills the device call's own shell).
set -u
out=${OUT:?run on the device machine}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HYBRID_RUNTIME_CACHE=/tmp/hr_cache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
R=/tmp/chain
# steps both stages run
machine_facts() {
    { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; lscpu | grep -E "Model name|^CPU\(s\)|L3|Thread"; \
      cat /sys/kernel/mm/transparent_hugepage/enabled; uname -r; df -h /tmp | tail -1; } > $R/machine.txt 2>&1
}
compiler_facts() {
    { command -v g++; g++ --version | head -1; /opt/gcc/bin/g++ --version | head -1; \
      ls /opt/gcc/lib64 /opt/gcc/lib 2>/dev/null | grep -E "stdc|gcc_s" | tr '\n' ' '; } >> $R/machine.txt 2>&1
}
builds() {   # llama.cpp in the background || the CUDA extension, then the 7B model (untimed)
    ( bash bench/build_llamacpp_device.sh install > $R/llbuild.log 2>&1; echo $? > $R/llbuild.rc ) &
    stamp "CUDA extension (while llama.cpp compiles)"
    python3 setup.py build_ext --inplace > $R/ext_build.log 2>&1 || tail -30 $R/ext_build.log
    stamp "7B model build (while llama.cpp compiles; untimed)"
    python3 -m bench.run_bench --systems dense-gpu --runs 1 --new-tokens 8 --sweep none --out $R/prep \
        --time-budget-s 400 > $R/prep7b.log 2>&1
}
wait_llamacpp() {
    stamp "waiting for llama.cpp"; while [ ! -f $R/llbuild.rc ]; do sleep 2; done; tail -3 $R/llbuild.log
}
gguf_tests() {
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_gguf.py > $R/gguf_tests.log 2>&1
    echo "gguf tests rc=$?" | tee -a $R/gguf_tests.log
}
bench7b() {
    python3 -m bench.run_bench --out $R/b7 --profile-time --time-budget-s 480 > $R/b7/console.log 2>&1
}
case "${1:-}" in
start)
    mkdir -p $R
    (setsid nohup bash bench/device_run.sh ${2:-run} > $R/chain.log 2>&1 < /dev/null &)
    sleep 2; cat $R/chain.log
    ;;
checks)
    mkdir -p $R/checks
    machine_facts
    stamp "CUDA extension"; python3 setup.py build_ext --inplace > $R/checks/build.log 2>&1; echo "build rc=$?"
    python3 -c "from hybrid_runtime.kernels import kernel_status as s; print(s())"
    stamp "GPU tests"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu_runtime.py tests/test_hybrid.py \
        tests/test_decode_fusion.py tests/test_bench.py tests/test_cpu_ffn.py > $R/checks/gpu_tests.log 2>&1
    echo "gpu tests rc=$?" | tee -a $R/checks/gpu_tests.log
    stamp "kernel benches"
    python3 bench/bench_kernels.py --out $R/checks > $R/checks/kernels.log 2>&1
    python3 bench/bench_cpu_ffn.py --json $R/checks/cold-kernel.json > $R/checks/cpu_ffn.log 2>&1
    stamp "checks done"; touch $R/checks.done
    ;;
run)    # llama.cpp built with the system g++ as nvcc's host compiler (built with the image's
        # CUDAHOSTCXX=/opt/gcc/bin/g++ it segfaulted in llama_model::print_info inside a libstdc++ copy in
        # libggml-cuda.so) || CUDA extension + 7B model; diagnosis; 7B bench; GGUF tests
    mkdir -p $R/b7 $R/diag
    machine_facts; compiler_facts
    builds
    wait_llamacpp
    cp build/llamacpp-build.log $R/ 2>/dev/null
    lib=$(python3 -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")/lib
    echo "libstdc++ symbols defined in libggml-cuda.so: $(nm -D --defined-only $lib/libggml-cuda.so | grep -c -E ' (_ZNS|_ZNKS|_ZSt)')" >> $R/machine.txt
    stamp "llama.cpp diagnosis (tiny GGUF)"
    bash bench/llamacpp_diag.sh $R/diag > $R/diag/diag.txt 2>&1
    grep -E ": ok|FAILED" $R/diag/diag.txt
    touch $R/diag.done
    stamp "7B bench"
    bench7b
    touch $R/b7.done
    stamp "llama.cpp tests"
    gguf_tests
    stamp "run done"; touch $R/all.done
    ;;
bench13b)
    mkdir -p $R/b13
    stamp "13B bench"
    python3 -m bench.run_bench --model synthetic-13b --out $R/b13 --clean-work --gpu-memory 12GiB \
        --systems dense-gpu,hybrid,dense-offload,hybrid-gpu,hf-gpu,llamacpp-gpu,llamacpp-offload \
        --sweep 12,16,24 --profile-time --time-budget-s 560 > $R/b13/console.log 2>&1
    touch $R/b13.done
    ;;
collect)
    stage=${2:?stage}; max=${3:-560}
    [ -d $R ] || { echo "no $R on this machine (a fresh one?)"; exit 3; }
    while [ ! -f $R/$stage.done ] && [ $(( $(date +%s) - t0 )) -lt $max ]; do sleep 3; done
    ls $R; tail -5 $R/chain.log
    for d in b7 b13 checks; do [ -f $R/$d.done ] && [ ! -f $R/$d.collected ] && tar czf $out/$d.tgz -C $R $d && touch $R/$d.collected; done
    tar czf $out/logs.tgz -C $R --exclude=b7 --exclude=b13 --exclude=checks --exclude=prep --exclude='*.gguf' --exclude=hf . 2>/dev/null
    [ -f $R/diag/diag.txt ] && grep -E ": ok|FAILED|^#[0-5] |throw|TORCH_CHECK" $R/diag/diag.txt; cat $R/machine.txt
    tail -3 $R/gpu_tests.log $R/gguf_tests.log 2>/dev/null
    for d in b7 b13; do [ -f $R/$d/console.log ] && tail -40 $R/$d/console.log; done
    ;;
*)
    echo "usage: $0 start [checks|run|bench13b] | checks | run | bench13b | collect STAGE MAX_WAIT_S" >&2; exit 2 ;;
esac
