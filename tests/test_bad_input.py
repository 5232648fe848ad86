"""Bad input over every command: one clear line on stderr, exit 2, no traceback, no input touched.

Each case runs a console entry point in this process exactly as the installed scripts do
(`console_main`), with placeholders for a tree of good inputs built once: a ReLU and a SiLU
checkpoint, a hybrid directory, a profile, calibration text, and broken copies of them. For every
case: exit code 2, stderr is a single line starting with "error:" and naming the problem, no
"Traceback", every input file unchanged (hashes before and after), and no output folder left behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_runtime.errors import OUTPUT_MARKER, console_main
from textgen import make_text


def run_cli(group, args: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    """Run a click group through console_main as `hybrid-run` / `hybrid-convert` do: (exit code, stdout, stderr)."""
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["prog", *args]
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    sys.stdout, sys.stderr = out, err
    try:
        console_main(group)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stdin, sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- inputs

def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


_DROP = object()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The input tree (read-only for every case) and the placeholder map."""
    from convert.profile import ProfileConfig, run_profile
    from hybrid_runtime.hybrid_format import pack_hybrid_model
    from hybrid_runtime.tiny import build_tiny_model
    from hybrid_runtime.predictor import LayerPredictor, PredictorSet
    root = tmp_path_factory.mktemp("inputs")
    kw = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    relu = build_tiny_model(root / "relu", seed=1, act="relu", **kw)
    silu = build_tiny_model(root / "silu", seed=2, act="silu", **kw)
    data = root / "calib.txt"
    data.write_text(make_text(300, seed=3))
    torch.manual_seed(0)
    preds = PredictorSet([LayerPredictor(32, 48, 8, threshold=0.0) for _ in range(2)], input_kind="ffn_norm")
    rng = np.random.default_rng(0)
    hyb = pack_hybrid_model(relu, root / "hyb", [rng.random(48) for _ in range(2)], predictors=preds)
    prof = root / "prof"
    run_profile(str(relu), [str(data)], str(prof), ProfileConfig(tokens=512, block_len=32, batch_size=4,
                                                                 samples_per_layer=64, chunk_rows=32, progress=False))
    p = {"relu": relu, "silu": silu, "hyb": hyb, "data": data, "prof": prof, "root": root}
    # broken checkpoints: config.json
    bad = root / "bad"
    bad.mkdir()
    cfgs = {
        "cfg_hidden_str": {"hidden_size": "32"}, "cfg_layers_zero": {"num_hidden_layers": 0},
        "cfg_vocab_missing": {"vocab_size": _DROP}, "cfg_eps_str": {"rms_norm_eps": "tiny"},
        "cfg_eps_neg": {"rms_norm_eps": -1.0}, "cfg_tie_str": {"tie_word_embeddings": "false"},
        "cfg_maxpos_neg": {"max_position_embeddings": -4}, "cfg_maxpos_float": {"max_position_embeddings": 64.5},
        "cfg_act_gelu": {"hidden_act": "gelu"}, "cfg_arch_str": {"architectures": "LlamaForCausalLM"},
        "cfg_arch_gpt2": {"architectures": ["GPT2LMHeadModel"]}, "cfg_eos_str": {"eos_token_id": "eos"},
        "cfg_bos_neg": {"bos_token_id": -1}, "cfg_rope_yarn": {"rope_scaling": {"type": "yarn", "factor": 2.0}},
        "cfg_rope_nofactor": {"rope_scaling": {"type": "linear"}}, "cfg_rope_list": {"rope_scaling": [1, 2]},
        "cfg_kv_heads": {"num_key_value_heads": 3}, "cfg_kv_heads_str": {"num_key_value_heads": "2"},
        "cfg_fatrelu_neg": {"hidden_act": "fatrelu", "hidden_act_param": -0.5},
        "cfg_fatrelu_str": {"hidden_act": "fatrelu", "hidden_act_param": "high"},
        "cfg_mlp_bias": {"mlp_bias": True}, "cfg_theta_zero": {"rope_theta": 0},
        "cfg_attn_bias_str": {"attention_bias": "no"}, "cfg_head_dim_str": {"head_dim": "8"},
        "cfg_scale_emb_nan": {"scale_emb": float("nan")}, "cfg_heads_indivisible": {"num_attention_heads": 5,
                                                                                  "num_key_value_heads": 5},
    }
    for name, change in cfgs.items():
        p[name] = _copy_with_config(relu, bad / name, **change)
    (bad / "cfg_not_json").mkdir()
    (bad / "cfg_not_json" / "config.json").write_text("{ not json")
    (bad / "cfg_list").mkdir()
    (bad / "cfg_list" / "config.json").write_text("[1, 2]")
    (bad / "cfg_bytes").mkdir()
    (bad / "cfg_bytes" / "config.json").write_bytes(b"\xff\xfe{")
    (bad / "empty").mkdir()
    for n in ("cfg_not_json", "cfg_list", "cfg_bytes", "empty"):
        p[n] = bad / n
    # broken weights
    w = _copy_with_config(relu, bad / "w_missing")
    (w / "model.safetensors").unlink()
    p["w_missing"] = w
    w = _copy_with_config(relu, bad / "w_truncated")
    raw = (relu / "model.safetensors").read_bytes()
    (w / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    p["w_truncated"] = w
    w = _copy_with_config(relu, bad / "w_garbage")
    (w / "model.safetensors").write_bytes(b"\x00" * 64)
    p["w_garbage"] = w
    p["w_shape"] = _copy_with_config(relu, bad / "w_shape", intermediate_size=40)
    w = _copy_with_config(relu, bad / "w_bin_garbage")
    (w / "model.safetensors").unlink()
    (w / "pytorch_model.bin").write_bytes(b"not a pickle")
    p["w_bin_garbage"] = w
    (bad / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (bad / "empty.gguf").write_bytes(b"")
    p["gguf_garbage"], p["gguf_empty"] = bad / "garbage.gguf", bad / "empty.gguf"
    from bench.gguf_export import export_gguf
    whole = export_gguf(relu, bad / "whole.gguf", dtype="f32").read_bytes()
    (bad / "truncated.gguf").write_bytes(whole[: len(whole) * 2 // 3])
    p["gguf_truncated"] = bad / "truncated.gguf"
    for name, index in (("w_index_outside", {"weight_map": {"x": "../../relu/model.safetensors"}}),
                        ("w_index_abs", {"weight_map": {"x": str(relu / "model.safetensors")}}),
                        ("w_index_bad", {"weights": []}), ("w_index_missing", {"weight_map": {"x": "m-2.safetensors"}})):
        w = _copy_with_config(relu, bad / name)
        (w / "model.safetensors").unlink()
        (w / "model.safetensors.index.json").write_text(json.dumps(index))
        p[name] = w
    # broken hybrid directories
    meta = json.loads((hyb / "hybrid.json").read_text())
    for name, change in (("h_weights_outside", {"weights": "../../relu/model.safetensors"}),
                         ("h_weights_abs", {"weights": str(hyb / "model.safetensors")}),
                         ("h_pred_outside", {"predictors": "../hyb/predictors.safetensors"}),
                         ("h_pred_missing", {"predictors": "nope.safetensors"}),
                         ("h_stats_outside", {"neuron_stats": "/etc/hostname"}),
                         ("h_version", {"version": 7}), ("h_format", {"format": "other"}),
                         ("h_layers_str", {"n_layers": "2"}), ("h_layers_wrong", {"n_layers": 3}),
                         ("h_cuts_missing", {"activity": {"kind": "magnitude", "cett": 0.2}}),
                         ("h_cuts_short", {"activity": {"kind": "magnitude", "thresholds": [0.1]}}),
                         ("h_weights_int", {"weights": 5})):
        h = bad / name
        shutil.copytree(hyb, h)
        (h / "hybrid.json").write_text(json.dumps({**meta, **change}))
        p[name] = h
    h = bad / "h_not_json"
    shutil.copytree(hyb, h)
    (h / "hybrid.json").write_text("{")
    p["h_not_json"] = h
    h = bad / "h_symlink"
    shutil.copytree(hyb, h)
    (h / "model.safetensors").unlink()
    (h / "model.safetensors").symlink_to(hyb / "model.safetensors")
    p["h_symlink"] = h
    # broken profiles
    for name, change in (("p_samples_outside", {"samples": {"dir": "../../prof/samples"}}),
                         ("p_freq_outside", {"frequencies": "/etc/hostname"}), ("p_no_model_config", None)):
        d = bad / name
        shutil.copytree(prof, d)
        pj = json.loads((prof / "profile.json").read_text())
        if change is None:
            pj.pop("model_config")
        else:
            pj.update(change)
        (d / "profile.json").write_text(json.dumps(pj))
        p[name] = d
    d = bad / "p_not_json"
    shutil.copytree(prof, d)
    (d / "profile.json").write_text("nope")
    p["p_not_json"] = d
    # a directory of someone else's files, and a plain file
    other = root / "someone_elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    p["other"] = other
    p["schedule"] = root / "schedule.json"
    p["schedule"].write_text(json.dumps({"lambdas": [0.1, 0.2], "boundaries": [4]}))
    return p


# ----------------------------------------------------------------------------- the table
# (command, args, what the one stderr line must contain). {name} -> an input path; {case} -> this case's
# own empty scratch directory (outputs go there).

RUN = "hybrid-run"
CONV = "hybrid-convert"

GEN = ["generate", "-p", "hi", "-n", "2"]
ALL = ["all", "-m", "{relu}", "--data", "{data}", "--block-len", "32"]
CASES: list[tuple[str, list[str], str]] = [
    # --- hybrid-run generate: model names and directories
    (RUN, GEN + ["--model", "{case}/nope"], "no such directory"),
    (RUN, GEN + ["--model", "{data}"], "is not a directory"),
    (RUN, GEN + ["--model", "not-an-alias"], "not a known alias"),
    (RUN, GEN + ["--model", "someorg/somemodel"], "not in the local Hugging Face cache"),
    (RUN, GEN + ["--model", "{empty}"], "config.json: missing"),
    (RUN, GEN + ["--model", "{cfg_not_json}"], "not valid JSON"),
    (RUN, GEN + ["--model", "{cfg_list}"], "expected a JSON object"),
    (RUN, GEN + ["--model", "{cfg_bytes}"], "not valid JSON"),
    (RUN, GEN + ["--model", "{cfg_hidden_str}"], "hidden_size"),
    (RUN, GEN + ["--model", "{cfg_layers_zero}"], "num_hidden_layers"),
    (RUN, GEN + ["--model", "{cfg_vocab_missing}"], "vocab_size"),
    (RUN, GEN + ["--model", "{cfg_eps_str}"], "rms_norm_eps"),
    (RUN, GEN + ["--model", "{cfg_eps_neg}"], "rms_norm_eps"),
    (RUN, GEN + ["--model", "{cfg_tie_str}"], "tie_word_embeddings"),
    (RUN, GEN + ["--model", "{cfg_maxpos_neg}"], "max_position_embeddings"),
    (RUN, GEN + ["--model", "{cfg_maxpos_float}"], "max_position_embeddings"),
    (RUN, GEN + ["--model", "{cfg_act_gelu}"], "hidden_act 'gelu'"),
    (RUN, GEN + ["--model", "{cfg_arch_str}"], "architectures"),
    (RUN, GEN + ["--model", "{cfg_arch_gpt2}"], "GPT2LMHeadModel"),
    (RUN, GEN + ["--model", "{cfg_eos_str}"], "eos_token_id"),
    (RUN, GEN + ["--model", "{cfg_bos_neg}"], "bos_token_id"),
    (RUN, GEN + ["--model", "{cfg_rope_yarn}"], "yarn"),
    (RUN, GEN + ["--model", "{cfg_rope_nofactor}"], "rope_scaling.factor"),
    (RUN, GEN + ["--model", "{cfg_rope_list}"], "rope_scaling"),
    (RUN, GEN + ["--model", "{cfg_kv_heads}"], "num_key_value_heads"),
    (RUN, GEN + ["--model", "{cfg_kv_heads_str}"], "num_key_value_heads"),
    (RUN, GEN + ["--model", "{cfg_fatrelu_neg}"], "threshold"),
    (RUN, GEN + ["--model", "{cfg_fatrelu_str}"], "hidden_act_param"),
    (RUN, GEN + ["--model", "{cfg_mlp_bias}"], "mlp_bias"),
    (RUN, GEN + ["--model", "{cfg_theta_zero}"], "rope_theta"),
    (RUN, GEN + ["--model", "{cfg_attn_bias_str}"], "attention_bias"),
    (RUN, GEN + ["--model", "{cfg_head_dim_str}"], "head_dim"),
    (RUN, GEN + ["--model", "{cfg_scale_emb_nan}"], "scale_emb"),
    (RUN, GEN + ["--model", "{cfg_heads_indivisible}"], "multiple"),
    (RUN, GEN + ["--model", "{w_missing}"], "no weights found"),
    (RUN, GEN + ["--model", "{w_truncated}"], "safetensors"),
    (RUN, GEN + ["--model", "{w_garbage}"], "not a valid safetensors file"),
    (RUN, GEN + ["--model", "{w_shape}"], "has shape"),
    (RUN, GEN + ["--model", "{w_bin_garbage}"], "cannot read PyTorch checkpoint"),
    (RUN, GEN + ["--model", "{gguf_garbage}"], "not a readable GGUF file"),
    (RUN, GEN + ["--model", "{gguf_empty}"], "not a readable GGUF file"),
    (RUN, ["info", "--model", "{gguf_garbage}"], "not a readable GGUF file"),
    (RUN, GEN + ["--model", "{gguf_truncated}"], "not a readable GGUF file"),
    (RUN, GEN + ["--model", "{relu}", "--weights", "q3_k"], "unknown format 'q3_k'"),
    (RUN, GEN + ["--model", "{relu}", "--weights", "int4"], "not a multiple of 32"),
    (RUN, GEN + ["--model", "{hyb}", "--weights", "q8_0"], "intermediate_size 48 is not a multiple of 32"),
    (RUN, GEN + ["--model", "{relu}", "--weights", "q4_0", "--exact"], "not a multiple of 32"),
    (RUN, GEN + ["--model", "{w_index_outside}"], "outside the model directory"),
    (RUN, GEN + ["--model", "{w_index_abs}"], "outside the model directory"),
    (RUN, GEN + ["--model", "{w_index_bad}"], "malformed shard index"),
    (RUN, GEN + ["--model", "{w_index_missing}"], "is missing"),
    (RUN, GEN + ["--model", "{h_weights_outside}"], "'weights'"),
    (RUN, GEN + ["--model", "{h_weights_abs}"], "'weights'"),
    (RUN, GEN + ["--model", "{h_pred_outside}"], "'predictors'"),
    (RUN, GEN + ["--model", "{h_pred_missing}"], "nope.safetensors: missing"),
    (RUN, GEN + ["--model", "{h_stats_outside}", "--device", "cpu"], "'neuron_stats'"),
    (RUN, GEN + ["--model", "{h_version}"], "format version 7"),
    (RUN, GEN + ["--model", "{h_format}"], "not a hybrid model directory"),
    (RUN, GEN + ["--model", "{h_layers_str}"], "n_layers"),
    (RUN, GEN + ["--model", "{h_layers_wrong}"], "n_layers 3"),
    (RUN, GEN + ["--model", "{h_weights_int}"], "'weights'"),
    (RUN, GEN + ["--model", "{h_not_json}"], "unreadable"),
    (RUN, GEN + ["--model", "{h_cuts_missing}", "--exact"], "'thresholds'"),
    (RUN, GEN + ["--model", "{h_cuts_short}", "--predictor"], "'thresholds'"),
    (RUN, GEN + ["--model", "{h_symlink}"], "outside the model directory"),
    # --- hybrid-run generate: flags
    (RUN, GEN + ["--model", "{relu}", "--device", "tpu"], "unknown device"),
    (RUN, GEN + ["--model", "{relu}", "--device", "cuda"], "CUDA is not available"),
    (RUN, GEN + ["--model", "{relu}", "--dtype", "float8"], "unknown dtype"),
    (RUN, GEN + ["--model", "{relu}", "--threads", "0"], "--threads"),
    (RUN, GEN + ["--model", "{relu}", "--threads", "4096"], "--threads"),
    (RUN, GEN + ["--model", "{relu}", "--context", "0"], "--context"),
    (RUN, GEN + ["--model", "{relu}", "--context", "1"], "--context"),
    (RUN, GEN + ["--model", "{relu}", "--context", "-5"], "--context"),
    (RUN, GEN + ["--model", "{relu}", "--context", "many"], "--context"),
    (RUN, GEN + ["--model", "{hyb}", "--hot-fraction", "1.5"], "--hot-fraction"),
    (RUN, GEN + ["--model", "{hyb}", "--hot-fraction", "nan"], "--hot-fraction"),
    (RUN, GEN + ["--model", "{hyb}", "--hot-fraction", "-0.1"], "--hot-fraction"),
    (RUN, GEN + ["--model", "{hyb}", "--gpu-memory", "8XB"], "memory size"),
    (RUN, GEN + ["--model", "{hyb}", "--gpu-memory", "-1GiB"], "memory size"),
    (RUN, GEN + ["--model", "{hyb}", "--gpu-memory", "lots"], "memory size"),
    (RUN, GEN + ["--model", "{hyb}", "--cold-format", "int3"], "--cold-format"),
    (RUN, GEN + ["--model", "{relu}", "--exact"], "needs a hybrid model directory"),
    (RUN, GEN + ["--model", "{relu}", "--predictor"], "needs a hybrid model directory"),
    (RUN, GEN + ["--model", "{silu}", "--exact"], "needs a hybrid model directory"),
    (RUN, ["generate", "--model", "{relu}", "-p", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (RUN, ["generate", "--model", "{relu}", "-p", "hi", "--max-new-tokens", "ten"], "--max-new-tokens"),
    (RUN, GEN + ["--model", "{relu}", "--temperature", "-1"], "--temperature"),
    (RUN, GEN + ["--model", "{relu}", "--temperature", "nan"], "--temperature"),
    (RUN, GEN + ["--model", "{relu}", "--temperature", "inf"], "--temperature"),
    (RUN, GEN + ["--model", "{relu}", "--top-p", "0"], "--top-p"),
    (RUN, GEN + ["--model", "{relu}", "--top-p", "1.5"], "--top-p"),
    (RUN, GEN + ["--model", "{relu}", "--top-p", "nan"], "--top-p"),
    (RUN, GEN + ["--model", "{relu}", "--top-k", "-1"], "--top-k"),
    (RUN, GEN + ["--model", "{relu}", "--repetition-penalty", "0"], "--repetition-penalty"),
    (RUN, GEN + ["--model", "{relu}", "--repetition-penalty", "nan"], "--repetition-penalty"),
    (RUN, GEN + ["--model", "{relu}", "--seed", "-1"], "--seed"),
    (RUN, GEN + ["--model", "{relu}", "--stop", ""], "--stop"),
    (RUN, GEN + ["--model", "{relu}", "--bogus"], "No such option"),
    (RUN, ["generate", "--model", "{relu}"], "--prompt"),
    (RUN, ["generate", "--model", "{relu}", "-p", "word " * 80, "--context", "16"], "the context is 16"),
    (RUN, ["generate", "--model", "{relu}", "-p", "hi", "--top-k", "many"], "--top-k"),
    (RUN, ["nonsense"], "No such command"),
    # --- hybrid-run chat and info
    (RUN, ["chat", "--model", "{case}/nope"], "no such directory"),
    (RUN, ["chat", "--model", "{relu}", "--threads", "0"], "--threads"),
    (RUN, ["chat", "--model", "{relu}", "--temperature", "nan"], "--temperature"),
    (RUN, ["chat", "--model", "{relu}", "--context", "1"], "--context"),
    (RUN, ["chat", "--model", "{cfg_eps_str}"], "rms_norm_eps"),
    (RUN, ["chat", "--model", "{h_weights_outside}"], "'weights'"),
    (RUN, ["info", "--model", "{case}/nope"], "no such directory"),
    (RUN, ["info", "--model", "{cfg_not_json}"], "not valid JSON"),
    (RUN, ["info", "--model", "{relu}", "--dtype", "float16"], "No such option"),
    (RUN, ["info", "--model", "{relu}", "--threads", "3"], "No such option"),
    (RUN, ["info", "--model", "{h_pred_outside}"], "'predictors'"),
    (RUN, ["info", "--model", "{relu}", "extra"], "unexpected extra argument"),
    # --- hybrid-run serve (fails before it listens)
    (RUN, ["serve", "--model", "{case}/nope", "--port", "0"], "no such directory"),
    (RUN, ["serve", "--model", "{relu}", "--port", "70000"], "--port"),
    (RUN, ["serve", "--model", "{relu}", "--port", "http"], "--port"),
    (RUN, ["serve", "--model", "{relu}", "--threads", "0", "--port", "0"], "--threads"),
    (RUN, ["serve", "--model", "{relu}", "--host", "999.1.1.1", "--port", "0"], "cannot listen"),
    (RUN, ["serve", "--model", "{cfg_tie_str}", "--port", "0"], "tie_word_embeddings"),
    # --- hybrid-run bench (fails before any model is built)
    (RUN, ["bench", "--runs", "0", "--out", "{case}/r"], "--runs"),
    (RUN, ["bench", "--new-tokens", "1", "--out", "{case}/r"], "--new-tokens"),
    (RUN, ["bench", "--gpu-memory", "abc", "--out", "{case}/r"], "memory size"),
    (RUN, ["bench", "--cold-format", "x", "--out", "{case}/r"], "--cold-format"),
    (RUN, ["bench", "--systems", "nope", "--out", "{case}/r"], "nope"),
    (RUN, ["bench", "--sweep", "a,b", "--out", "{case}/r"], "--sweep"),
    (RUN, ["bench", "--time-budget-s", "nan", "--out", "{case}/r"], "--time-budget-s"),
    (RUN, ["bench", "--target-density", "2", "--out", "{case}/r"], "--target-density"),
    (RUN, ["bench", "--threads", "0", "--out", "{case}/r"], "--threads"),
    (RUN, ["bench", "--out", "{data}/r"], "is a file"),
    (RUN, ["bench", "--model", "{relu}", "--out", "{relu}"], "the input --model"),
    (RUN, ["bench", "--model", "{relu}", "--out", "{relu}/results"], "the input --model"),
    (RUN, ["bench", "--model", "{case}/nope", "--out", "{case}/r"], "not a model directory"),
    (RUN, ["bench", "--freq-sigma", "-1", "--out", "{case}/r"], "sigma"),
    # --- hybrid-convert profile
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--tokens", "0"], "--tokens"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--tokens", "-5"], "--tokens"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--samples-per-layer", "-1"],
     "--samples-per-layer"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--cett", "0"], "--cett"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--cett", "1"], "--cett"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--cett", "nan"], "--cett"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--block-len", "0"], "--block-len"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--batch-size", "0"],
     "--batch-size"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--block-len", "4096"],
     "max_position_embeddings"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--dtype", "float8"], "dtype"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--device", "tpu"],
     "unknown device"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{case}/none.txt", "--out", "{case}/p"], "data file not found"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{data}"], "the input --data"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{relu}"], "the input --model"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{relu}/prof"], "the input --model"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{root}", "--force"], "the input"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{data}/p"], "the input --data"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{other}/notes.txt/p"], "is a file"),
    (CONV, ["profile", "-m", "{silu}", "--data", "{data}", "--out", "{case}/p"], "no exact zeros"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{other}", "--block-len", "32"], "not empty"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{other}", "--force", "--block-len", "32"],
     "not written by this product"),
    (CONV, ["profile", "-m", "{relu}", "--data", "{data}", "--out", "{case}/p", "--x-dtype", "float8"],
     "--x-dtype"),
    (CONV, ["profile", "-m", "{cfg_eps_str}", "--data", "{data}", "--out", "{case}/p"], "rms_norm_eps"),
    (CONV, ["profile", "-m", "{w_garbage}", "--data", "{data}", "--out", "{case}/p", "--block-len", "32"],
     "safetensors"),
    (CONV, ["profile", "-m", "{relu}", "--out", "{case}/p"], "--data"),
    # --- hybrid-convert train-predictors
    (CONV, ["train-predictors", "--profile", "{case}/nope", "--out", "{case}/t"], "not found"),
    (CONV, ["train-predictors", "--profile", "{relu}", "--out", "{case}/t"], "profile.json: not found"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--recall-target", "0"],
     "--recall-target"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--recall-target", "1.5"],
     "--recall-target"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--recall-target", "nan"],
     "--recall-target"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--density-factor", "0.5"],
     "--density-factor"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--density-factor", "nan"],
     "--density-factor"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--ranks", "abc"], "--ranks"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--ranks", "0"], "--ranks"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--max-epochs", "0"], "--max-epochs"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--max-samples", "2"],
     "--max-samples"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--baseline-layers", "99"],
     "--baseline-layers"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--baseline-layers", "x"],
     "--baseline-layers"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--device", "tpu"], "unknown device"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{prof}"], "the input --profile"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{prof}/pred"], "the input --profile"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{relu}", "--model", "{relu}"], "the input --model"),
    (CONV, ["train-predictors", "--profile", "{p_not_json}", "--out", "{case}/t"], "not valid JSON"),
    (CONV, ["train-predictors", "--profile", "{p_samples_outside}", "--out", "{case}/t"], "samples.dir"),
    (CONV, ["train-predictors", "--profile", "{p_no_model_config}", "--out", "{case}/t"], "model_config"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{other}", "--force"],
     "not written by this product"),
    (CONV, ["train-predictors", "--profile", "{prof}", "--out", "{case}/t", "--input", "both"], "--input"),
    # --- hybrid-convert pack
    (CONV, ["pack", "-m", "{relu}", "--profile", "{case}/nope", "--out", "{case}/h"], "not found"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--predictors", "{case}/nope", "--out", "{case}/h"],
     "not found"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--out", "{relu}"], "the input --model"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--out", "{prof}"], "the input --profile"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--out", "{prof}/h"], "the input --profile"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--out", "{root}"], "the input"),
    (CONV, ["pack", "-m", "{silu}", "--profile", "{prof}", "--out", "{case}/h"], "SiLU"),
    (CONV, ["pack", "-m", "{case}/nope", "--profile", "{prof}", "--out", "{case}/h"], "no such directory"),
    (CONV, ["pack", "-m", "{w_shape}", "--profile", "{prof}", "--out", "{case}/h"], "another model"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{p_freq_outside}", "--out", "{case}/h"], "'frequencies'"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{p_not_json}", "--out", "{case}/h"], "not valid JSON"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--out", "{other}", "--force"],
     "not written by this product"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}", "--out", "{data}"], "not a directory"),
    (CONV, ["pack", "-m", "{relu}", "--profile", "{prof}"], "--out"),
    # --- hybrid-convert all
    (CONV, ALL + ["--out", "{relu}"], "the input --model"),
    (CONV, ALL + ["--out", "{relu}/h"], "the input --model"),
    (CONV, ALL + ["--out", "{case}/h", "--work-dir", "{relu}"],
     "the input --model"),
    (CONV, ALL + ["--out", "{case}/h", "--work-dir", "{case}/h"],
     "separate directories"),
    (CONV, ALL + ["--out", "{case}/h", "--resume"], "no interrupted run"),
    (CONV, ALL + ["--out", "{case}/h", "--resume", "--force"], "contradict"),
    (CONV, ALL + ["--out", "{case}/h", "--work-dir", "{other}"],
     "earlier run"),
    (CONV, ALL + ["--out", "{case}/h", "--work-dir", "{other}", "--force"],
     "not written by this product"),
    (CONV, ALL + ["--out", "{case}/h", "--work-dir", "{other}", "--resume"],
     "not written by this tool"),
    (CONV, ["all", "-m", "{relu}", "--data", "{case}/none.txt", "--out", "{case}/h"], "data file not found"),
    (CONV, ["all", "-m", "{case}/nope", "--data", "{data}", "--out", "{case}/h"], "no such directory"),
    (CONV, ALL + ["--out", "{case}/h", "--tokens", "0"], "--tokens"),
    (CONV, ALL + ["--out", "{case}/h", "--block-len", "0"], "--block-len"),
    (CONV, ALL + ["--out", "{case}/h", "--cett", "0.2"], "drop --cett"),
    (CONV, ["all", "-m", "{silu}", "--data", "{data}", "--block-len", "32", "--out", "{case}/h", "--cett", "1.5"],
     "--cett"),
    (CONV, ["all", "-m", "{silu}", "--data", "{data}", "--block-len", "32", "--out", "{case}/h", "--cett", "0"],
     "--cett"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--mode", "predictor", "--block-len", "32"],
     "needs a hybrid model directory with predictors"),
    (CONV, ["eval", "--model", "{silu}", "--data", "{data}", "--mode", "exact", "--block-len", "32"],
     "exact zeros"),
    (CONV, ["eval", "--model", "{hyb}", "--data", "{data}", "--mode", "exact", "--device", "cuda",
            "--block-len", "32"], "float32"),
    (CONV, ALL + ["--out", "{case}/h", "--block-len", "512"], "max_position_embeddings"),
    (CONV, ["all", "-m", "{silu}", "--data", "{data}", "--out", "{case}/h"], "no exact zeros"),
    (CONV, ALL + ["--out", "{other}"], "not empty"),
    (CONV, ALL + ["--out", "{data}"], "the input --data"),
    # --- hybrid-convert prosparse
    (CONV, ["prosparse", "--data", "{data}", "--out", "{case}/o"], "--model is required"),
    (CONV, ["prosparse", "--model", "{silu}", "--out", "{case}/o"], "--data is required"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{case}/none.txt", "--out", "{case}/o"],
     "data file not found"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{silu}"], "the input --model"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{silu}/o"], "the input --model"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{root}", "--force"], "the input"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--lambda-scale", "-1"],
     "--lambda-scale"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--lambda-scale", "nan"],
     "--lambda-scale"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--lr", "nan"], "--lr"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--threshold", "-1"],
     "--threshold"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--threshold", "0.1",
            "--search-threshold"], "exclude each other"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--threshold", "0.1",
            "--activation", "drelu"], "apply to --activation relu"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--search-threshold",
            "--max-loss-increase", "0"], "--max-loss-increase"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--block-len", "0"],
     "--block-len"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--batch-size", "0"],
     "--batch-size"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--grad-accum", "0"],
     "--grad-accum"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--save-every", "-1"],
     "--save-every"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--eval-tokens", "4",
            "--block-len", "32"], "--eval-tokens"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--min-lr-ratio", "2"],
     "--min-lr-ratio"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--schedule", "nope"],
     "--schedule"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--weight-decay", "nan"],
     "--weight-decay"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--resume", "--force"],
     "contradict"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--resume"],
     "no interrupted run"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{case}/o", "--activation", "gelu"],
     "--activation"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{data}"], "the input --data"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{schedule}", "--schedule",
            "{schedule}"], "the input --schedule"),
    (CONV, ["prosparse", "--model", "{silu}", "--data", "{data}", "--out", "{other}", "--force", "--block-len",
            "32"], "not written by this product"),
    (CONV, ["prosparse", "--model", "{cfg_act_gelu}", "--data", "{data}", "--out", "{case}/o"], "gelu"),
    (CONV, ["prosparse", "--model", "{case}/nope", "--data", "{data}", "--out", "{case}/o"], "does not exist"),
    # --- hybrid-convert eval
    (CONV, ["eval", "--model", "{case}/nope", "--data", "{data}"], "does not exist"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{case}/none.txt"], "data file not found"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--json", "{relu}/eval.json"], "the input --model"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--json", "{data}", "--force"], "the input --data"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--json", "{other}"], "is a directory"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--json", "{other}/notes.txt"], "exists"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--json", "{data}/x.json"], "the input --data"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--json", "{other}/notes.txt/x.json"], "is a file"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--cett-bound", "0"], "--cett-bound"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--cett-bound", "nan"], "--cett-bound"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--batch-size", "0"], "--batch-size"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--block-len", "0"], "--block-len"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--tokens", "0"], "--tokens"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--block-len", "4096"], "max_position_embeddings"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--split", "middle"], "--split"),
    (CONV, ["eval", "--model", "{relu}", "--data", "{data}", "--sparsity", "most"], "--sparsity"),
    (CONV, ["eval", "--model", "{cfg_not_json}", "--data", "{data}"], "not valid JSON"),
    (CONV, ["nonsense"], "No such command"),
]


def _fill(arg: str, inputs: dict, case: Path) -> str:
    return arg.format(case=case, **{k: str(v) for k, v in inputs.items()})


def _group(name: str):
    if name == RUN:
        from hybrid_runtime.cli import main_group
    else:
        from convert.cli import main_group
    return main_group


def test_the_table_is_large_and_covers_every_command():
    commands = {(tool, args[0]) for tool, args, _ in CASES}
    assert len(CASES) >= 150
    assert commands >= {(RUN, "generate"), (RUN, "chat"), (RUN, "info"), (RUN, "bench"), (RUN, "serve"),
                        (CONV, "profile"),
                        (CONV, "train-predictors"), (CONV, "pack"), (CONV, "all"), (CONV, "prosparse"),
                        (CONV, "eval")}


@pytest.mark.parametrize("tool,args,expect", CASES, ids=[f"{i:03d}-{c[1][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line(inputs, tmp_path, tool, args, expect):
    case = tmp_path / "case"
    case.mkdir()
    before = tree_hashes(inputs["root"])
    code, out, err = run_cli(_group(tool), [_fill(a, inputs, case) for a in args])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal" not in err
    assert expect in lines[0], lines[0]
    assert tree_hashes(inputs["root"]) == before, "an input file changed"
    assert list(case.iterdir()) == [], f"left behind: {list(case.iterdir())}"
    assert not (inputs["other"] / OUTPUT_MARKER).exists() and (inputs["other"] / "notes.txt").is_file()


# ----------------------------------------------------------------------------- not errors: said, and going on

def test_invalid_utf8_prompt_is_replaced_and_said(inputs):
    from hybrid_runtime.cli import main_group
    code, out, err = run_cli(main_group, ["generate", "--model", str(inputs["relu"]), "-p", "-", "-n", "3"],
                             stdin=b"caf\xe9 \xff ok")
    assert code == 0, err
    assert "not valid UTF-8" in err and "Traceback" not in err


def test_chat_goes_on_after_an_undecodable_line(inputs):
    from hybrid_runtime.cli import main_group
    code, out, err = run_cli(main_group, ["chat", "--model", str(inputs["relu"]), "-n", "2"],
                             stdin=b"bad \xff\xfe line\nsecond line\n/exit\n")
    assert code == 0, err
    assert err.count("not valid UTF-8") == 1 and err.count("decode:") == 2   # both turns answered
