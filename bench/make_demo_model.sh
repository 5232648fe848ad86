#!/usr/bin/env bash
# How the embedded demo model (models/demo/) was made, end to end. Run from the repository root:
#
#   bench/make_demo_model.sh gpu  CORPUS_DIR   # step 1, on a CUDA machine (H100: ~4.5 min)
#   bench/make_demo_model.sh cpu  CORPUS_DIR   # steps 2-5, on any machine (2 CPU cores: ~8 min)
#
# CORPUS_DIR holds the training text: shakespeare.txt, milton.txt, python_docs.txt (see the model
# card, models/demo/README.md, for their sources and licences). Every stage uses the train split
# (all but the last 5% of each file) and measures on the held-out split (that last 5%).
# Nothing is overwritten without being asked: the hybrid-convert steps get --force here on purpose
# (this script rebuilds the demo), the golden regeneration too.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:?usage: bench/make_demo_model.sh gpu|cpu CORPUS_DIR}
CORPUS=${2:?usage: bench/make_demo_model.sh gpu|cpu CORPUS_DIR}
FILES=("$CORPUS/shakespeare.txt" "$CORPUS/milton.txt" "$CORPUS/python_docs.txt")
SRC=.carry/demo_src                 # where the GPU stage leaves the fp16 candidates (git-ignored)
ABL=${ABL_OUT:-/tmp/abl}            # the ablation's own output directory
WORK=${DEMO_WORK:-/tmp/demo.work}   # profile + predictor intermediates (~100 MB of samples)

if [ "$STAGE" = gpu ]; then
  # 1. Byte-level BPE tokenizer (4096 tokens, `tokenizers`) and a 7.2M-parameter SwiGLU LLaMA
  #    (dim 256, 6 layers, 4 heads, FFN 768, context 512) trained from scratch: 2000 steps x 32 x 512
  #    tokens. Then the ProSparse conversion, 800 steps per variant from that model: ReLU, progressive
  #    L1 on the sine schedule of the 7B preset scaled to final lambda 1, 3, 10, then the FATReLU
  #    threshold search (largest t with held-out loss +0.01 nat at most), next to the ablation's
  #    baselines (SwiGLU continued, ReLU, fixed L1). Tables: ablation.md / ablation.json.
  python3 bench/prosparse_ablation.py --corpus "$CORPUS" --out "$ABL" --dim 256 --layers 6 --heads 4 \
      --kv-heads 4 --ffn 768 --vocab 4096 --block-len 512 --batch-size 32 --pretrain-steps 2000 \
      --convert-steps 800 --time-budget-s 430 --save-models --no-progress 2>&1 | tee /tmp/ablation.log
  R=bench/results/nvidia-h100-80gb-hbm3-$(date +%F)-prosparse-ablation
  cp "$ABL"/ablation.json $R.json; cp "$ABL"/ablation.md $R.md; cp /tmp/ablation.log $R.log
  # 1b. The ProSparse+FATReLU candidates, cast to fp16 (~14.4 MB each). The demo uses lambda -> 3,
  #     the smallest lambda with sparsity >= 85%.
  python3 - "$ABL" "$SRC" <<'EOF'
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
abl, src = Path(sys.argv[1]), Path(sys.argv[2])
for d in sorted(abl.glob("prosparse_fatrelu_*")):
    out = src / d.name
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(d / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())   # keeps hidden_act "fatrelu" + hidden_act_param
    cfg["dtype"] = cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (d / f).is_file():
            shutil.copy2(d / f, out / f)
    print(f"wrote {out}")
EOF
  exit 0
fi

[ "$STAGE" = cpu ] || { echo "error: stage must be gpu or cpu" >&2; exit 2; }
MODEL=$SRC/prosparse_fatrelu_3
DATA=(); for f in "${FILES[@]}"; do DATA+=(--data "$f"); done

# 2. The project's pipeline: profile 1M train-split tokens (neuron frequencies + 65536 (x, mask)
#    samples per layer), train one low-rank predictor per layer (recall target 0.95, ranks up to 10%
#    of the FFN's parameters), pack the hybrid model directory (neurons sorted by frequency).
#    The profile is made first, in float32: `all` has no --dtype, and by default the CPU runs a
#    float16 checkpoint as bfloat16 (the hybrid runtime computes in float32 on the CPU). `all`
#    then reuses it; the predictors directory is cleared so that they are trained on this profile.
#    --force on `all` replaces models/demo: the model card is kept aside and put back.
hybrid-convert profile --model "$MODEL" "${DATA[@]}" --tokens 1000000 --samples-per-layer 65536 \
    --block-len 512 --dtype float32 --device cpu --out "$WORK/profile" --force
rm -rf -- "$WORK/predictors"
CARD=$(mktemp); [ -f models/demo/README.md ] && cp models/demo/README.md "$CARD"
hybrid-convert all --model "$MODEL" "${DATA[@]}" --out models/demo --work-dir "$WORK" \
    --tokens 1000000 --samples-per-layer 65536 --block-len 512 --recall-target 0.95 --ranks auto \
    --max-epochs 50 --device cpu --force
[ -s "$CARD" ] && cp "$CARD" models/demo/README.md; rm -f "$CARD"
cp "$WORK/profile/profile.json" bench/results/cpu-$(date +%F)-demo-profile.json
cp "$WORK/predictors/predictor_metrics.json" bench/results/cpu-$(date +%F)-demo-predictor-metrics.json

# 3. Held-out perplexity and activation sparsity of the shipped model, on the CPU in float32
#    (the whole held-out split: 291,328 tokens in 512-token blocks).
hybrid-convert eval --model models/demo "${DATA[@]}" --split heldout --tokens 300000 --block-len 512 \
    --batch-size 8 --sparsity both --device cpu --dtype float32 --json bench/results/cpu-$(date +%F)-demo-eval.json --force

# 3b. Predictor recall / precision / density on held-out text (the trainer's own test split is
#     calibration text from the train split), with the runtime's float32 CPU arithmetic.
python3 - "${FILES[@]}" <<'EOF'
import json, sys, time, torch
from convert.data import load_token_blocks
from hybrid_runtime.loading import load_model, load_tokenizer
from hybrid_runtime.predictor import PredictorSet
torch.set_num_threads(2)
demo = "models/demo"
model = load_model(demo, dtype=torch.float32)
pset = PredictorSet.load(f"{demo}/predictors.safetensors")
assert pset.input_kind == "ffn_norm"
blocks = load_token_blocks(sys.argv[1:], load_tokenizer(demo), 512, "heldout", max_tokens=65536)
L, f = model.config.n_layers, model.config.ffn_dim
counts = torch.zeros(L, 3, dtype=torch.int64)  # tp, n_pred, n_true
def hook(i, ffn, args, out):
    x = ffn.norm(args[0])                                                     # (B, T, d)
    true = ffn.activation.active(x @ ffn.gate.T, x @ ffn.up.T)                # (B, T, f)
    pred = pset.predict_active(i, x)
    counts[i] += torch.stack([(pred & true).sum(), pred.sum(), true.sum()])
for i, layer in enumerate(model.layers):
    layer.ffn.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o))
model.setup_cache(8, 512)
with torch.inference_mode():
    for b in range(0, len(blocks), 8):
        model(blocks[b:b + 8], torch.arange(512))
n = blocks.numel()
layers = [{"layer": i, "recall": int(tp) / int(nt), "precision": int(tp) / int(npred),
           "pred_density": int(npred) / (n * f), "true_density": int(nt) / (n * f)}
          for i, (tp, npred, nt) in enumerate(counts)]
res = {"model": demo, "split": "heldout", "tokens": n, "dtype": "float32", "layers": layers}
open(time.strftime("bench/results/cpu-%Y-%m-%d-demo-predictor-heldout.json"), "w").write(json.dumps(res, indent=1) + "\n")
for r in layers:
    print(f"layer {r['layer']}: recall {r['recall']:.4f} precision {r['precision']:.4f} "
          f"predicted density {r['pred_density']:.4f} true density {r['true_density']:.4f}")
EOF

# 4. Predictor mode vs dense: greedy agreement over 8 prompts x 256 tokens (all modes in float32).
python3 bench/agreement.py --model models/demo --tokens 256 --device cpu --out bench/results/cpu-$(date +%F)-demo-agreement.json

# 5. The golden tokens of tests/test_demo_golden.py (dense, --exact, predictor; 1 thread).
python3 tests/golden/make_demo_golden.py --force
python3 -m pytest -q tests/test_demo_golden.py
du -sh models/demo
