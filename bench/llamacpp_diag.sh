#!/usr/bin/env bash
# Why does llama.cpp segfault on the GPU machine? Run there after `bash bench/build_llamacpp_device.sh install`
# (and `python3 setup.py build_ext --inplace` for the extension probe):
#
#   bash bench/llamacpp_diag.sh OUTDIR [BIG_GGUF]
#
# History: every llama.cpp load segfaulted in the third H100 run of 2026-11-23 (the bench's child process,
# which imports no torch but is the child of a process holding a CUDA context; and pytest's in-process test
# on a tiny f32 GGUF), and in the second run inside the bench process; a fresh process after the bench
# had finished loaded the same GGUF. This extension's own binding also segfaulted whenever a TORCH_CHECK
# threw inside it. So this script separates three suspects:
#   1. C++ exceptions: does a throw/catch in code compiled on this machine work, in a plain executable and
#      in python3 after importing numpy / torch (CUDA initialised) / numba / llama_cpp? does a TORCH_CHECK
#      thrown in this project's extension reach Python as an exception?
#   2. the process: a tiny GGUF loaded with a clean environment, the inherited one, torch imported first,
#      torch's CUDA context in the same process, a sibling process holding a CUDA context, and the bench's
#      own child (bench/llamacpp_child.py) started from a parent that holds one;
#   3. the model: the same on BIG_GGUF (the bench's 7B export), if given.
# The first case that fails is run again under cuda-gdb (the image has no gdb) for a native backtrace.
# Outcome (H100 machine, 2026-11-23; bench/results/README.md): suspect 1 cleared; a model load
# segfaults in llama_model::print_info in any process that imported torch, fresh processes are fine.
# (The two torch+CUDA probes of section 1 printed a SyntaxError on those runs, a quoting bug fixed since.)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
D=${1:?usage: llamacpp_diag.sh OUTDIR [BIG_GGUF]}
BIG=${2:-}
mkdir -p "$D"
REPO=$PWD
CLEAN=(env -i PATH="$PATH" HOME="${HOME:-/root}" PYTHONPATH="$REPO")

echo "## machine and toolchain"
uname -r; g++ --version | head -1; nvcc --version | tail -1; ldd --version | head -1
python3 -c "import sys, numpy, torch; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__)"
env | grep -E '^(LD_|CUDA|GLIBC|OMP|GOMP|KMP|NVIDIA|PYTHON|MALLOC)' | sort
LIB=$(python3 -c "import importlib.util, os; s = importlib.util.find_spec('llama_cpp'); print(os.path.join(os.path.dirname(s.origin), 'lib') if s else '')")
echo "llama_cpp lib: $LIB"; ls "$LIB" 2>/dev/null | tr '\n' ' '; echo
for so in libllama.so libggml-base.so libggml-cuda.so libggml-cpu.so; do
    [ -f "$LIB/$so" ] && { echo "ldd $so:"; ldd "$LIB/$so" | grep -E "stdc|gcc_s|cublas|cudart|gomp|cuda\.so|not found" | sed 's/^/   /'; }
done

echo "## 1. C++ throw/catch"
cat > "$D/probe.cpp" <<'EOF'
#include <cstdio>
#include <stdexcept>
extern "C" int probe_throw(void) {
    try { throw std::runtime_error("probe"); }
    catch (const std::exception &) { return 1; }
    return 0;
}
#ifdef PROBE_MAIN
int main() { std::printf("executable: throw/catch %s\n", probe_throw() == 1 ? "ok" : "WRONG"); return 0; }
#endif
EOF
g++ -O2 -fPIC -shared "$D/probe.cpp" -o "$D/libprobe.so" && g++ -O2 -DPROBE_MAIN "$D/probe.cpp" -o "$D/probe_exe"
"$D/probe_exe"; echo "   rc=$?"
for pre in "pass" "import numpy" "import torch" "import torch; torch.zeros(1, device='cuda')" "import numba" \
           "import llama_cpp" "import torch; torch.zeros(1, device='cuda'); import llama_cpp"; do
    python3 -X faulthandler -c "$pre
import ctypes, sys; print('python after [' + sys.argv[1] + ']: throw/catch', 'ok' if ctypes.CDLL(sys.argv[2]).probe_throw() == 1 else 'WRONG')" \
        "$pre" "$D/libprobe.so" > "$D/probe_py.log" 2>&1
    rc=$?; tail -1 "$D/probe_py.log"; [ $rc -ne 0 ] && { echo "   rc=$rc"; grep -m3 -E "Fatal|fault" "$D/probe_py.log"; }
done
python3 -c "
import torch
try:
    torch.empty(2).view(3)
except RuntimeError:
    print('torch: its own TORCH_CHECK (c10::Error) reached Python: ok')"; echo "   rc=$?"
python3 -X faulthandler -c "
import torch
from hybrid_runtime import _sparse_ffn_cuda as ext
s = torch.zeros(1, 8)                    # a CPU tensor: the binding's first TORCH_CHECK_VALUE throws
idx = torch.zeros(8, dtype=torch.int32, device='cuda'); cnt = torch.zeros(1, dtype=torch.int32, device='cuda')
try:
    ext.active_indices(s, 0.0, False, False, idx, cnt)
except Exception as e:
    print('extension: TORCH_CHECK in the binding reached Python as', type(e).__name__, ': ok')" > "$D/ext_probe.log" 2>&1
rc=$?; tail -1 "$D/ext_probe.log"; [ $rc -ne 0 ] && echo "   rc=$rc (extension probe)"

echo "## 2. llama.cpp, tiny GGUF"
python3 - "$D" > "$D/make.log" 2>&1 <<'PY'
import sys, torch, transformers
sys.path.insert(0, '.')
from bench.gguf_export import export_gguf
d = sys.argv[1]
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, hidden_act="silu")
transformers.LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(f'{d}/hf')
for dt in ("f16", "f32"):
    export_gguf(f'{d}/hf', f'{d}/m-{dt}.gguf', dtype=dt)
print("tiny GGUFs written")
PY
tail -1 "$D/make.log"
LOAD='import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_gpu_layers=int(sys.argv[2]), n_ctx=64, verbose=True)
llm.eval([1, 2, 3]); print("LOADED-OK")'
TORCH_CUDA="import torch; torch.zeros(1, device='cuda'); "
declare -A FAILCMD=()
case_() {   # NAME GGUF NGL [command prefix...] -- [python code run before the load]
    local name=$1 gguf=$2 ngl=$3; shift 3
    local pre=() code_pre=""
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do pre+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    code_pre=${1:-}
    local cmd=("${pre[@]}" python3 -X faulthandler -c "$code_pre$LOAD" "$gguf" "$ngl")
    timeout 300 "${cmd[@]}" > "$D/$name.log" 2>&1
    local rc=$?
    if grep -q LOADED-OK "$D/$name.log"; then echo "$name: ok"; else
        echo "$name: FAILED rc=$rc; last lines:"; grep -v "^llama_model_loader: - " "$D/$name.log" | tail -4 | sed 's/^/   /'
        FAILCMD[$name]=$(printf '%q ' "${cmd[@]}")
    fi
}
case_ clean_f16_ngl0 "$D/m-f16.gguf" 0 "${CLEAN[@]}" --
case_ clean_f16_ngl99 "$D/m-f16.gguf" 99 "${CLEAN[@]}" --
case_ clean_f32_ngl0 "$D/m-f32.gguf" 0 "${CLEAN[@]}" --
case_ inherited_f16_ngl99 "$D/m-f16.gguf" 99 env --
case_ torch_imported_f16_ngl99 "$D/m-f16.gguf" 99 "${CLEAN[@]}" -- "import torch; "
case_ torch_cuda_f16_ngl99 "$D/m-f16.gguf" 99 "${CLEAN[@]}" -- "$TORCH_CUDA"
case_ torch_cuda_f32_ngl0 "$D/m-f32.gguf" 0 "${CLEAN[@]}" -- "$TORCH_CUDA"
python3 -c "import torch, time; x = torch.empty(2**30, device='cuda'); print('sibling holds a CUDA context', flush=True); time.sleep(600)" \
    > "$D/sibling.log" 2>&1 &
SIB=$!; for _ in $(seq 60); do grep -q sibling "$D/sibling.log" && break; sleep 0.5; done
case_ sibling_cuda_f16_ngl99 "$D/m-f16.gguf" 99 "${CLEAN[@]}" --
kill $SIB 2>/dev/null; wait $SIB 2>/dev/null

child_case() {   # NAME GGUF NGL ENV(inherit|clean): bench/llamacpp_child.py started from a parent with a CUDA context
    python3 - "$2" "$3" "$4" > "$D/$1.log" 2>&1 <<'PY'
import json, os, subprocess, sys
import torch
torch.zeros(1, device="cuda")                          # the parent holds a CUDA context, as the bench does
gguf, ngl, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
env = dict(os.environ) if how == "inherit" else {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
env["PYTHONPATH"] = os.getcwd()
reqs = [{"gguf": gguf, "n_gpu_layers": ngl, "n_ctx": 128, "threads": 8, "flash_attn": True,
         "require_gpu_offload": True, "measure_gpu": True}, {"prompt": [1, 2, 3, 4], "n_new": 4}]
p = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "bench.llamacpp_child"], env=env, text=True,
                   input="".join(json.dumps(r) + "\n" for r in reqs), capture_output=True, timeout=280)
print(p.stderr[-3000:]); print(p.stdout)
print("CHILD-RC", p.returncode)
print("LOADED-OK" if p.returncode == 0 and '"runs"' in p.stdout else "CHILD-FAILED")
PY
    if grep -q LOADED-OK "$D/$1.log"; then echo "$1: ok"; else
        echo "$1: FAILED"; grep -E "CHILD-RC|Fatal|error" "$D/$1.log" | tail -3 | sed 's/^/   /'; fi
}
child_case child_of_torch_inherit_f16 "$D/m-f16.gguf" 99 inherit
child_case child_of_torch_clean_f16 "$D/m-f16.gguf" 99 clean

if [ -n "$BIG" ] && [ -f "$BIG" ]; then
    echo "## 3. llama.cpp, $BIG"
    case_ big_clean_ngl99 "$BIG" 99 "${CLEAN[@]}" --
    child_case big_child_of_torch_inherit "$BIG" 99 inherit
    child_case big_child_of_torch_clean "$BIG" 99 clean
fi

echo "## native backtraces of the failed cases (cuda-gdb)"
n=0
for name in "${!FAILCMD[@]}"; do
    n=$((n + 1)); [ $n -gt 1 ] && break
    cmd=${FAILCMD[$name]}
    echo "--- $name: ${cmd:0:300}"
    eval "timeout 240 cuda-gdb -q -batch -ex 'set pagination off' -ex 'set confirm off' -ex run -ex bt \
        -ex 'info sharedlibrary' --args $cmd" > "$D/$name.gdb.txt" 2>&1
    grep -E "^#[0-9]+|signal|SIGSEGV" "$D/$name.gdb.txt" | head -30
    grep -E "libstdc|libgcc_s|libgomp|libcublas|libcudart|libllama|libggml" "$D/$name.gdb.txt" | head -12
done
echo "## done"
