"""One llama.cpp system in its own process (bench/run_bench.py's llamacpp-* systems).

On the H100 machine's image, loading a model with llama-cpp-python segfaults (in llama_model::print_info,
inside ostream code) in any process that has imported torch, with or without a CUDA context; fresh processes,
also next to another process holding a CUDA context, load it fine (bench/llamacpp_diag.sh, 2026-11-23). So
llama.cpp runs here, in a child that imports no torch (stdlib + llama_cpp, then numpy), and talks JSON lines
over stdin/stdout:

    -> {"gguf": PATH, "n_gpu_layers": -1, "n_ctx": 64, "n_batch": 512, "threads": 8,
        "flash_attn": true, "require_gpu_offload": true, "measure_gpu": true}            (load)
    <- {"ok": true, "event": "loaded", "load_s": .., "llama_cpp_python": "0.3.36", "gpu_used_mib": ..,
        "gpu_used_before_mib": .., "gpu_used_after_load_mib": .., "rss_peak_gib": .., "torch_imported": false}
    -> {"prompt": [ids], "n_new": N, "runs": R}                                         (any number of these)
    <- {"ok": true, "event": "runs", "runs": [{"prefill_s", "decode_s", "decode_steps", "prompt_tokens",
        "tokens"}, ...], "gpu_used_mib": .., "rss_peak_gib": ..}
    (end of stdin: exit 0)

Every run: reset (the next eval drops the KV cache from position 0), the prompt ids evaluated as one
batch (prefill; ends with the first token's logits), then one eval([token]) per decode step. Greedy =
argmax of the LAST position's logits read with llama_get_logits_ith(ctx, -1): with logits_all off,
llama-cpp-python 0.3.x no longer copies logits into Llama.scores, so scores[n_tokens - 1] is a stale
row of zeros (argmax 0). EOS is never checked: every run generates exactly n_new tokens.

gpu_used_mib is device-wide (nvidia-smi, summed over the GPUs it lists): the most seen after load and
after each request, minus what was in use before the load, so it includes llama.cpp's CUDA context and
buffers but not the parent's. null when nvidia-smi is absent or measure_gpu is false.

An error is one JSON line {"ok": false, "error": "...", "skip": bool} and exit status 1 (skip: the system
cannot run here, e.g. a build without GPU offload). Reproduce a bench system by hand:

    printf '%s\\n' '{"gguf": "m.gguf", "n_gpu_layers": -1, "n_ctx": 128}' '{"prompt": [1, 2, 3], "n_new": 8}' \\
        | python -m bench.llamacpp_child
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

MiB = 1024 ** 2
GiB = 1024 ** 3


class ChildError(Exception):
    def __init__(self, msg: str, skip: bool = False):
        super().__init__(msg)
        self.skip = skip


def gpu_used_mib() -> float | None:
    """Device memory in use on every GPU nvidia-smi lists, summed (MiB); None where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        return float(sum(float(v) for v in out.stdout.split()))
    except ValueError:
        return None


def rss_peak_gib() -> float | None:
    """This process's peak resident set (VmHWM), GiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return None


class LlamaCppSystem:
    """A loaded Llama and the greedy loop the bench times."""

    def __init__(self, req: dict):
        # llama_cpp before numpy: the order of a plain `python -c "import llama_cpp"`, which loaded fine on
        # the H100 machine where this child (numpy first) segfaulted (2026-11-23, first llama.cpp build there)
        import llama_cpp
        import numpy as np
        self.llama_cpp, self.np = llama_cpp, np
        gguf = req.get("gguf")
        if not isinstance(gguf, str) or not os.path.isfile(gguf):
            raise ChildError(f"request field 'gguf': no such file {gguf!r}")
        if req.get("require_gpu_offload") and not llama_cpp.llama_supports_gpu_offload():
            raise ChildError("llama-cpp-python was built without GPU offload (rebuild with CMAKE_ARGS=-DGGML_CUDA=on; "
                             "see bench/build_llamacpp_device.sh)", skip=True)
        self.measure_gpu = bool(req.get("measure_gpu", False))
        self.gpu_before = gpu_used_mib() if self.measure_gpu else None
        self.gpu_peak = self.gpu_before
        threads = int(req.get("threads") or os.cpu_count() or 1)
        t0 = time.perf_counter()
        kw = {}
        if "op_offload" in req:
            kw["op_offload"] = bool(req["op_offload"])
        self.llm = llama_cpp.Llama(model_path=gguf, n_gpu_layers=int(req.get("n_gpu_layers", 0)),
                                   n_ctx=int(req.get("n_ctx", 512)), n_batch=int(req.get("n_batch", 512)),
                                   n_threads=threads, n_threads_batch=threads, logits_all=False,
                                   flash_attn=bool(req.get("flash_attn", False)), verbose=False, **kw)
        self.load_s = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()
        self.gpu_after_load = self._sample_gpu()

    def _sample_gpu(self) -> float | None:
        if not self.measure_gpu:
            return None
        used = gpu_used_mib()
        if used is not None:
            self.gpu_peak = used if self.gpu_peak is None else max(self.gpu_peak, used)
        return used

    def gpu_used(self) -> float | None:
        """Most device memory seen in use since before the load, minus what was in use before it (MiB)."""
        if self.gpu_before is None or self.gpu_peak is None:
            return None
        return self.gpu_peak - self.gpu_before

    def next_token(self) -> int:
        """Greedy token from the last evaluated position's logits (waits for the GPU)."""
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))   # (V,)
        return int(logits.argmax())

    def generate(self, prompt: list[int], n_new: int) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self.next_token()
        t1 = time.perf_counter()
        tokens = [tok]
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = self.next_token()
            tokens.append(tok)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": max(t2 - t1, 1e-9), "decode_steps": n_new - 1,
                "prompt_tokens": len(prompt), "tokens": tokens}

    def handle(self, req: dict) -> dict:
        prompt, n_new, runs = req.get("prompt"), req.get("n_new"), req.get("runs", 1)
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ChildError("request field 'prompt': expected a non-empty list of token ids")
        if not all(0 <= t < self.n_vocab for t in prompt):
            raise ChildError(f"request field 'prompt': token ids must be in [0, {self.n_vocab})")
        if not isinstance(n_new, int) or n_new < 1 or not isinstance(runs, int) or runs < 1:
            raise ChildError("request fields 'n_new' and 'runs': expected positive integers")
        if len(prompt) + n_new > self.llm.n_ctx():
            raise ChildError(f"prompt ({len(prompt)}) + n_new ({n_new}) exceed n_ctx ({self.llm.n_ctx()})")
        results = [self.generate(prompt, n_new) for _ in range(runs)]
        self._sample_gpu()
        return {"ok": True, "event": "runs", "runs": results, "gpu_used_mib": self.gpu_used(),
                "rss_peak_gib": rss_peak_gib()}


def _read_request(line: str) -> dict:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise ChildError(f"request is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise ChildError("request is not a JSON object")
    return req


def main() -> int:
    # stdout carries the protocol only: keep the real stdout for it and point fd 1 at stderr, so that
    # anything llama.cpp / ggml prints from C cannot corrupt it
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        first = sys.stdin.readline()
        if not first.strip():
            raise ChildError("no load request on stdin")
        system = LlamaCppSystem(_read_request(first))
        reply({"ok": True, "event": "loaded", "load_s": system.load_s,
               "llama_cpp_python": getattr(system.llama_cpp, "__version__", "?"), "n_vocab": system.n_vocab,
               "gpu_used_before_mib": system.gpu_before, "gpu_used_after_load_mib": system.gpu_after_load,
               "gpu_used_mib": system.gpu_used(), "rss_peak_gib": rss_peak_gib(),
               "torch_imported": "torch" in sys.modules})
        for line in sys.stdin:
            if line.strip():
                reply(system.handle(_read_request(line)))
    except ChildError as e:
        reply({"ok": False, "error": str(e), "skip": e.skip})
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reply({"ok": False, "error": f"{type(e).__name__}: {msg}", "skip": False})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
