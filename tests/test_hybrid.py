"""Hybrid runtime on the CPU: exact mode and oracle-predictor mode equal the dense engine."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hybrid_runtime.activations import Activation
from hybrid_runtime.errors import UserError
from hybrid_runtime.hybrid import PredictedHybridFFN, build_hybrid_model
from hybrid_runtime.hybrid_format import pack_hybrid_model
from hybrid_runtime.loading import load_model
from hybrid_runtime.model_dir import open_model_dir, read_hybrid_meta

F_DIM = 160


def run_tokens(model, ids, prompt_len=6):
    model.setup_cache(1, 64)
    out = [model(ids[:, :prompt_len], torch.arange(prompt_len, device=ids.device))[0]]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], torch.tensor([t], device=ids.device))[0])
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
    stored = open_model_dir(hyb).hybrid.frequencies()
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
        mask = Activation(self.act, self.act_threshold).active(x @ self.gate.T, x @ self.up.T)
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
                                       ffn.cold.cold if ffn.cold else None, Activation("relu"), ffn.staging,
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
    (bad / "hybrid.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model.safetensors: missing"):
        read_hybrid_meta(bad)
    shutil.copy(hyb / "model.safetensors", bad / "model.safetensors")
    shutil.copy(hyb / "neuron_stats.safetensors", bad / "neuron_stats.safetensors")
    (bad / "hybrid.json").write_text(json.dumps({**meta, "predictors": "predictors.safetensors"}))
    with pytest.raises(UserError, match="predictors.safetensors: missing"):
        read_hybrid_meta(bad)


def test_metadata_file_names_stay_inside_the_model_directory(packed, tmp_path):
    """A model directory is untrusted: names in hybrid.json must not reach outside it."""
    _, hyb, _ = packed
    bad = tmp_path / "bad"
    shutil.copytree(hyb, bad)
    meta = json.loads((bad / "hybrid.json").read_text())
    for field, name in (("weights", "../model.safetensors"), ("weights", str(hyb / "model.safetensors")),
                        ("predictors", "../../etc/passwd"), ("weights", 7)):
        (bad / "hybrid.json").write_text(json.dumps({**meta, field: name}))
        with pytest.raises(UserError, match=f"'{field}'"):
            open_model_dir(bad)
    (bad / "hybrid.json").write_text(json.dumps(meta))
    (bad / "link.safetensors").symlink_to(hyb / "model.safetensors")
    (bad / "hybrid.json").write_text(json.dumps({**meta, "weights": "link.safetensors"}))
    with pytest.raises(UserError, match="outside the model directory"):
        open_model_dir(bad)


def test_graphed_hybrid_step_refuses_a_dense_model(packed):
    """The per-layer CUDA-graph step (GPU-tested in test_gpu_runtime.py) only takes hybrid FFNs."""
    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep
    src, _, _ = packed
    with pytest.raises(TypeError, match="HybridFFN"):
        HybridGraphedDecodeStep(load_model(src, dtype=torch.float32), torch.device("cpu"), warmup_pos=0)


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, np.ndarray):
        dst[...] = src
    elif isinstance(dst, (tuple, list)):
        for a, b in zip(dst, src):
            _copy_into(a, b)


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: capture runs fn once; replay runs fn again and copies its
    results into the first run's outputs, which is what a real replay leaves in its static outputs."""

    def __init__(self, fn):
        with torch.inference_mode():
            self.fn, self.out = fn, fn()

    def replay(self) -> None:
        with torch.inference_mode():
            _copy_into(self.out, self.fn())


@pytest.mark.parametrize("mode", ["exact", "predictor"])
def test_graphed_step_replays_the_models_own_forward(packed, mode, monkeypatch, tmp_path):
    """HybridGraphedDecodeStep captures the model's methods (embed, attend + prepare, hot_ffn,
    add_branch(merge), head) around the host's cold_ffn: replayed eagerly on the CPU, it gives the
    same logits as Transformer.forward, token after token (the real graphs: test_gpu_runtime.py)."""
    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep
    from hybrid_runtime.predictor import LayerPredictor, PredictorSet
    src, hyb, _ = packed
    if mode == "predictor":
        torch.manual_seed(1)
        preds = PredictorSet([LayerPredictor(64, F_DIM, 16, threshold=0.0) for _ in range(2)], input_kind="ffn_norm")
        rng = np.random.default_rng(0)
        hyb = pack_hybrid_model(src, tmp_path / "pred", [rng.random(F_DIM) for _ in range(2)], predictors=preds)
    monkeypatch.setattr(HybridGraphedDecodeStep, "_capture", lambda self, fn: (g := _EagerGraph(fn), g.out))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    ids = torch.randint(3, 262, (1, 14), generator=torch.Generator().manual_seed(4))
    logits = {}
    for graphed in (False, True):
        model = build_hybrid_model(hyb, [50, 0], torch.device("cpu"), dtype=torch.float32, mode=mode)
        model.setup_cache(1, 64)
        step = HybridGraphedDecodeStep(model, torch.device("cpu"), warmup_pos=63) if graphed else model
        with torch.inference_mode():
            out = [model(ids[:, :6], torch.arange(6))[0, -1:].clone()]
            for t in range(6, ids.shape[1]):
                out.append(step(ids[:, t:t + 1], torch.tensor([t]))[0].clone())
        logits[graphed] = torch.cat(out)
    torch.testing.assert_close(logits[True], logits[False], atol=0, rtol=0)


@pytest.fixture(scope="module")
def packed_fp16(tmp_path_factory):
    """A float16 ReLU checkpoint packed with random frequencies (no predictors: --exact)."""
    from hybrid_runtime.tiny import build_tiny_model, write_random_checkpoint
    root = tmp_path_factory.mktemp("fp16")
    src = build_tiny_model(root / "src", seed=3, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=F_DIM)
    cfg = json.loads((src / "config.json").read_text())
    write_random_checkpoint(src, {**cfg, "torch_dtype": "float16"}, seed=3, dtype=torch.float16)
    rng = np.random.default_rng(1)
    pack_hybrid_model(src, root / "hyb", [rng.random(F_DIM) for _ in range(2)])
    return src, root / "hyb"


def test_float16_checkpoint_keeps_its_dtype_on_each_side(packed_fp16):
    """The run dtype is the checkpoint's except for what runs on the CPU: a float16 checkpoint's cold
    rows are its own fp16 bits (no bfloat16 round trip), hot rows keep float16 when asked for the
    checkpoint's dtype, and the session says which dtype each side uses."""
    from hybrid_runtime.cpu_ffn import FMT_FP16
    from hybrid_runtime.session import open_model
    src, hyb = packed_fp16
    md = open_model_dir(hyb)
    assert md.dtype == torch.float16 and md.hybrid.stored_dtype == "float16"
    stored = load_model(hyb, dtype=torch.float16)            # the packed rows, bit for bit
    k = [40, 0]
    # dtype None: the checkpoint's (what the GPU runs); built on the CPU here, the dtypes are the same
    model = build_hybrid_model(hyb, k, torch.device("cpu"), mode="exact", cold_format="fp16")
    for i, layer in enumerate(model.layers):
        ffn, ref = layer.ffn, stored.layers[i].ffn
        assert ffn.hot_gate.dtype == torch.float16 and layer.attn.wqkv.weight.dtype == torch.float16
        assert torch.equal(ffn.hot_gate, ref.gate[:k[i]])
        cold = ffn.cold.cold
        assert cold.fmt_code == FMT_FP16
        for part, rows in (("gate", cold.gate), ("up", cold.up), ("down", cold.down)):
            want = getattr(ref, part)[k[i]:].contiguous().view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(rows, want)
    # the CPU session: float32 for attention and hot rows, cold rows fp16, and it says so
    lm = open_model(str(hyb), device="cpu", mode="exact")
    assert lm.dtype == torch.float32 and lm.model.layers[0].ffn.cold.cold.fmt == "fp16"
    assert lm.dtypes == ("dtype: float32 on cpu (attention, predictors, hot rows); cold rows fp16 on the CPU "
                         "(stored float16)")
    dense = open_model(str(src), device="cpu")               # dense on the CPU: float16 runs as bfloat16
    assert dense.dtype == torch.bfloat16 and dense.dtypes == "dtype: bfloat16 on cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_hybrid_exact_on_cuda_equals_dense_float16(packed_fp16):
    """Hybrid --exact of a float16 checkpoint on CUDA runs float16 on the GPU and equals dense float16 on
    CUDA to the tolerance of one fp16 kernel (the cold half accumulates in fp32 on the CPU)."""
    src, hyb = packed_fp16
    ids = torch.randint(3, 262, (1, 16), generator=torch.Generator().manual_seed(5)).cuda()
    dense = load_model(src, device="cuda")
    assert dense.tok_embeddings.weight.dtype == torch.float16
    model = build_hybrid_model(hyb, [40, 0], torch.device("cuda"), mode="exact", cold_format="fp16")
    assert model.layers[0].ffn.hot_gate.dtype == torch.float16
    ref = run_tokens(dense, ids, prompt_len=6).float()
    got = run_tokens(model, ids, prompt_len=6).float()
    assert ((got - ref).norm() / ref.norm()).item() < 5e-3


@pytest.fixture(scope="module")
def packed_silu_cett(tmp_path_factory):
    """A bfloat16 SiLU model profiled by magnitude (CETT 0.2), with random predictors, packed."""
    from convert.profile import ProfileConfig, run_profile
    from hybrid_runtime.tiny import build_tiny_model
    from hybrid_runtime.predictor import LayerPredictor, PredictorSet
    from textgen import make_text
    root = tmp_path_factory.mktemp("silu")
    from hybrid_runtime.tiny import write_random_checkpoint
    src = build_tiny_model(root / "src", seed=5, act="silu", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_dim=F_DIM)
    # bfloat16 weights: the packed (rescaled) rows are bf16 too, so bf16 cold rows hold them exactly
    write_random_checkpoint(src, json.loads((src / "config.json").read_text()), seed=5, dtype=torch.bfloat16)
    (root / "data.txt").write_text(make_text(300, seed=2))
    prof = run_profile(str(src), [str(root / "data.txt")], str(root / "prof"),
                       ProfileConfig(tokens=1024, block_len=64, batch_size=4, samples_per_layer=64, chunk_rows=32,
                                     cett=0.2, cett_tokens=512, progress=False))
    torch.manual_seed(3)
    preds = PredictorSet([LayerPredictor(64, F_DIM, 16, threshold=-0.2) for _ in range(2)], input_kind="ffn_norm")
    from safetensors.numpy import load_file
    freqs = load_file(str(root / "prof" / "frequencies.safetensors"))["frequency"]
    pack_hybrid_model(src, root / "hyb", [freqs[i] for i in range(2)], predictors=preds,
                      calibration={"activity": prof["activity"]})
    return src, root / "hyb", prof


def test_magnitude_sparse_model_packs_an_equivalent_model(packed_silu_cett):
    """hybrid.json records the CETT cuts; the rows are rescaled (up * ||down||, down / ||down||) and the
    dense model is the same function (up to one more bf16 rounding of the rescaled rows)."""
    src, hyb, prof = packed_silu_cett
    meta = json.loads((hyb / "hybrid.json").read_text())
    assert meta["activity"]["kind"] == "magnitude" and meta["activity"]["cett"] == 0.2
    assert meta["activity"]["thresholds"] == pytest.approx(prof["activity"]["magnitude_thresholds"])
    ids = torch.randint(3, 262, (1, 10), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(run_tokens(load_model(hyb, dtype=torch.float32), ids),
                               run_tokens(load_model(src, dtype=torch.float32), ids), atol=2e-2, rtol=0)
    acts = open_model_dir(hyb).hybrid.layer_activations(Activation("silu"))
    assert [a.eps for a in acts] == meta["activity"]["thresholds"] and all(a.has_exact_zeros for a in acts)


@pytest.mark.parametrize("mode", ["exact", "predictor"])
def test_magnitude_hybrid_decode_equals_the_reference_ffn(packed_silu_cett, mode):
    """The hybrid modes of a CETT-sparse SiLU model (hot rows in torch, cold rows in the Numba kernel's
    magnitude mode) decode token by token exactly what ReferenceFFN computes with dense ops."""
    from hybrid_runtime.hybrid import ReferenceFFN
    from hybrid_runtime.predictor import PredictorSet
    _, hyb, _ = packed_silu_cett
    md = open_model_dir(hyb)
    acts = md.hybrid.layer_activations(md.config.activation)
    ref = load_model(hyb, dtype=torch.float32)
    preds = PredictorSet.load(md.hybrid.predictors_file) if mode == "predictor" else None
    for i, layer in enumerate(ref.layers):
        layer.ffn = ReferenceFFN(layer.ffn, acts[i], mode, preds.layers[i] if preds else None)
    model = build_hybrid_model(hyb, [50, 0], torch.device("cpu"), dtype=torch.float32, mode=mode)
    ids = torch.randint(3, 262, (1, 16), generator=torch.Generator().manual_seed(7))
    got, want = run_tokens(model, ids, prompt_len=1), run_tokens(ref, ids, prompt_len=1)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    counts = torch.stack([layer.ffn.counts for layer in ref.layers])            # the cut made it sparse
    assert (counts[:, 1] < 0.9 * counts[:, 0] * F_DIM).all()
    dense = run_tokens(load_model(hyb, dtype=torch.float32), ids, prompt_len=1)
    assert not torch.allclose(got, dense, atol=1e-3)                            # ... and it is not dense


def test_cett_on_a_relu_model_is_refused_with_why(packed, tmp_path):
    from convert.profile import ProfileConfig, run_profile
    src, _, _ = packed
    (tmp_path / "d.txt").write_text("some text " * 200)
    with pytest.raises(UserError, match="exact zeros already: drop --cett"):
        run_profile(str(src), [str(tmp_path / "d.txt")], str(tmp_path / "p"), ProfileConfig(cett=0.2, block_len=32))
