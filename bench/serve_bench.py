"""`hybrid-run serve` under load: time to first token and tokens/s per client at 1, 4 and 8 concurrent clients.

The server runs in this process on 127.0.0.1 (an ephemeral port); each client is a thread with the official
`openai` client sending one streaming chat request (the same prompt length and `max_tokens` for all,
greedy; a model may stop at EOS earlier, so the completion length is reported). Requests are served one at a time in arrival order (batch 1), so with N clients the k-th waits
for the k-1 before it: the table shows that queueing directly.

    python -m bench.serve_bench                        # the demo model on the CPU
    python -m bench.serve_bench --model DIR --device cuda --gpu-memory 8GiB
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path


def run_clients(base_url: str, model: str, n: int, max_tokens: int, prompt: str) -> list[dict]:
    import openai
    out: list[dict] = [None] * n      # type: ignore[list-item]
    start = threading.Barrier(n)

    def one(i: int) -> None:
        c = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        start.wait()
        t0 = time.perf_counter()
        first, pieces, usage = None, 0, None
        for ev in c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"{prompt} ({i})"}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
            if ev.usage is not None:
                usage = ev.usage
            for ch in ev.choices:
                if ch.delta.content:
                    first = first or time.perf_counter()
                    pieces += 1
        t1 = time.perf_counter()
        toks = usage.completion_tokens if usage else pieces
        out[i] = {"ttft_s": (first or t1) - t0, "total_s": t1 - t0, "completion_tokens": toks,
                  "tokens_per_s": (toks - 1) / (t1 - first) if first and toks > 1 and t1 > first else None}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Model directory (default: the demo model).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    from hybrid_runtime.cli import PLAIN_CHAT_TEMPLATE
    from hybrid_runtime.server import ModelServer
    from hybrid_runtime.session import open_model
    lm = open_model(args.model, device=args.device, threads=args.threads, gpu_memory=args.gpu_memory)
    srv = ModelServer(("127.0.0.1", 0), lm, lm.path.name,
                      getattr(lm.tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    prompt = "Tell me about the sea and the ships that sail on it"
    run_clients(base, lm.path.name, 1, 8, prompt)                      # warm-up: kernels, caches
    res = {"model": str(lm.path), "device": args.device, "mode": lm.mode, "date": time.strftime("%Y-%m-%d"),
           "max_tokens": args.max_tokens, "torch_threads": __import__("torch").get_num_threads(), "rows": []}
    for n in [int(c) for c in args.clients.split(",")]:
        per = run_clients(base, lm.path.name, n, args.max_tokens, prompt)
        tps = [p["tokens_per_s"] for p in per if p["tokens_per_s"]]
        row = {"clients": n, "ttft_s_median": statistics.median(p["ttft_s"] for p in per),
               "ttft_s_max": max(p["ttft_s"] for p in per),
               "tokens_per_s_per_client_median": statistics.median(tps) if tps else None,
               "completion_tokens": sum(p["completion_tokens"] for p in per),
               "wall_s": max(p["total_s"] for p in per), "per_client": per}
        row["aggregate_tokens_per_s"] = row["completion_tokens"] / row["wall_s"]
        res["rows"].append(row)
        print(f"{n} clients: TTFT median {row['ttft_s_median']:.3f} s (max {row['ttft_s_max']:.3f}), "
              f"{row['tokens_per_s_per_client_median']:.1f} tok/s per client while decoding, "
              f"{row['aggregate_tokens_per_s']:.1f} tok/s aggregate")
    srv.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{'cpu' if args.device == 'cpu' else args.device}-{res['date']}-serve"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# `hybrid-run serve` under load: {Path(res['model']).name}, {args.device}, {res['date']}", "",
             f"Streaming chat requests, greedy, max_tokens {args.max_tokens}, all clients start together; "
             "one request decodes at a time (batch 1, first come first served).", "",
             "| clients | TTFT median | TTFT max | tok/s per client while decoding | aggregate tok/s |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['clients']} | {r['ttft_s_median']:.3f} s | {r['ttft_s_max']:.3f} s | "
                     f"{r['tokens_per_s_per_client_median']:.1f} | {r['aggregate_tokens_per_s']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
