"""GPU runtime checks (skipped without CUDA; run on the GPU machine, results in bench/results/).

The dense engine on the GPU against the CPU fp32 reference, CUDA-graph decode against eager
decode, the hybrid --exact mode against dense, and the fully-on-GPU sparse mode under a graph.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

F_DIM = 1024


@pytest.fixture(scope="module")
def hybrid_model(tmp_path_factory):
    """A bf16 ReLU model (d=256, f=1024) packed with random frequencies and an oracle-free predictor set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_runtime.hybrid_format import pack_hybrid_model
    from hybrid_runtime.tiny import build_byte_tokenizer
    from hybrid_runtime.predictor import LayerPredictor, PredictorSet
    root = tmp_path_factory.mktemp("gpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=F_DIM, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=262, hidden_act="relu", bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "src")
    build_byte_tokenizer(root / "src")
    rng = np.random.default_rng(0)
    preds = PredictorSet([LayerPredictor(256, F_DIM, 32, threshold=0.0) for _ in range(3)], input_kind="ffn_norm")
    pack_hybrid_model(root / "src", root / "hyb", [rng.random(F_DIM) for _ in range(3)], predictors=preds)
    return root / "src", root / "hyb"


def _logits(model, ids, step=None, prompt_len=8):
    if step is None:  # a graphed step was captured on the current cache: keep it
        model.setup_cache(1, 64)
    step = step or model
    out = [model(ids[:, :prompt_len], torch.arange(prompt_len, device=ids.device))[0, -1:].clone()]
    for t in range(prompt_len, ids.shape[1]):
        out.append(step(ids[:, t:t + 1], torch.tensor([t], device=ids.device))[0].clone())
    return torch.cat(out).float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_dense_gpu_matches_cpu_fp32(hybrid_model):
    from hybrid_runtime.loading import load_model
    src, _ = hybrid_model
    ids = torch.randint(3, 262, (1, 24))
    ref = _logits(load_model(src, dtype=torch.float32), ids)
    gpu = _logits(load_model(src, device="cuda", dtype=torch.float32), ids.cuda()).cpu()
    assert _rel(gpu, ref) < 1e-3  # tf32-level
    gpu16 = _logits(load_model(src, device="cuda", dtype=torch.bfloat16), ids.cuda()).cpu()
    assert _rel(gpu16, ref) < 3e-2


def test_cuda_graph_decode_equals_eager(hybrid_model):
    from hybrid_runtime.cuda_graph import GraphedDecodeStep
    from hybrid_runtime.loading import load_model
    src, _ = hybrid_model
    model = load_model(src, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 262, (1, 24), device="cuda")
    eager = _logits(model, ids)
    model.setup_cache(1, 64)
    step = GraphedDecodeStep(model, torch.device("cuda"), warmup_pos=63)
    graphed = _logits(model, ids, step=step)
    assert _rel(graphed, eager) < 1e-3


@pytest.mark.parametrize("hot_fraction", [0.0, 0.375, 1.0])
def test_hybrid_exact_on_gpu_equals_dense(hybrid_model, hot_fraction):
    from hybrid_runtime.hybrid import build_hybrid_model
    from hybrid_runtime.loading import load_model
    src, hyb = hybrid_model
    ids = torch.randint(3, 262, (1, 24), device="cuda")
    ref = _logits(load_model(src, device="cuda", dtype=torch.float32), ids)
    k = int(F_DIM * hot_fraction)
    model = build_hybrid_model(hyb, [k] * 3, torch.device("cuda"), dtype=torch.bfloat16, mode="exact")
    assert _rel(_logits(model, ids), ref) < 3e-2


def test_full_gpu_sparse_mode_under_cuda_graph(hybrid_model):
    from hybrid_runtime.cuda_graph import GraphedDecodeStep
    from hybrid_runtime.hybrid import build_hybrid_model
    _, hyb = hybrid_model
    model = build_hybrid_model(hyb, [F_DIM] * 3, torch.device("cuda"), dtype=torch.bfloat16, mode="predictor")
    ids = torch.randint(3, 262, (1, 24), device="cuda")
    eager = _logits(model, ids)
    model.setup_cache(1, 64)
    graphed = _logits(model, ids, step=GraphedDecodeStep(model, torch.device("cuda"), warmup_pos=63))
    assert _rel(graphed, eager) < 1e-3


def test_hybrid_predictor_mode_with_cold_rows_runs(hybrid_model):
    from hybrid_runtime.hybrid import build_hybrid_model
    _, hyb = hybrid_model
    model = build_hybrid_model(hyb, [256] * 3, torch.device("cuda"), dtype=torch.bfloat16, mode="predictor",
                               cold_format="int8")
    ids = torch.randint(3, 262, (1, 24), device="cuda")
    out = _logits(model, ids)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode,cold_format", [("exact", "bf16"), ("predictor", "bf16"), ("predictor", "int8")])
def test_hybrid_graphed_decode_equals_eager(hybrid_model, mode, cold_format):
    """Per-layer CUDA graphs around the CPU half compute the same step as the eager hybrid."""
    from hybrid_runtime.hybrid import build_hybrid_model
    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep
    _, hyb = hybrid_model
    model = build_hybrid_model(hyb, [256, 512, 0], torch.device("cuda"), dtype=torch.bfloat16, mode=mode,
                               cold_format=cold_format)
    ids = torch.randint(3, 262, (1, 24), device="cuda")
    eager = _logits(model, ids)
    model.setup_cache(1, 64)
    graphed = _logits(model, ids, step=HybridGraphedDecodeStep(model, torch.device("cuda"), warmup_pos=63))
    assert _rel(graphed, eager) < 1e-3
