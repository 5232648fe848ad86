#!/usr/bin/env bash
# The device work of the fourth session of 2026-11-23 on the H100 machine: one background job per machine,
# fetched by `collect` calls (a machine is given back 30 s after a call returns, so calls follow each other
# at once). Results land in $OUT; the lead copies them to bench/results/.
# (The third session's script is in git history: bench/h100_session3.sh at 9f9f6fc.)
#
#   start [STAGE]  launch STAGE (default chain) in its own process session (it outlives the call)
#   chain    what ran on the first machine (build script as of 9f9f6fc, i.e. with the image's CUDAHOSTCXX, and the
#            12.5 MB repack): llama.cpp CUDA build || CUDA extension, 7B model build, GPU tests; then one
#            llamacpp-gpu bench system alone (exports the 7B GGUF), the llama.cpp diagnosis
#            (bench/llamacpp_diag.sh), llama.cpp's own tests, the 7B bench and the 13B bench. Every llama.cpp
#            load in a bench segfaulted; the machine's files were gone at the next call (13B not run).
#   fresh    what ran on the second machine and is the way to run it now: llama.cpp built with the system g++ as
#            nvcc's host compiler (now the build script's default) || CUDA extension + 7B model; diagnosis; the
#            7B bench with every system, llama.cpp included; llama.cpp's tests.
#   collect  STAGE MAX_WAIT_S: wait for /tmp/chain/STAGE.done (at most MAX_WAIT_S), pack what is finished into $OUT;
#            exits at once when /tmp/chain is missing (a fresh machine)
#
# Kill a background stage with a pattern that does not match the killing command itself, e.g.
# pkill -f "h100_session4[.]sh chain" (a plain one kills the device call's own shell).
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
    (setsid nohup bash bench/h100_session4.sh ${2:-chain} > $R/chain.log 2>&1 < /dev/null &)
    sleep 2; cat $R/chain.log
    ;;
chain)
    mkdir -p $R/b7 $R/b13 $R/diag
    machine_facts
    builds
    stamp "GPU tests"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu_runtime.py \
        tests/test_decode_fusion.py tests/test_bench.py tests/test_cpu_ffn.py > $R/gpu_tests.log 2>&1
    echo "gpu tests rc=$?" | tee -a $R/gpu_tests.log
    wait_llamacpp
    stamp "llamacpp-gpu alone (exports the 7B GGUF)"
    python3 -m bench.run_bench --systems llamacpp-gpu --runs 1 --new-tokens 16 --sweep none --out $R/prepll \
        --time-budget-s 300 > $R/prepll.log 2>&1
    grep -E "llamacpp-gpu:|decode" $R/prepll.log | tail -3
    stamp "llama.cpp diagnosis"
    big=$(ls /tmp/hr_cache/bench/synthetic-7b-*/llamacpp/model-f16.gguf 2>/dev/null | head -1)
    bash bench/llamacpp_diag.sh $R/diag "$big" > $R/diag/diag.txt 2>&1
    touch $R/diag.done
    stamp "llama.cpp tests (GGUF export, llama.cpp vs this engine)"
    gguf_tests
    touch $R/tests.done
    stamp "7B bench"
    bench7b
    touch $R/b7.done
    stamp "13B bench"
    python3 -m bench.run_bench --model synthetic-13b --out $R/b13 --clean-work --gpu-memory 12GiB \
        --systems dense-gpu,hybrid,dense-offload,hybrid-gpu,hf-gpu,llamacpp-gpu,llamacpp-offload \
        --sweep 12,16,24 --profile-time --time-budget-s 560 > $R/b13/console.log 2>&1
    touch $R/b13.done
    stamp "chain done"; touch $R/all.done
    ;;
fresh)  # what ran on the second machine: llama.cpp built with the system g++ as nvcc's host compiler (the
        # first machine's build, with the image's CUDAHOSTCXX=/opt/gcc/bin/g++, segfaulted in llama_model::print_info
        # inside a libstdc++ copy in libggml-cuda.so) || CUDA extension + 7B model; diagnosis; 7B bench; GGUF tests
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
    stamp "fresh chain done"; touch $R/all.done
    ;;
collect)
    stage=${2:?stage}; max=${3:-560}
    [ -d $R ] || { echo "no $R on this machine (a fresh one?)"; exit 3; }
    while [ ! -f $R/$stage.done ] && [ $(( $(date +%s) - t0 )) -lt $max ]; do sleep 3; done
    ls $R; tail -5 $R/chain.log
    for d in b7 b13; do [ -f $R/$d.done ] && [ ! -f $R/$d.collected ] && tar czf $out/$d.tgz -C $R $d && touch $R/$d.collected; done
    tar czf $out/logs.tgz -C $R --exclude=b7 --exclude=b13 --exclude=prep --exclude='*.gguf' --exclude=hf . 2>/dev/null
    [ -f $R/diag/diag.txt ] && grep -E ": ok|FAILED|^#[0-5] |throw|TORCH_CHECK" $R/diag/diag.txt; cat $R/machine.txt
    tail -3 $R/gpu_tests.log $R/gguf_tests.log 2>/dev/null
    for d in b7 b13; do [ -f $R/$d/console.log ] && tail -40 $R/$d/console.log; done
    ;;
*)
    echo "usage: $0 start [chain|fresh] | chain | fresh | collect STAGE MAX_WAIT_S" >&2; exit 2 ;;
esac
