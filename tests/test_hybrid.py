"""Hybrid runtime on the CPU: exact mode and oracle-predictor mode equal the dense engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybrid_runtime.errors import UserError
from hybrid_runtime.hybrid import PredictedHybridFFN, build_hybrid_model
from hybrid_runtime.hybrid_format import pack_hybrid_model, read_hybrid_meta
from hybrid_runtime.loading import load_model
from hybrid_runtime.model import active_mask

F_DIM = 160


def run_tokens(model, ids, prompt_len=6):
    model.setup_cache(1, 64)
    out = [model(ids[:, :prompt_len], torch.arange(prompt_len))[0]]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], torch.tensor([t]))[0])
    return torch.cat(out)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A bf16 ReLU checkpoint (so bf16 cold rows are lossless) packed with random frequencies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_runtime.tiny import build_byte_tokenizer
    root = tmp_path_factory.mktemp("hyb")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=F_DIM, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=262, hidden_act="relu", bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "src")
    build_byte_tokenizer(root / "src")
    rng = np.random.default_rng(0)
    freqs = [rng.random(F_DIM) for _ in range(2)]
    pack_hybrid_model(root / "src", root / "hyb", freqs)
    return root / "src", root / "hyb", freqs


def test_pack_permutes_rows_most_frequent_first(packed):
    src, hyb, freqs = packed
    dense = load_model(src, dtype=torch.float32)
    native = load_model(hyb, dtype=torch.float32)
    stored = read_hybrid_meta(hyb).frequencies()
    for i in range(2):
        assert np.all(np.diff(stored[i]) <= 0)
        order = np.argsort(-freqs[i], kind="stable")
        for part in ("gate", "up", "down"):
            torch.testing.assert_close(getattr(native.layers[i].ffn, part), getattr(dense.layers[i].ffn, part)[order])
    meta = json.loads((hyb / "hybrid.json").read_text())
    assert meta["format"] == "hybrid-runtime-model" and meta["version"] == 1 and meta["activation"] == "relu"


@pytest.mark.parametrize("hot_fraction", [0.0, 0.37, 1.0])
def test_exact_mode_equals_dense(packed, hot_fraction):
    src, hyb, _ = packed
    ids = torch.randint(3, 262, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = run_tokens(load_model(src, dtype=torch.float32), ids)
    k = int(F_DIM * hot_fraction)
    model = build_hybrid_model(hyb, [k, F_DIM - k], torch.device("cpu"), dtype=torch.float32,
                               mode="exact", cold_format="bf16")
    torch.testing.assert_close(run_tokens(model, ids), ref, atol=1e-4, rtol=0)


class OraclePredictor(torch.nn.Module):
    """Predicts exactly the truly active neurons (from the layer's own full weights)."""

    threshold = 0.0  # logits are +1 for active neurons, -1 otherwise

    def __init__(self, gate, up, act, act_threshold):
        super().__init__()
        self.gate, self.up, self.act, self.act_threshold = gate, up, act, act_threshold

    def forward(self, x):
        mask = active_mask(x @ self.gate.T, x @ self.up.T, self.act, self.act_threshold)
        return mask.float() * 2 - 1


def test_oracle_predictor_equals_dense(packed):
    src, hyb, _ = packed
    ids = torch.randint(3, 262, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = run_tokens(load_model(src, dtype=torch.float32), ids)
    full = load_model(hyb, dtype=torch.float32)
    model = build_hybrid_model(hyb, [50, 0], torch.device("cpu"), dtype=torch.float32, mode="exact")
    for i, layer in enumerate(model.layers):
        ffn, k = layer.ffn, [50, 0][i]
        oracle = OraclePredictor(full.layers[i].ffn.gate, full.layers[i].ffn.up, "relu", 0.0)
        layer.ffn = PredictedHybridFFN(ffn.norm, ffn.hot_gate.data, ffn.hot_up.data, ffn.hot_down.data,
                                       ffn.cold.cold if ffn.cold else None, "relu", 0.0, ffn.staging,
                                       predictor=oracle, predictor_reads_residual=False, n_hot=k)
    torch.testing.assert_close(run_tokens(model, ids), ref, atol=1e-4, rtol=0)


def test_missing_predictors_and_unknown_version(packed, tmp_path):
    _, hyb, _ = packed
    with pytest.raises(UserError, match="no predictors"):
        build_hybrid_model(hyb, [0, 0], torch.device("cpu"), mode="predictor")
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((hyb / "hybrid.json").read_text())
    (bad / "hybrid.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        read_hybrid_meta(bad)
    (bad / "hybrid.json").write_text(json.dumps({**meta, "predictors": "predictors.safetensors"}))
    with pytest.raises(UserError, match="predictors.safetensors: missing"):
        read_hybrid_meta(bad)


def test_graphed_hybrid_step_refuses_a_dense_model(packed):
    """The per-layer CUDA-graph step (GPU-tested in test_gpu_runtime.py) only takes hybrid FFNs."""
    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep
    src, _, _ = packed
    with pytest.raises(TypeError, match="HybridFFN"):
        HybridGraphedDecodeStep(load_model(src, dtype=torch.float32), torch.device("cpu"), warmup_pos=0)
