#!/usr/bin/env bash
# llama.cpp segfault diagnosis on the GPU machine (after `bash bench/build_llamacpp_device.sh install`):
# a tiny GGUF loaded in fresh processes: clean env, inherited env, torch imported first, f16 / f32, n_gpu_layers 0 / 99.
# Written 2026-11-23 after every llama.cpp load segfaulted on that session's build; not run yet.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
D=/tmp/lldiag; mkdir -p $D
python3 - <<'PY' > $D/make.log 2>&1
import torch, transformers, sys
sys.path.insert(0, '.')
from bench.gguf_export import export_gguf
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, hidden_act="silu")
m = transformers.LlamaForCausalLM(cfg).to(torch.float16)
m.save_pretrained('/tmp/lldiag/hf')
for dt in ("f16", "f32"):
    export_gguf('/tmp/lldiag/hf', f'/tmp/lldiag/m-{dt}.gguf', dtype=dt)
print("ok")
PY
tail -2 $D/make.log
LOAD='import sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_gpu_layers=int(sys.argv[2]), n_ctx=64, verbose=True); llm.eval([1,2,3]); print("LOADED-OK")'
run() { name=$1; shift; "$@" > $D/$name.log 2>&1; rc=$?; echo "== $name rc=$rc"; grep -E "LOADED-OK|error|Error|fault|Segment" $D/$name.log | head -3; tail -4 $D/$name.log; }
run clean_f16_ngl0 env -i PATH=$PATH HOME=/root python3 -X faulthandler -c "$LOAD" $D/m-f16.gguf 0
run clean_f16_ngl99 env -i PATH=$PATH HOME=/root python3 -X faulthandler -c "$LOAD" $D/m-f16.gguf 99
run clean_f32_ngl0 env -i PATH=$PATH HOME=/root python3 -X faulthandler -c "$LOAD" $D/m-f32.gguf 0
run inherit_f16_ngl99 python3 -X faulthandler -c "$LOAD" $D/m-f16.gguf 99
run torchfirst_f16_ngl99 env -i PATH=$PATH HOME=/root python3 -X faulthandler -c "import torch; $LOAD" $D/m-f16.gguf 99
env | sort | grep -v -E "^(LS_COLORS)=" > $D/env.txt
python3 -c "import llama_cpp, os; p=os.path.dirname(llama_cpp.__file__); print(p); print(os.listdir(os.path.join(p,'lib')))"
ldd $(python3 -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__),'lib','libggml-cuda.so'))") | grep -E "cublas|cudart|gomp|not found"
