"""One command, every system, one table: the hybrid runtime against dense baselines.

    python -m bench.run_bench --out $OUT                  # GPU machine: synthetic 7B, every GPU system
    python -m bench.run_bench --model synthetic-tiny      # CPU smoke run (what CI does, smaller still)
    hybrid-run bench ...                                  # the same command (bench/cli_bench.py)

Every system runs on the same model (weights, prompt, machine) in one process, one after the
other; each is loaded, warmed up (a short generation: compilation, graph capture, caches), then
timed on `runs` generations of `new_tokens` greedy tokens from a `prompt_tokens` prompt (batch 1;
EOS is ignored so every run generates exactly that many tokens). The table reports medians.

Systems (`--systems`, comma list; `auto`: the GPU set with CUDA, the CPU set without):
  dense-gpu      this engine, dense, whole model on the GPU, decode step replayed as a CUDA graph
  hybrid         hybrid runtime under --gpu-memory (predictor mode; placement solver, Numba cold rows)
  dense-offload  this engine, dense, layer offload under --gpu-memory: first N layers on the GPU, the
                 rest on the CPU (llama.cpp's -ngl), CPU layers in the fastest dense CPU dtype measured
  hybrid-gpu     hybrid runtime with every neuron on the GPU (predictor mode, sparse kernels if built)
  hf-gpu         transformers generate(), whole model on the GPU
  hf-offload     transformers + accelerate, device_map="auto", max_memory={GPU: --gpu-memory}
  llamacpp-gpu / llamacpp-offload   llama.cpp (llama-cpp-python) when importable, else skipped; it runs
                 in a child process (bench/llamacpp_child.py: no torch in it), a crash is a failed row
  dense-cpu, hybrid-cpu, hf-cpu     the CPU-only counterparts (the default without CUDA)
  llamacpp-cpu   llama.cpp with every layer on the CPU and no GPU visible to it (not in a default set)

Physical limits: the bandwidths are measured in the same run (GPU device-to-device copy counting
bytes read + written; CPU multi-threaded read of a buffer larger than the last-level cache;
pinned host<->device copies). Per system, the bytes one decode token must read on each side
(weights; KV cache at the mean position; for the hybrid the predicted-active rows: a predicted
neuron costs its gate row, and its up and down rows when it fires, estimated with the
predictors' measured precision) divided by those bandwidths give the fastest possible ms/token;
"achieved" is measured / limit. Hybrid per layer: attention, predictor and lm_head on the GPU in
sequence, the hot and cold FFN halves overlapped (max of the two).

Time budget: the script prints timestamped progress, writes the results after every system
(a timeout still leaves them in --out), and skips what no longer fits in --time-budget-s (its
least time estimated before it starts) or shortens it (fewer runs, then one shorter run), saying
so in the table's notes.

Disk: free space is checked before every large write (synthetic build, GGUF); a 13B build on a
64 GiB disk runs the llama.cpp systems before the hybrid directory is written and deletes the
GGUF after them (bench/README.md, "Disk"); --clean-work drops other cached builds first.

--profile-time on CUDA profiles the CUDA-graphed hybrid step the runtime really decodes with
(`HybridGraphedDecodeStep.profiled_call`): host time per call, GPU time per segment, the cold
FFN's selected / firing neurons and its in-situ read rate.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.errors import UserError, check_number, check_output_path  # noqa: E402
from bench.options import (BenchLog, BenchOptions, GiB, PROMPT_TEXT, SYNTHETIC_PREFIX, SYSTEMS,
                           parse_budgets, parse_systems)  # noqa: E402
from bench.limits import (_parallel_sum, free_memory, measure_cpu_matvec, measure_cpu_read_bw,
                          measure_gpu_bw, pick_cpu_dtype)  # noqa: E402
from bench.systems import Ctx, drop_gguf, min_system_seconds, run_sweep, run_system  # noqa: E402
from bench.report import (_f, _note_cold_format, checks, device_info, format_model, format_tables,
                          numba_runtime_info, result_stem, speedups, write_results)  # noqa: E402

# --------------------------------------------------------------------------------------- main


def _prewarm(cuda: bool, log: BenchLog) -> threading.Thread:
    """Compile the Numba kernels (and JIT-build the CUDA extension) in the background while the
    model is built: their first-use cost stays out of the pipeline's critical path."""
    def work():
        t0 = time.perf_counter()
        try:
            from hybrid_runtime.cpu_ffn import ColdFFN, ColdRows
            w = torch.randn(8, 64).to(torch.bfloat16)
            ffn = ColdFFN(ColdRows.from_torch(w, w, w, fmt="bf16"), "relu")
            x = np.random.rand(64).astype(np.float32)
            ffn.decode(x, np.arange(8, dtype=np.int32), np.empty(64, np.float32))
            ffn.batch(np.random.rand(2, 64).astype(np.float32), np.arange(8, dtype=np.int32),
                      np.empty((2, 64), np.float32))
            _parallel_sum(np.ones(16, np.float32))
            msg = f"prewarm: Numba kernels ready in {time.perf_counter() - t0:.1f} s"
            if cuda:
                from hybrid_runtime import kernels
                kernels.cuda_kernels_ready()
                msg += f"; {kernels.kernel_status()} ({time.perf_counter() - t0:.1f} s)"
            log(msg)
        except Exception as e:  # reported; the systems will hit (and report) the same problem
            log(f"prewarm failed: {type(e).__name__}: {e}")
    th = threading.Thread(target=work, name="bench-prewarm", daemon=True)
    th.start()
    return th


def _synthetic_configs(opts: BenchOptions, cuda: bool):
    """(name, SyntheticConfig, PipelineConfig) of a synthetic --model, or None for a model directory."""
    from bench.synthetic import SHAPES, shape_configs
    name = opts.model
    if name == "auto":
        name = SYNTHETIC_PREFIX + ("7b" if cuda else "small")
    if not name.startswith(SYNTHETIC_PREFIX):
        return None
    shape = name[len(SYNTHETIC_PREFIX):]
    if shape not in SHAPES:
        raise UserError(f"--model {name}: unknown synthetic shape (choose from "
                        f"{', '.join(SYNTHETIC_PREFIX + s for s in SHAPES)}, or a model directory)")
    over = dict(opts.pipeline)
    if opts.target_density is not None:
        over["mean_density"] = opts.target_density
    if opts.freq_sigma is not None:
        over["freq_sigma"] = opts.freq_sigma
    syn, pipe = shape_configs(shape, seed=opts.seed, sparsity_profile=opts.sparsity_profile, **over)
    return name, syn, pipe


def _prepare_synthetic(opts: BenchOptions, name: str, syn, pipe, cuda: bool, log: BenchLog, phases: dict,
                       before_pack=None):
    """Build (or reuse) the synthetic model -> (model record, hf_dir, dense_dir, hybrid_dir, precision)."""
    from bench.synthetic import prepare_bench_model
    log(f"model: synthetic {syn.name} (d={syn.dim}, f={syn.ffn_dim}, {syn.n_layers} layers, "
        f"{syn.n_params() / 1e9:.2f} B params), sparsity profile {syn.sparsity_profile} (mean density "
        f"{syn.mean_density}, sigma {syn.freq_sigma}); pipeline {asdict(pipe)}")

    def on_phase(n, s):
        phases[f"model: {n}"] = s
        log(f"model: {n} done in {s:.1f} s")
    bm = prepare_bench_model(syn, pipe, Path(opts.work), "cuda" if cuda else "cpu", rebuild=opts.rebuild,
                             progress=False, on_phase=on_phase, before_pack=before_pack)
    man = bm.manifest
    record = {"name": name, "path": str(bm.work), "synthetic": man["synthetic"], "pipeline": man["pipeline"],
              "construction": man["construction"], "build": man["build"],
              "profile": {k: v for k, v in man["profile"].items() if k != "layers"},
              "predictors": {k: v for k, v in man["predictors"].items() if k != "per_layer"},
              "pipeline_phases_s": man["phases"], "reused": "model: build+calibrate" not in phases}
    return record, bm.hf_dir, bm.hf_dir, bm.hybrid_dir, man["predictors"]["precision"]


def _resolve_dir(opts: BenchOptions, log: BenchLog):
    """A model directory -> (model record, hf_dir, dense_dir, hybrid_dir, prompt ids, predictor precision)."""
    from bench.synthetic import SHAPES
    path = Path(opts.model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"--model {opts.model}: not a model directory (no config.json) and not one of "
                        f"{', '.join(SYNTHETIC_PREFIX + s for s in SHAPES)}")
    from hybrid_runtime.loading import load_tokenizer
    from hybrid_runtime.model_dir import open_model_dir
    hybrid_dir, hf_dir, precision = None, path, None
    meta = open_model_dir(path).hybrid
    if meta is not None:
        hybrid_dir = path
        src = Path(meta.raw.get("source_model", ""))
        hf_dir = src if (src / "config.json").is_file() else None
        layers = meta.raw.get("layers") or []
        precs = [lay["precision"] for lay in layers if isinstance(lay, dict) and "precision" in lay]
        precision = float(np.mean(precs)) if precs else None
        if hf_dir is None:
            log.note(f"the hybrid directory's source checkpoint {src} is not here: transformers systems are skipped, "
                     "the dense engine loads the hybrid directory")
    tok = load_tokenizer(path)
    ids = tok(PROMPT_TEXT * (1 + opts.prompt_tokens // 40), add_special_tokens=True).input_ids[:opts.prompt_tokens]
    record = {"name": path.name, "path": str(path)}
    return record, hf_dir, hf_dir or path, hybrid_dir, ids, precision


def hybrid_min_budget_for(cfg, predictor_file_bytes: int, context: int) -> int:
    """GPU bytes the hybrid needs before any FFN neuron (the placement solver's fixed part); the
    predictors are stored fp32 and run in the 16-bit model dtype (half the file)."""
    from hybrid_runtime.placement import ModelShape, solve_placement
    from hybrid_runtime.session import WORKSPACE_BYTES
    pred = predictor_file_bytes // cfg.n_layers // 2
    p = solve_placement(ModelShape.from_config(cfg), [np.zeros(cfg.layer_neurons)] * cfg.n_layers, 2 ** 62,
                        context=context, predictor_bytes=pred, workspace_bytes=WORKSPACE_BYTES)
    return int(sum(p.fixed_bytes.values()))


def hybrid_min_budget(hybrid_dir: Path, context: int) -> int:
    from hybrid_runtime.model_dir import open_model_dir
    md = open_model_dir(hybrid_dir)
    pred = md.hybrid.predictors_file
    return hybrid_min_budget_for(md.config, pred.stat().st_size if pred else 0, context)


def _check_budgets(opts: BenchOptions, systems: list[str], budget: int, cfg, min_budget: int | None) -> None:
    """UserError when --gpu-memory is below what a requested budgeted system needs (before any build)."""
    budgeted = [s for s in systems if SYSTEMS[s].budgeted]
    if "hybrid" in budgeted and min_budget is not None and budget < min_budget:
        raise UserError(f"--gpu-memory {opts.gpu_memory} is below the minimum for the hybrid on this model: "
                        f"{math.ceil(min_budget / GiB * 100) / 100:.2f} GiB (embeddings, lm_head, attention, KV cache, "
                        "predictors, workspace)")
    if budgeted and budget < offload_layers_min(cfg):
        raise UserError(f"--gpu-memory {opts.gpu_memory} is below the minimum for layer offload on this model: "
                        f"{math.ceil(offload_layers_min(cfg) / GiB * 100) / 100:.2f} GiB (embeddings, lm_head, workspace)")


def run_bench(opts: BenchOptions) -> dict:
    """The whole benchmark; returns the results dict (also written to opts.out)."""
    from hybrid_runtime.placement import parse_size
    from hybrid_runtime.session import set_threads
    log = BenchLog(opts.time_budget_s)
    cuda = torch.cuda.is_available()
    for name, v, lo in (("--prompt-tokens", opts.prompt_tokens, 2), ("--new-tokens", opts.new_tokens, 2),
                        ("--runs", opts.runs, 1), ("--sweep-new-tokens", opts.sweep_new_tokens, 2)):
        if v < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}")
    systems = parse_systems(opts.systems, cuda)
    budgets = parse_budgets(opts.sweep)
    budget = parse_size(opts.gpu_memory)
    if budget <= 0:
        raise UserError(f"--gpu-memory must be positive, got {opts.gpu_memory!r}")
    if opts.cold_format not in ("auto", "bf16", "fp16", "int8"):
        raise UserError(f"--cold-format must be auto, bf16, fp16 or int8, got {opts.cold_format!r}")
    check_number("--time-budget-s", opts.time_budget_s, low=0, low_open=True)
    check_number("--target-density", opts.target_density, low=0, high=1, low_open=True, high_open=True)
    if not (opts.model == "auto" or opts.model.startswith(SYNTHETIC_PREFIX)
            or (Path(opts.model).expanduser() / "config.json").is_file()):
        raise UserError(f"--model {opts.model}: not a model directory (no config.json) and not a synthetic shape "
                        f"({SYNTHETIC_PREFIX}<shape>)")
    model_input = [("--model", opts.model)] if Path(opts.model).expanduser().exists() else []
    check_output_path(opts.out, model_input)
    check_output_path(opts.work, model_input, what="--work")
    set_threads(opts.threads)
    synthetic = _synthetic_configs(opts, cuda)
    log(f"bench: systems {', '.join(systems)}; budget {budget / GiB:g} GiB; prompt {opts.prompt_tokens}, "
        f"new {opts.new_tokens}, runs {opts.runs}; time budget {opts.time_budget_s:.0f} s; CUDA {cuda}")
    if not cuda:
        skipped = [s for s in systems if SYSTEMS[s].needs_cuda]
        if skipped:
            log(f"no CUDA: skipping the GPU systems ({', '.join(skipped)}); the CPU systems still run")
    phases: dict[str, float] = {}
    date = time.strftime("%Y-%m-%d")
    res: dict = {"format": "hybrid-bench-results", "version": 1, "date": date, "complete": False,
                 "device": device_info(cuda, opts.work), "systems": [], "phases": phases,
                 "settings": {k: v for k, v in asdict(opts).items()}}
    out_dir = Path(opts.out)
    stem = result_stem(res)
    if (out_dir / f"{stem}.json").exists() and not opts.force:
        stem += time.strftime("-%H%M%S")
    prewarm = _prewarm(cuda, log)
    try:
        return _run(opts, log, cuda, systems, budgets, budget, phases, res, stem, prewarm, synthetic)
    finally:
        prewarm.join(timeout=60)   # an early error: let the background compile finish quietly


def _run(opts: BenchOptions, log: BenchLog, cuda: bool, systems: list[str], budgets: list[float], budget: int,
         phases: dict, res: dict, stem: str, prewarm: threading.Thread, synthetic) -> dict:
    from hybrid_runtime.model_dir import open_model_dir
    out_dir = Path(opts.out)
    n_ctx = max(opts.new_tokens, opts.profile_tokens, opts.sweep_new_tokens) + 8
    rows_done: dict[str, dict] = {}      # systems run before the main loop (disk: llama.cpp before the pack)

    def ensure_bandwidths() -> None:
        """Measured once, after the background compile (it would compete for the CPU)."""
        if "bandwidth" in res:
            return
        t = time.perf_counter()
        prewarm.join()
        phases["wait for prewarm"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        nbytes = 1 * GiB if cuda else 512 * 1024 ** 2   # past the last-level cache (260 MiB on the dev VM)
        bw = {"cpu_read_GBps": measure_cpu_read_bw(nbytes), "cpu_read_buffer_bytes": nbytes}
        res["device"].update(numba_runtime_info())     # the threading layer is known after a parallel call
        if cuda:
            bw.update(measure_gpu_bw(1 * GiB))
            free_memory(True)
        mv = measure_cpu_matvec(cfg.dim, cfg.ffn_dim, 640 * 1024 ** 2 if cuda else 32 * 1024 ** 2)
        bw.update({f"cpu_matvec_{k}_GBps": v for k, v in mv.items()})
        cpu_dtype, cpu_gbps = pick_cpu_dtype(mv)
        bw["dense_cpu_dtype"] = cpu_dtype
        phases["bandwidths"] = round(time.perf_counter() - t, 2)
        res["bandwidth"] = bw
        write_results(res, out_dir, stem, final=False, log=log)
        log("bandwidths: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in bw.items()))
        log(f"dense CPU path: torch {cpu_dtype} matvec ({cpu_gbps:.1f} GB/s; "
            + ", ".join(f"{k} {_f(v)} GB/s" for k, v in mv.items()) + ") -> CPU layers of dense-offload in "
            + cpu_dtype + f"; dense-cpu, hybrid-cpu: --cpu-format {opts.cpu_format} (one Numba call a token)")
        log(f"CPU: {res['device'].get('cpu')}; numba {res['device'].get('numba_threads')} threads, threading layer "
            f"{res['device'].get('numba_threading_layer')}; fp16 widening {res['device'].get('numba_fp16_widening')}")

    def make_ctx(hf_dir, dense_dir, hybrid_dir, precision) -> Ctx:
        ensure_bandwidths()
        return Ctx(opts, log, cuda, torch.device("cuda" if cuda else "cpu"), hf_dir, dense_dir, hybrid_dir, prompt,
                   context, budget, res["bandwidth"], res["bandwidth"]["dense_cpu_dtype"], precision, cfg)

    t = time.perf_counter()
    if synthetic is not None:
        from bench.synthetic import disk_sizes, hf_config, prompt_token_ids, work_dir
        from hybrid_runtime.model import ModelConfig
        name, syn, pipe = synthetic
        cfg = ModelConfig.from_hf(hf_config(syn))
        prompt = prompt_token_ids(opts.prompt_tokens, syn.vocab_size, opts.seed)
        context = len(prompt) + n_ctx
        sizes = disk_sizes(syn, pipe)
        min_budget = hybrid_min_budget_for(cfg, sizes["hybrid"] - 2 * syn.n_params(), context)
        _check_budgets(opts, systems, budget, cfg, min_budget)
        if opts.clean_work:
            _clean_work(opts, log, keep=work_dir(syn, pipe, Path(opts.work)))

        def before_pack(bm) -> None:   # disk: run llama.cpp while only the checkpoint is on disk
            ctx0 = None
            for n in _llamacpp_before_pack(opts, cuda, systems, bm, sizes, log):
                ctx0 = ctx0 or make_ctx(bm.hf_dir, bm.hf_dir, None, None)
                rows_done[n] = _run_one(ctx0, n, systems, rows_done, phases)
                res["systems"][:] = [rows_done[s] for s in systems if s in rows_done]
                write_results(res, out_dir, stem, final=False, log=log)
            if ctx0 is not None:
                drop_gguf(ctx0, "the hybrid directory is written next and both do not fit")
        record, hf_dir, dense_dir, hybrid_dir, precision = _prepare_synthetic(opts, name, syn, pipe, cuda, log,
                                                                              phases, before_pack)
    else:
        if opts.sparsity_profile != "prosparse" or opts.target_density is not None or opts.freq_sigma is not None:
            log.note("--sparsity-profile / --target-density / --freq-sigma apply to synthetic models only: ignored")
        if opts.clean_work:
            _clean_work(opts, log, keep=None)
        record, hf_dir, dense_dir, hybrid_dir, prompt, precision = _resolve_dir(opts, log)
        cfg = open_model_dir(dense_dir).config
        context = len(prompt) + n_ctx
        min_budget = hybrid_min_budget(hybrid_dir, context) if hybrid_dir is not None else 0
        _check_budgets(opts, systems, budget, cfg, min_budget if hybrid_dir is not None else None)
    phases["model total"] = round(time.perf_counter() - t, 2)
    res["model"] = record
    ctx = make_ctx(hf_dir, dense_dir, hybrid_dir, precision)
    rows = res["systems"]
    last_llamacpp = max((i for i, s in enumerate(systems) if s.startswith("llamacpp")), default=None)
    for i, name in enumerate(systems):
        row = rows_done.get(name) or _run_one(ctx, name, systems, rows_done, phases)
        rows_done[name] = row
        rows[:] = [rows_done[s] for s in systems if s in rows_done]
        _note_cold_format(res, row)
        if i == last_llamacpp:
            drop_gguf(ctx, None)
        res["speedups"] = speedups(rows)
        res["checks"] = checks(res)
        write_results(res, out_dir, stem, final=False, log=log)
    if budgets and cuda and any(s in systems for s in ("hybrid", "dense-offload")):
        t = time.perf_counter()
        main = {r["system"]: r for r in rows}
        res["sweep"] = []

        def on_point(p):
            res["sweep"].append(p)
            write_results(res, out_dir, stem, final=False, log=log)
        run_sweep(ctx, budgets, main, min_budget, on_point)
        phases["sweep"] = round(time.perf_counter() - t, 2)
    elif budgets and not cuda:
        log("sweep skipped: needs CUDA")
    res["speedups"] = speedups(rows)
    res["checks"] = checks(res)
    res["complete"] = True
    phases["total"] = round(log.elapsed(), 2)
    paths = write_results(res, out_dir, stem, final=True, log=log)
    table = format_tables(res)
    print(format_model(res["model"]))
    print(table)
    for c in res["checks"]:
        print("check: " + c)
    log("results: " + ", ".join(str(p) for p in paths.values()))
    res["paths"] = {k: str(v) for k, v in paths.items()}
    res["table"] = table
    return res


def _run_one(ctx: Ctx, name: str, systems: list[str], rows_done: dict, phases: dict) -> dict:
    """One system of the main list under the time budget: skipped with a note when even its minimum
    (load, warm-up, one short run) would not fit; else it gets a share of what is left."""
    log = ctx.log
    spec = SYSTEMS[name]
    left = [s for s in systems if s not in rows_done]
    need = min_system_seconds(ctx, name)
    runnable = ctx.cuda or not spec.needs_cuda          # (run_system reports the others at once)
    if runnable and log.remaining() < need + 5:
        reason = f"time budget: ~{need:.0f} s needed, {max(log.remaining(), 0):.0f} s left"
        log.note(f"{name} skipped ({reason})")
        return {"system": name, "description": spec.description, "status": "skipped", "reason": reason,
                "budget_gib": ctx.budget / GiB if spec.budgeted else None, "notes": []}
    t = time.perf_counter()
    share = (log.remaining() - 10) / max(len(left), 1)    # slow systems may use more than an equal share
    row = run_system(ctx, name, budget_s=min(max(30.0, 1.6 * share), log.remaining() - 10))
    phases[f"system {name}"] = round(time.perf_counter() - t, 2)
    return row


def _clean_work(opts: BenchOptions, log: BenchLog, keep: Path | None) -> None:
    from bench.synthetic import clean_work, free_bytes
    removed = clean_work(Path(opts.work), keep)
    for path, size in removed:
        log(f"--clean-work: removed {path} ({size / GiB:.1f} GiB)")
    log(f"--clean-work: {len(removed)} cached build(s) removed; {free_bytes(Path(opts.work)) / GiB:.1f} GiB free "
        f"in {opts.work}")


def _llamacpp_before_pack(opts: BenchOptions, cuda: bool, systems: list[str], bm, sizes: dict,
                          log: BenchLog) -> list[str]:
    """The llama.cpp systems to run before the hybrid directory is written: when the checkpoint, the
    hybrid directory and the GGUF do not fit on the disk together but the GGUF fits now (13B on a
    64 GiB disk). Empty when they all fit (the normal order), or llama.cpp cannot run here anyway."""
    from bench.synthetic import free_bytes, need_with_margin
    names = [s for s in systems if s.startswith("llamacpp")]
    if not names or not cuda or importlib.util.find_spec("llama_cpp") is None \
            or importlib.util.find_spec("gguf") is None:
        return []
    free = free_bytes(bm.work)
    if free >= need_with_margin(sizes["gguf"] + sizes["hybrid"]):
        return []
    if free < need_with_margin(sizes["gguf"]):
        return []     # the export's own disk check skips them with the numbers
    log(f"disk: the GGUF ({sizes['gguf'] / GiB:.1f} GiB) and the hybrid directory ({sizes['hybrid'] / GiB:.1f} GiB) "
        f"do not both fit ({free / GiB:.1f} GiB free): running {', '.join(names)} now, before the pack, then deleting "
        "the GGUF")
    log.note(f"{', '.join(names)} ran before the hybrid directory was packed (disk), i.e. first")
    return names


def offload_layers_min(cfg, wbytes: int = 2) -> int:
    from hybrid_runtime.session import WORKSPACE_BYTES
    return cfg.vocab_size * cfg.dim * wbytes * (1 if cfg.tie_embeddings else 2) + WORKSPACE_BYTES


if __name__ == "__main__":
    from bench.cli_bench import bench
    from hybrid_runtime.errors import console_main
    console_main(bench)
