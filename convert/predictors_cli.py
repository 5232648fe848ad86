"""`hybrid-convert profile` and `hybrid-convert train-predictors`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from hybrid_runtime.errors import UserError, check_number, check_output_path, log, prepare_output_dir
from hybrid_runtime.session import pick_device

METRICS_FORMAT = "hybrid-predictor-metrics"




# ----------------------------------------------------------------------------- profile

@click.command("profile")
@click.option("--model", "-m", required=True, help="Model directory, alias or HF repo id (local cache).")
@click.option("--data", "data_files", multiple=True, required=True,
              help="Calibration text: .txt or .jsonl with a 'text' field (repeatable).")
@click.option("--tokens", type=int, default=1_000_000, show_default=True,
              help="Tokens to profile; if the data holds fewer, all of it is used (with a note).")
@click.option("--out", "out_dir", required=True, help="Output profile directory.")
@click.option("--samples-per-layer", type=int, default=65536, show_default=True,
              help="(x, active mask) pairs written per layer for predictor training.")
@click.option("--block-len", type=int, default=512, show_default=True, help="Tokens per packed block.")
@click.option("--split", type=click.Choice(["train", "heldout", "all"]), default="train", show_default=True,
              help="Which part of the data (convert.data keeps the last 5%% of each file held out).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Blocks per forward pass.")
@click.option("--cett", type=float, default=None,
              help="Define activity by output magnitude at this CETT (e.g. 0.2); required for SiLU models.")
@click.option("--x-dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="Storage dtype of the sampled FFN inputs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype: auto, float32, bfloat16, float16.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
def profile_cmd(model, data_files, tokens, out_dir, samples_per_layer, block_len, split, batch_size, cett, x_dtype,
                device, dtype, seed, resume, force):
    """Count how often each FFN neuron fires; write (x, mask) samples for train-predictors."""
    from convert.profile import ProfileConfig, format_profile_table, run_profile
    if batch_size <= 0 or block_len <= 0:
        raise UserError("--batch-size and --block-len must be positive")
    cfg = ProfileConfig(tokens=tokens, block_len=block_len, split=split, batch_size=batch_size,
                        samples_per_layer=samples_per_layer, x_dtype=x_dtype, cett=cett, seed=seed,
                        device=str(pick_device(device)), dtype=dtype)
    prof = run_profile(model, list(data_files), out_dir, cfg, resume=resume, force=force)
    click.echo(format_profile_table(prof))
    log(f"profiled {prof['data']['tokens']} tokens, {prof['samples']['per_layer']} samples per layer -> {out_dir}")


# ----------------------------------------------------------------------------- train-predictors

def _parse_ranks(text: str | None) -> tuple[int, ...] | None:
    if not text or text == "auto":
        return None
    try:
        ranks = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--ranks must be 'auto' or comma-separated integers, got {text!r}") from None
    if any(r <= 0 for r in ranks):
        raise UserError(f"--ranks must be positive, got {text!r}")
    return ranks


def _parse_layers(text: str, n_layers: int) -> list[int]:
    if text == "none":
        return []
    if text == "all":
        return list(range(n_layers))
    if text == "auto":  # first, middle and last layer: enough to compare, cheap on big models
        return sorted({0, n_layers // 2, n_layers - 1})
    try:
        layers = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise UserError(f"--baseline-layers must be auto, all, none or a comma list, got {text!r}") from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"--baseline-layers: layer {bad[0]} out of range [0, {n_layers})")
    return layers


def _meets(r: dict, targets: dict) -> bool:
    t = r["test"]
    return (t["recall"] >= targets["recall"] and t["density_ratio"] is not None
            and t["density_ratio"] <= targets["density_factor"] and r["param_frac"] <= targets["max_param_frac"])


def summarize(metrics: dict, recall_target: float, density_factor: float, max_param_frac: float) -> dict:
    layers = metrics["layers"]
    out = {
        "layers_meeting_target": sum(_meets(r, {"recall": recall_target, "density_factor": density_factor,
                                                 "max_param_frac": max_param_frac}) for r in layers),
        "n_layers": len(layers),
        "min_recall": min(r["test"]["recall"] for r in layers),
        "max_density_ratio": max((r["test"]["density_ratio"] or 0.0) for r in layers),
        "max_param_frac": max(r["param_frac"] for r in layers),
        "params_within_budget": all(r["param_frac"] <= max_param_frac for r in layers),
    }
    errs = [r["test"]["ffn_rel_err"] for r in layers if r["test"]["ffn_rel_err"] is not None]
    out["mean_ffn_rel_err"] = sum(errs) / len(errs) if errs else None
    beats = []
    for r in layers:
        for b in r.get("baselines") or []:
            if "recall" not in b or b["method"].startswith("torch_mlp"):
                continue
            ref = next(x for x in r["baselines"]
                       if x["method"] == ("torch_mlp@subset" if b["method"].endswith("@subset") else "torch_mlp"))
            beats.append(ref["recall"] > b["recall"])
    out["torch_beats_all_baselines"] = all(beats) if beats else None
    return out


def format_metrics_table(metrics: dict) -> str:
    rows = ["layer  rank  params%  threshold  recall  precis  pred_dens  true_dens  ratio  ffn_err  target"]
    for r in metrics["layers"]:
        t = r["test"]
        ratio = f"{t['density_ratio']:5.2f}" if t["density_ratio"] is not None else "  n/a"
        err = f"{t['ffn_rel_err']:7.4f}" if t["ffn_rel_err"] is not None else "    n/a"
        rows.append(f"{r['layer']:5d}  {r['rank']:4d}  {100 * r['param_frac']:6.2f}  {r['threshold']:9.4f}  "
                    f"{t['recall']:.4f}  {t['precision']:.4f}  {t['pred_density']:9.4f}  {t['true_density']:9.4f}  "
                    f"{ratio}  {err}  {'yes' if _meets(r, metrics['targets']) else 'NO'}")
    base = [(r["layer"], b) for r in metrics["layers"] for b in (r.get("baselines") or [])]
    if base:
        rows += ["", "baselines at equal predicted density (test split)",
                 "layer  method               neurons  recall  precis  pred_dens    params"]
        for layer, b in base:
            if "recall" not in b:
                rows.append(f"{layer:5d}  {b['method']:<19s}  skipped: {b.get('skipped', '')}")
                continue
            rows.append(f"{layer:5d}  {b['method']:<19s}  {str(b['neurons']):>7s}  {b['recall']:.4f}  "
                        f"{b['precision']:.4f}  {b['pred_density']:9.4f}  {b['params']:8d}")
    s = metrics["summary"]
    rows += ["", f"layers meeting recall>={metrics['targets']['recall']} at density<="
                 f"{metrics['targets']['density_factor']}x true with params<="
                 f"{100 * metrics['targets']['max_param_frac']:.0f}% of the FFN (test split): "
                 f"{s['layers_meeting_target']}/{s['n_layers']}; "
                 f"min recall {s['min_recall']:.4f}; max density ratio {s['max_density_ratio']:.2f}; "
                 f"max params {100 * s['max_param_frac']:.2f}% of FFN; "
                 f"torch beats all baselines: {s['torch_beats_all_baselines']}"]
    return "\n".join(rows)


@click.command("train-predictors")
@click.option("--profile", "profile_dir", required=True, help="Directory written by `hybrid-convert profile`.")
@click.option("--out", "out_dir", required=True, help="Output directory (predictors.safetensors, metrics).")
@click.option("--model", "-m", default=None, help="Model (default: the one recorded in profile.json).")
@click.option("--recall-target", type=float, default=0.95, show_default=True)
@click.option("--density-factor", type=float, default=1.5, show_default=True,
              help="Allowed predicted density as a multiple of the true density (rank choice).")
@click.option("--ranks", default="auto", show_default=True,
              help="Comma-separated candidate ranks, or auto (powers of two up to 10%% of the FFN's params).")
@click.option("--input", "input_kind", type=click.Choice(["auto", "ffn_norm", "residual"]), default="auto",
              show_default=True, help="Predictor input; auto trains both on the middle layer and keeps the better.")
@click.option("--bias/--no-bias", default=False, show_default=True)
@click.option("--max-epochs", type=int, default=50, show_default=True)
@click.option("--max-samples", type=int, default=None, help="Use at most this many samples per layer.")
@click.option("--baseline-layers", default="auto", show_default=True,
              help="Layers for the scikit-learn baselines: auto (first, middle, last), all, none, or 0,5,9.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Keep layers already trained in --out (after an interruption).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
def train_predictors_cmd(profile_dir, out_dir, model, recall_target, density_factor, ranks, input_kind, bias,
                         max_epochs, max_samples, baseline_layers, device, seed, resume, force):
    """Train per-layer activation predictors from a profile; write predictors.safetensors + metrics."""
    from hybrid_runtime.loading import load_model
    from predictors.baselines import run_baselines
    from predictors.samples import SampleReader
    from predictors.train import TrainConfig, train_all

    check_number("--recall-target", recall_target, low=0, high=1, low_open=True)
    check_number("--density-factor", density_factor, low=1)
    if max_epochs <= 0:
        raise UserError(f"--max-epochs must be positive, got {max_epochs}")
    if max_samples is not None and max_samples < 8:
        raise UserError(f"--max-samples must be at least 8, got {max_samples}")
    parsed_ranks = _parse_ranks(ranks)
    prof_dir = Path(profile_dir)
    prof_path = prof_dir / "profile.json"
    if not prof_path.is_file():
        hint = " (the profile run was interrupted: finish it with --resume)" if (
            prof_dir / "progress.safetensors").is_file() else ""
        raise UserError(f"{prof_path}: not found{hint}")
    try:
        prof = json.loads(prof_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{prof_path}: not valid JSON ({e})") from None
    if not isinstance(prof, dict) or not isinstance(prof.get("model_config"), dict):
        raise UserError(f"{prof_path}: not a profile (no model_config)")
    from hybrid_runtime.model_dir import inside
    samples = prof.get("samples") if isinstance(prof.get("samples"), dict) else {}
    reader = SampleReader(inside(prof_dir, samples.get("dir", "samples"), "profile.json: 'samples.dir'"))
    mc = prof["model_config"]
    if (reader.n_layers, reader.dim, reader.ffn_dim) != (mc["n_layers"], mc["dim"], mc["ffn_dim"]):
        raise UserError(f"{prof_dir}: sample store shape disagrees with profile.json")
    for i in range(reader.n_layers):
        if reader.n_samples(i) < 8:
            raise UserError(f"{prof_dir}: layer {i} has only {reader.n_samples(i)} samples "
                            "(profile with a larger --samples-per-layer)")

    base_layers = _parse_layers(baseline_layers, reader.n_layers)
    dev = str(pick_device(device))
    model_path = model or prof.get("model")
    if not model_path:
        raise UserError(f"{prof_path}: names no model; give --model")
    out = check_output_path(out_dir, [("--profile", prof_dir), ("--model", model_path)])
    work = out / "partial"
    if not (resume and work.is_dir()):
        prepare_output_dir(out, force)
    log(f"loading {model_path} for the FFN weights")
    import torch
    m = load_model(model_path, device="cpu", dtype=torch.float32 if dev == "cpu" else None)
    if (m.config.n_layers, m.config.dim, m.config.layer_neurons) != (reader.n_layers, reader.dim, reader.ffn_dim):
        raise UserError(f"model {model_path} is (n_layers, dim, FFN neurons) = "
                        f"{(m.config.n_layers, m.config.dim, m.config.layer_neurons)} but the profile is "
                        f"{(reader.n_layers, reader.dim, reader.ffn_dim)}")
    ffns = [layer.ffn for layer in m.layers]

    cfg = TrainConfig(recall_target=recall_target, density_factor=density_factor, ranks=parsed_ranks,
                      bias=bias, max_epochs=max_epochs, max_samples=max_samples, input_kind=input_kind,
                      seed=seed, device=dev)
    pset, metrics = train_all(reader, ffns, cfg, work, resume=resume,
                              baseline_fn=lambda i, data, p: run_baselines(data, p), baseline_layers=base_layers)
    metrics = {"format": METRICS_FORMAT, "version": 1, "profile": str(prof_dir.resolve()), "model": str(model_path),
               "targets": {"recall": recall_target, "density_factor": density_factor,
                           "max_param_frac": cfg.max_param_frac},
               **metrics}
    metrics["summary"] = summarize(metrics, recall_target, density_factor, cfg.max_param_frac)
    pset.save(out / "predictors.safetensors")
    tmp = out / "predictor_metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(out / "predictor_metrics.json")
    shutil.rmtree(work)
    click.echo(format_metrics_table(metrics))
    log(f"wrote {out / 'predictors.safetensors'} ({pset.n_params()} parameters, input={pset.input_kind}) "
        f"and {out / 'predictor_metrics.json'}")
