"""Reporting: the tables, the checks against the targets, machine facts, the Markdown/JSON/PNG files."""
from __future__ import annotations

import json
import math
import os
import platform
import re
from pathlib import Path

import torch

from bench.options import BenchLog, GiB, REFERENCE_FIGURES, SYSTEMS
from bench.step_profile import format_any_profile
from bench.systems import physical_cores

# --------------------------------------------------------------------------------------- reporting


def _f(v, fmt: str = ".1f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return none
    return format(v, fmt)


def speedups(rows: list[dict]) -> dict:
    ok = {r["system"]: r for r in rows if r.get("status") == "ok"}
    base = [n for n in ok if SYSTEMS[n].baseline]
    return {n: {b: ok[n]["decode_tps"] / ok[b]["decode_tps"] for b in base if b != n and ok[b]["decode_tps"]}
            for n in ok}


def format_tables(res: dict, markdown: bool = False) -> str:
    rows = res["systems"]
    head = ["system", "budget", "prefill tok/s", "decode tok/s", "ms/token", "peak GPU GiB", "CPU RSS GiB",
            "limit tok/s", "achieved", "runs", "same tokens"]
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([r["system"], _f(r.get("budget_gib"), "g"), f"{r['status']}: {r.get('reason', '')}"])
            continue
        same = r.get("same_tokens_as_dense")
        peak = _f(r.get("peak_gpu_gib"), ".2f") + ("*" if r.get("peak_gpu_source") == "device-wide" else "")
        body.append([r["system"], _f(r.get("budget_gib"), "g"), _f(r["prefill_tps"]), _f(r["decode_tps"], ".2f"),
                     _f(r["ms_per_token"], ".2f"), peak, _f(r.get("cpu_rss_gib"), ".2f"),
                     _f(r.get("limit_tps")), _f(100 * r["achieved_of_limit"] if r.get("achieved_of_limit") else None,
                                                ".0f") + ("%" if r.get("achieved_of_limit") else ""),
                     str(r["runs"]), "-" if same is None else f"{same}/{r['new_tokens']}"])
    sp = res.get("speedups", {})
    bases = sorted({b for v in sp.values() for b in v}, key=list(SYSTEMS).index)
    sp_head = ["decode speedup"] + [f"vs {b}" for b in bases]
    sp_body = [[n] + [_f(sp[n].get(b), ".2f") + "x" if sp[n].get(b) else "-" for b in bases] for n in sp]
    out = [_table(head, body, markdown)]
    if bases:
        out += ["", _table(sp_head, sp_body, markdown)]
    lim_head = ["system", "GPU MB/token", "CPU MB/token", "H2D MB/token", "limit ms/token", "limit model"]
    lim_body = [[r["system"], _f(r["limit"]["gpu_bytes"] / 1e6, ".1f"), _f(r["limit"]["cpu_bytes"] / 1e6, ".1f"),
                 _f(r["limit"]["h2d_bytes"] / 1e6, ".2f"), _f(r["limit"]["ms"], ".2f"), r["limit"]["model"]]
                for r in rows if r.get("status") == "ok" and r.get("limit")]
    if lim_body:
        out += ["", _table(lim_head, lim_body, markdown)]
    sweep = res.get("sweep") or []
    if sweep:
        budgets = sorted({p["budget_gib"] for p in sweep})
        sw_body = []
        for name in ("hybrid", "dense-offload"):
            vals = {p["budget_gib"]: p for p in sweep if p["system"] == name}
            sw_body.append([name] + [_f(vals[b].get("decode_tps"), ".2f") if b in vals else "-" for b in budgets])
        out += ["", _table(["decode tok/s at budget"] + [f"{b:g} GiB" for b in budgets], sw_body, markdown)]
    return "\n".join(out)


def _table(head: list[str], body: list[list[str]], markdown: bool) -> str:
    """Rows shorter than the header are (name, budget, message) lines: skipped or failed systems."""
    full = [b for b in body if len(b) == len(head)]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b + [""] * (len(head) - len(b))) + " |" for b in body]
        return "\n".join(lines)
    widths = [max([len(head[i])] + [len(b[i]) for b in full]) for i in range(len(head))]
    widths[0] = max([widths[0]] + [len(b[0]) for b in body])

    def row(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [row(head)]
    for b in body:
        lines.append(row(b) if len(b) == len(head) else
                     b[0].ljust(widths[0]) + "  " + b[1].rjust(widths[1]) + "  " + "  ".join(b[2:]))
    return "\n".join(lines)


def checks(res: dict) -> list[str]:
    """The issue's targets, where this run measured both sides."""
    ok = {r["system"]: r for r in res["systems"] if r.get("status") == "ok"}
    out = []

    def ratio(a, b):
        return ok[a]["decode_tps"] / ok[b]["decode_tps"]
    if "hybrid" in ok and "llamacpp-offload" in ok:
        out.append(f"hybrid vs llama.cpp at the same budget: {ratio('hybrid', 'llamacpp-offload'):.2f}x "
                   "(target >= 4.5x, goal >= 8x)")
    if "hybrid" in ok and "dense-offload" in ok:
        out.append(f"hybrid vs dense layer offload at the same budget: {ratio('hybrid', 'dense-offload'):.2f}x "
                   "(targets vs llama.cpp at the same budget: >= 4.5x, goal >= 8x)")
    if "hybrid" in ok and "llamacpp-gpu" in ok:
        out.append(f"hybrid at the budget vs llama.cpp with the whole model on the GPU: "
                   f"{ratio('hybrid', 'llamacpp-gpu'):.2f}x (goal: >= 1x)")
    if "hybrid-gpu" in ok and "llamacpp-gpu" in ok:
        out.append(f"hybrid fully on the GPU vs llama.cpp fully on the GPU: {ratio('hybrid-gpu', 'llamacpp-gpu'):.2f}x "
                   "(target >= 2x)")
    if "dense-gpu" in ok and "llamacpp-gpu" in ok:
        out.append(f"this engine dense on the GPU vs llama.cpp on the GPU: {ratio('dense-gpu', 'llamacpp-gpu'):.2f}x "
                   "(target >= 1x)")
    if "hybrid" in ok and ok["hybrid"].get("achieved_of_limit"):
        out.append(f"hybrid decode at {100 * ok['hybrid']['achieved_of_limit']:.0f}% of its physical limit "
                   "(target >= 60%)")
    if "hybrid-gpu" in ok and "dense-gpu" in ok:
        out.append(f"hybrid fully on the GPU vs this engine dense on the GPU: {ratio('hybrid-gpu', 'dense-gpu'):.2f}x "
                   "(target vs dense llama.cpp on the GPU: >= 2x)")
    if "dense-gpu" in ok and "hf-gpu" in ok:
        out.append(f"this engine dense on the GPU vs transformers generate: {ratio('dense-gpu', 'hf-gpu'):.2f}x")
    if "hybrid" in ok and "hybrid-gpu" in ok:
        out.append(f"hybrid at the budget reaches {100 * ratio('hybrid', 'hybrid-gpu'):.0f}% of hybrid fully on the GPU")
    return out


CPU_FLAGS = ("f16c", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_flags(cpuinfo: str) -> dict[str, bool]:
    """The /proc/cpuinfo flags that matter to the CPU kernels (16-bit conversion, vector width)."""
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return {f: f in flags for f in CPU_FLAGS}


def numba_runtime_info() -> dict:
    """Numba's threads and threading layer (known only after a parallel kernel ran), and which fp16
    widening the cold kernels compiled (F16C instructions or integer bit manipulation)."""
    import numba
    out = {"numba_threads": numba.get_num_threads(), "numba_max_threads": numba.config.NUMBA_NUM_THREADS}
    try:
        out["numba_threading_layer"] = numba.threading_layer()
    except ValueError:      # no parallel kernel has run yet
        out["numba_threading_layer"] = None
    from hybrid_runtime import cpu_ffn
    has = getattr(cpu_ffn, "HAS_F16C", None)
    out["numba_fp16_widening"] = None if has is None else ("F16C (vcvtph2ps)" if has else "integer bit manipulation")
    return out


def device_info(cuda: bool, work: str | None = None) -> dict:
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "physical_cores": physical_cores(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        import numba
        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                            if line.startswith("model name")), platform.processor())
        info["cpu_flags"] = cpu_flags(cpuinfo)
        info["ram_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 ** 2, 1)
    except (OSError, IndexError, ValueError):
        pass
    if work is not None:
        from bench.synthetic import free_bytes
        info["work_disk_free_gib"] = round(free_bytes(Path(work)) / GiB, 1)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / GiB, 1),
                    cuda=torch.version.cuda)
    return info


def _note_cold_format(res: dict, row: dict) -> None:
    """Device info: the cold-row format the hybrid systems really used (--cold-format auto picks it)."""
    fmt = (row.get("info") or {}).get("cold_format")
    if row.get("status") == "ok" and fmt:
        rows = res["device"].setdefault("cold_rows", {"requested": res["settings"].get("cold_format"), "used": {}})
        rows["used"][row["system"]] = fmt


def result_stem(res: dict) -> str:
    dev = res["device"].get("gpu") or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    return f"{slug}-{res['date']}"


def write_results(res: dict, out_dir: Path, stem: str, final: bool, log: BenchLog) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    res["log"] = log.lines[-2000:]
    res["notes"] = log.notes
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "log": out_dir / f"{stem}.log"}
    tmp = paths["json"].with_name(paths["json"].name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(paths["json"])
    paths["md"].write_text(format_markdown(res))
    paths["log"].write_text("\n".join(log.lines) + "\n")
    if final:
        png = out_dir / f"{stem}.png"
        msg = write_plot(res, png)
        if msg:
            log(msg)
        else:
            paths["png"] = png
    return paths


def format_model(m: dict) -> str:
    """The model's record as a few lines: shape, measured sparsity, predictors, pipeline settings."""
    if "synthetic" not in m:
        return f"model: {m.get('name')} ({m.get('path')})"
    sy, pr, pd, pp = m["synthetic"], m["profile"], m["predictors"], m["pipeline"]
    b = m["build"]
    n_params = 2 * sy["vocab_size"] * sy["dim"] + sy["n_layers"] * (4 * sy["dim"] ** 2 + 3 * sy["dim"] * sy["ffn_dim"])
    lines = [
        f"- {m['name']}: d={sy['dim']}, f={sy['ffn_dim']}, {sy['n_layers']} layers, {sy['n_heads']} heads, vocab "
        f"{sy['vocab_size']}, {n_params / 1e9:.2f} B parameters, fp16 (bf16-representable), act={sy['act']}; seed "
        f"{sy['seed']}; {'reused from an earlier build' if m.get('reused') else 'built in this run'} ({m['path']})",
        f"- sparsity: target {100 * (1 - sy['mean_density']):.1f}%; on the calibration text {100 * b['calibration_sparsity']:.1f}%; "
        f"measured by the profile on {pr['tokens']} other tokens {100 * pr['sparsity']:.1f}%",
        f"- frequency skew (profile): top 10% of neurons serve {100 * pr['top10']:.1f}% of activations, top 20% "
        f"{100 * pr['top20']:.1f}%" + (f", top 32% {100 * pr['top32']:.1f}%" if "top32" in pr else "")
        + f", top 50% {100 * pr['top50']:.1f}%; never-active neurons: {pr['dead']} "
        f"(sparsity profile {sy.get('sparsity_profile', 'prosparse')}: log-normal sigma {sy['freq_sigma']}; latent dim "
        f"{sy['latent_dim']}, noise {sy['noise']})",
        f"- predictors (project pipeline, time-budget settings: {pp['samples_per_layer']} samples/layer from "
        f"{pp['profile_tokens']} profiled tokens, fixed rank {pd['rank']}, {pd['max_epochs']} epochs, input "
        f"{pd['input']}): test recall {pd['recall']:.3f}, precision {pd['precision']:.3f}, predicted density "
        f"{pd['pred_density']:.3f} vs true {pd['true_density']:.3f} "
        f"({pd['pred_density'] / max(pd['true_density'], 1e-9):.2f}x); {pd['params'] / 1e6:.1f} M parameters",
        "- pipeline phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in m.get("pipeline_phases_s", {}).items()),
    ]
    return "\n".join(lines)


def format_sparsity_profile(m: dict) -> str:
    """The synthetic model's sparsity preset next to what this run measured on it."""
    from bench.synthetic import PROFILE_TARGETS
    sy, pr, pd = m["synthetic"], m["profile"], m["predictors"]
    name = sy.get("sparsity_profile", "prosparse")
    target = PROFILE_TARGETS.get(name.split("+")[0], {})
    top32 = pr.get("top32")
    lines = [f"Preset `{name}`: {target.get('source', 'custom')}; construction targets mean density "
             f"{sy['mean_density']:.3f} (sparsity {100 * (1 - sy['mean_density']):.1f}%), log-normal sigma "
             f"{sy['freq_sigma']}.",
             "",
             "| | this run's model (measured) | preset's reference figure |",
             "|---|---|---|",
             f"| activation density (profile, {pr['tokens']} unseen tokens) | {1 - pr['sparsity']:.3f} | "
             + (f"{1 - target['sparsity']:.3f}" if "sparsity" in target else "-") + " |",
             f"| predicted density (predictors mark active per token) | {pd['pred_density']:.3f} | "
             + (f"~{target['predicted_density']:.2f}" if "predicted_density" in target else "-") + " |",
             "| share of activations on the top 32% of neurons | " + (f"{top32:.3f}" if top32 is not None else "-")
             + " | " + (f"{target['top32']:.2f}" if "top32" in target else "-") + " |",
             f"| share on the top 20% | {pr['top20']:.3f} | - |", ""]
    if "predicted_density" in target:
        lines.append("PowerInfer's figures in the reference list (27.4 tok/s at 8 GiB, 66.3 tok/s on the GPU) were "
                     "measured on PowerInfer's own synthetic model with this profile, in a separate run: a comparison "
                     "with them is by profile, not side by side (different model weights, predictors and run).")
    else:
        lines.append("The reference figures below were measured in separate runs (PowerInfer on a different "
                     "sparsity profile: predictors marking ~24% active, top 32% serving 61%; run "
                     "`--sparsity-profile powerinfer` for that profile); they are not side by side with this table.")
    return "\n".join(lines)


def format_machine(dev: dict) -> str:
    flags = dev.get("cpu_flags") or {}
    cold = dev.get("cold_rows") or {}
    used = sorted(set((cold.get("used") or {}).values()))
    flag_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) or "unknown"
    lines = [f"- CPU: {dev.get('cpu', '?')}, {dev.get('cpu_cores')} logical / {dev.get('physical_cores')} physical "
             f"cores, {dev.get('ram_gib')} GiB RAM; flags: {flag_text}",
             f"- Numba {dev.get('numba', '?')}: {dev.get('numba_threads')} threads "
             f"(max {dev.get('numba_max_threads')}), "
             f"threading layer {dev.get('numba_threading_layer')}; fp16 cold rows widened by "
             f"{dev.get('numba_fp16_widening')}; torch {dev.get('torch')} with {dev.get('torch_threads')} threads",
             f"- cold rows: requested {cold.get('requested', '-')}, used {', '.join(used) if used else '-'}"
             + (" (" + ", ".join(f"{k}: {v}" for k, v in cold.get("used", {}).items()) + ")" if used else ""),
             f"- GPU: {dev.get('gpu', 'none')}" + (f", {dev.get('gpu_memory_gib')} GiB, CUDA {dev.get('cuda')}"
                                                    if dev.get("gpu") else ""),
             f"- disk free in --work at the start: {dev.get('work_disk_free_gib', '?')} GiB; "
             f"Python {dev.get('python')}, transformers {dev.get('transformers')}"]
    return "\n".join(lines)


def _all_notes(res: dict) -> list[str]:
    """Every note of the run, as markdown list items: per system, per sweep point, then the run's own."""
    return [f"- {r['system']}: {n}" for r in res["systems"] for n in r.get("notes", [])] + \
        [f"- sweep {p['budget_gib']:g} GiB {p['system']}: {n}" for p in res.get("sweep") or []
         for n in p.get("notes", [])] + [f"- {n}" for n in res.get("notes", [])]


def format_markdown(res: dict) -> str:
    s = res.get("settings", {})
    m = res.get("model", {})
    notes = _all_notes(res)
    trimmed = sum("time budget" in n for n in notes)
    status = ("Run finished" if res.get("complete") else "PARTIAL (written while running)") + \
        (f"; {trimmed} item(s) shortened or skipped for the time budget (Notes)." if trimmed else ".")
    lines = [f"# Benchmark: {m.get('name', '?')} on {res['device'].get('gpu', 'CPU')} ({res['date']})", "",
             f"Prompt {s.get('prompt_tokens')} tokens, {s.get('new_tokens')} generated, batch 1, greedy, EOS ignored; "
             f"warm-up excluded; median of up to {s.get('runs')} runs; GPU budget {s.get('gpu_memory')}. {status}", "",
             format_tables(res, markdown=True), "",
             "\"same tokens\": generated tokens equal to the dense engine's before the first difference. The "
             "synthetic model's logits are random, with tiny top-1 margins: the approximate predictor mode diverges "
             "within a few tokens there, so this column checks the dense/exact systems, not the hybrid's quality.",
             "",
             "\"peak GPU GiB\": `torch.cuda.max_memory_allocated()` over the system's load and runs for this engine "
             "and transformers (tensors torch allocated, not its reserved cache); for llama.cpp (marked *), which "
             "allocates outside torch in its own child process, the device-wide use read by `nvidia-smi`: the most "
             "memory in use after loading and after each run, minus what was in use before loading (its weights, "
             "KV cache, compute buffers and CUDA context).",
             ""]
    if res.get("checks"):
        lines += ["## Targets (issue 7)", ""] + [f"- {c}" for c in res["checks"]] + [""]
    bw = res.get("bandwidth") or {}
    if bw:
        lines += ["## Bandwidths measured in this run", ""] + [f"- {k}: {_f(v, '.1f') if isinstance(v, float) else v}"
                                                             for k, v in bw.items()] + [""]
    lines += ["## Machine", "", format_machine(res.get("device", {})), ""]
    if m.get("synthetic") and m.get("profile"):
        lines += ["## Sparsity profile", "", format_sparsity_profile(m), ""]
    if m:
        lines += ["## Model", "", format_model(m), ""]
        if m.get("construction"):
            lines += ["Construction of the synthetic model (bench/synthetic.py):", "", m["construction"], ""]
    prof = [r for r in res["systems"] if r.get("profile_time")]
    for r in prof:
        pt = r["profile_time"]
        title = "CUDA-graphed step" if pt.get("kind") == "graphed" else "eager step, phase timers"
        lines += [f"## Decode time breakdown ({r['system']}, {title})", "", "```", format_any_profile(pt, True),
                  "```", ""]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    lines += ["## Reference figures (issue 7: H100 machine, 7B shape, random weights; NOT this run)", ""] + \
             [f"- {k}: {v} tok/s" for k, v in REFERENCE_FIGURES.items()] + [""]
    if res.get("phases"):
        lines += ["## Where the time went", ""] + [f"- {k}: {v:.1f} s" for k, v in res["phases"].items()] + [""]
    return "\n".join(lines)


def write_plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in res["systems"] if r.get("status") == "ok"]
    sweep = [p for p in res.get("sweep") or [] if p.get("decode_tps")]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [r["system"] + (f"\n{r['budget_gib']:g} GiB" if r.get("budget_gib") else "") for r in ok]
    ax.bar(names, [r["decode_tps"] for r in ok], color=["tab:orange" if "hybrid" in r["system"] else "tab:blue"
                                                        for r in ok])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{res.get('model', {}).get('name', '')}: decode, batch 1")
    ax.tick_params(axis="x", labelsize=7)
    if sweep:
        ax2 = axes[0][1]
        for name, color in (("hybrid", "tab:orange"), ("dense-offload", "tab:blue")):
            pts = sorted((p["budget_gib"], p["decode_tps"]) for p in sweep if p["system"] == name)
            if pts:
                ax2.plot(*zip(*pts), marker="o", label=name, color=color)
        ax2.set_xlabel("GPU budget (GiB)")
        ax2.set_ylabel("decode tokens/s")
        ax2.set_title("tokens/s vs GPU budget")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
