"""`hybrid-convert pack` (profile + predictors -> hybrid model directory) and `hybrid-convert all`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import numpy as np

from hybrid_runtime.errors import (OUTPUT_MARKER, UserError, check_output_path, log, path_relation,
                                   prepare_output_dir)




def read_profile(profile_dir: Path) -> tuple[dict, list[np.ndarray]]:
    """profile.json and the per-layer frequency arrays (original neuron order)."""
    from safetensors.numpy import load_file
    prof_path = profile_dir / "profile.json"
    if not prof_path.is_file():
        raise UserError(f"{prof_path}: not found (run `hybrid-convert profile` first, or finish it with --resume)")
    from hybrid_runtime.model_dir import inside
    try:
        prof = json.loads(prof_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{prof_path}: not valid JSON ({e})") from None
    if not isinstance(prof, dict):
        raise UserError(f"{prof_path}: not a profile (expected a JSON object)")
    freq_path = inside(profile_dir, prof.get("frequencies", "frequencies.safetensors"), "profile.json: 'frequencies'")
    if not freq_path.is_file():
        raise UserError(f"{freq_path}: missing")
    try:
        freq = load_file(str(freq_path))["frequency"]
    except Exception as e:
        raise UserError(f"{freq_path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return prof, [freq[i] for i in range(freq.shape[0])]


def pack(model: str, profile_dir: str, predictors_dir: str | None, out_dir: str, force: bool) -> Path:
    from hybrid_runtime.hybrid_format import pack_hybrid_model
    from hybrid_runtime.loading import resolve_model
    from hybrid_runtime.model_dir import open_model_dir
    from hybrid_runtime.predictor import PredictorSet

    src = resolve_model(model)
    cfg = open_model_dir(src).config
    check_output_path(out_dir, [("--model", src), ("--profile", profile_dir), ("--predictors", predictors_dir)])
    prof, freqs = read_profile(Path(profile_dir))
    if (len(freqs), len(freqs[0])) != (cfg.n_layers, cfg.layer_neurons):
        raise UserError(f"{profile_dir}: profile is {len(freqs)} layers x {len(freqs[0])} neurons but the model "
                        f"is {cfg.n_layers} x {cfg.layer_neurons} (a profile of another model?)")
    predictors, layer_stats = None, [dict(p) for p in prof.get("layers", [])]
    if predictors_dir:
        pred_file = Path(predictors_dir) / "predictors.safetensors"
        if not pred_file.is_file():
            raise UserError(f"{pred_file}: not found (run `hybrid-convert train-predictors` first)")
        predictors = PredictorSet.load(pred_file)
        if (len(predictors), predictors.ffn_dim, predictors.dim) != (cfg.n_layers, cfg.layer_neurons, cfg.dim):
            raise UserError(f"{pred_file}: predictors do not match the model's shape")
        metrics_path = Path(predictors_dir) / "predictor_metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            for stat, m in zip(layer_stats, metrics.get("layers", [])):
                test = m.get("test", {})
                stat.update(predictor_rank=m.get("rank"), predictor_threshold=m.get("threshold"),
                            predictor_recall=test.get("recall"), predictor_precision=test.get("precision"),
                            predicted_density=test.get("pred_density"))
    out = prepare_output_dir(out_dir, force, [("--model", src), ("--profile", profile_dir),
                                              ("--predictors", predictors_dir)])
    calibration = {"data": prof.get("data"), "activity": prof.get("activity")}
    pack_hybrid_model(src, out, freqs, predictors=predictors, calibration=calibration,
                      layer_stats=layer_stats or None)
    return out


@click.command("pack")
@click.option("--model", "-m", required=True, help="The ReLU-family HF checkpoint that was profiled.")
@click.option("--profile", "profile_dir", required=True, help="Directory from `hybrid-convert profile`.")
@click.option("--predictors", "predictors_dir", default=None,
              help="Directory from `hybrid-convert train-predictors` (omit for an --exact-only model).")
@click.option("--out", "out_dir", required=True, help="The hybrid model directory to write.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
def pack_cmd(model, profile_dir, predictors_dir, out_dir, force):
    """Write a hybrid model directory: neurons sorted by frequency, predictors, hybrid.json."""
    out = pack(model, profile_dir, predictors_dir, out_dir, force)
    log(f"wrote hybrid model directory {out}")


@click.command("all")
@click.option("--model", "-m", required=True, help="A ReLU-family HF checkpoint (ProSparse, ReluLLaMA, ...).")
@click.option("--data", "data_files", multiple=True, required=True, help="Calibration text (.txt/.jsonl), repeatable.")
@click.option("--out", "out_dir", required=True, help="The hybrid model directory to write.")
@click.option("--tokens", type=int, default=1_000_000, show_default=True, help="Calibration tokens to profile.")
@click.option("--samples-per-layer", type=int, default=65536, show_default=True)
@click.option("--block-len", type=int, default=512, show_default=True)
@click.option("--recall-target", type=float, default=0.95, show_default=True)
@click.option("--ranks", default="auto", show_default=True)
@click.option("--max-epochs", type=int, default=50, show_default=True)
@click.option("--baseline-layers", default="none", show_default=True,
              help="Layers to compare against the scikit-learn baselines (as in train-predictors).")
@click.option("--cett", type=float, default=None,
              help="Define active neurons by output magnitude at this CETT (e.g. 0.2; required for SiLU models): "
                   "per-layer cuts calibrated on the calibration text, recorded in hybrid.json.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="Dtype of the model while profiling: auto, float32, bfloat16, float16 (float32 on the CPU "
                   "profiles exactly what the CPU runtime computes).")
@click.option("--work-dir", default=None, help="Where intermediate results go (default: OUT.work).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its work directory (same options), where it stopped.")
@click.option("--force", is_flag=True, help="Start over: replace --out and the work directory (this tool's own).")
@click.pass_context
def all_cmd(ctx, model, data_files, out_dir, tokens, samples_per_layer, block_len, recall_target, ranks,
            max_epochs, baseline_layers, cett, device, dtype, work_dir, resume, force):
    """profile -> train-predictors -> pack, for a model that is already ReLU. Interrupted: rerun with --resume."""
    from convert.predictors_cli import profile_cmd, train_predictors_cmd
    from hybrid_runtime.loading import resolve_model
    if resume and force:
        raise UserError("--resume and --force contradict each other")
    from convert.profile import ProfileConfig, check_profile_inputs
    from hybrid_runtime.session import pick_device
    src = resolve_model(model)
    inputs = [("--model", src), *(("--data", f) for f in data_files)]
    out = check_output_path(out_dir, inputs)
    pick_device(device)
    check_profile_inputs(str(src), list(data_files), None, ProfileConfig(
        tokens=tokens, block_len=block_len, samples_per_layer=samples_per_layer, dtype=dtype, cett=cett))
    work = check_output_path(work_dir or out.with_name(out.name + ".work"), inputs, what="--work-dir")
    if path_relation(work.resolve(), out.resolve()):
        raise UserError(f"--work-dir {work} and --out {out} must be separate directories")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: output directory exists and is not empty (use --force to overwrite)")
    work_used = work.is_dir() and any(work.iterdir())
    if work_used and not (resume or force):
        raise UserError(f"{work}: holds an earlier run; continue it with --resume, or start over with --force")
    if resume and not work_used:
        raise UserError(f"{work}: no interrupted run to resume")
    if resume:
        if not (work / OUTPUT_MARKER).is_file():
            raise UserError(f"{work}: not written by this tool (no {OUTPUT_MARKER}); choose another --work-dir")
    else:   # a fresh work directory; --force empties this tool's own (and refuses anyone else's)
        prepare_output_dir(work, force=force, inputs=inputs, what="--work-dir")
    prof_dir, pred_dir = work / "profile", work / "predictors"
    if (prof_dir / "profile.json").is_file():
        log(f"[1/3] profile: reusing {prof_dir}")
    else:
        # resumable from its checkpoint; a profile stopped before its first checkpoint starts over
        can_resume = (prof_dir / "progress.safetensors").is_file()
        log(f"[1/3] profile -> {prof_dir}" + (" (resuming)" if can_resume else ""))
        ctx.invoke(profile_cmd, model=str(src), data_files=data_files, tokens=tokens, out_dir=str(prof_dir),
                   samples_per_layer=samples_per_layer, block_len=block_len, device=device, dtype=dtype,
                   cett=cett, resume=can_resume, force=not can_resume)
        if pred_dir.exists():  # predictors trained on an older profile are stale
            log(f"      removing predictors trained on an earlier profile: {pred_dir}")
            shutil.rmtree(pred_dir)
    if (pred_dir / "predictors.safetensors").is_file():
        log(f"[2/3] train-predictors: reusing {pred_dir}")
    else:
        log(f"[2/3] train-predictors -> {pred_dir}")
        ctx.invoke(train_predictors_cmd, profile_dir=str(prof_dir), out_dir=str(pred_dir), model=str(src),
                   recall_target=recall_target, ranks=ranks, max_epochs=max_epochs, device=device,
                   baseline_layers=baseline_layers,
                   resume=(pred_dir / "partial").is_dir(), force=not (pred_dir / "partial").is_dir())
    log(f"[3/3] pack -> {out}")
    pack(str(src), str(prof_dir), str(pred_dir), str(out), force)
    log(f"wrote hybrid model directory {out} (intermediate results kept in {work})")
