"""`hybrid-run serve` against the official `openai` client, on 127.0.0.1, tiny model on the CPU.

Streaming and non-streaming text equal this engine's greedy generation for the same prompt; eight
concurrent clients are all answered correctly (one at a time, in arrival order, never sharing a KV
cache); a client that disconnects mid-stream frees the model at once; bad requests get HTTP 400 with an
OpenAI-style error body and the server goes on; SIGTERM stops the `hybrid-run serve` process cleanly.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from hybrid_runtime.session import open_model
    from hybrid_runtime.tiny import build_tiny_model
    path = build_tiny_model(tmp_path_factory.mktemp("srv") / "tiny", seed=3, dim=64, n_layers=2, n_heads=4,
                            n_kv_heads=2, ffn_dim=128, act="relu", max_seq_len=256)
    return open_model(str(path), device="cpu", dtype="float32", context=256)


@pytest.fixture(scope="module")
def server(lm):
    from hybrid_runtime.cli import PLAIN_CHAT_TEMPLATE
    from hybrid_runtime.server import ModelServer
    srv = ModelServer(("127.0.0.1", 0), lm, "tiny", getattr(lm.tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def client(server) -> "openai.OpenAI":
    host, port = server.server_address
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", max_retries=0, timeout=60)


def reference(lm, server, messages=None, prompt=None, max_tokens=16) -> str:
    """What `hybrid-run generate` produces greedily for the same prompt (a fresh cache)."""
    from hybrid_runtime.generate import SamplingParams
    tok = lm.tokenizer
    ids = (tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   chat_template=server.chat_template, return_dict=False)
           if messages is not None else tok(prompt, add_special_tokens=True).input_ids)
    gen = lm.generator()
    return gen.generate(ids, SamplingParams(max_new_tokens=max_tokens, temperature=0.0)).text


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "model": "tiny", "queued": 0}


def test_chat_plain_and_streaming_equal_greedy_generation(lm, server):
    msgs = [{"role": "user", "content": "the cat sat on"}]
    want = reference(lm, server, messages=msgs)
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 16 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, usage = [], None
    for ev in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ev.usage is not None:
            usage = ev.usage
        for ch in ev.choices:
            parts.append(ch.delta.content or "")
    assert "".join(parts) == want and usage is not None and usage.prompt_tokens == r.usage.prompt_tokens


def test_completions_and_stop_and_seed(lm, server):
    c = client(server)
    want = reference(lm, server, prompt="a big red", max_tokens=12)
    r = c.completions.create(model="tiny", prompt="a big red", max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    if len(want) > 3:
        stop = want[2:4]
        r = c.completions.create(model="tiny", prompt="a big red", max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].text == want[:want.index(stop)] and r.choices[0].finish_reason == "stop"
    a = c.completions.create(model="tiny", prompt="a big red", max_tokens=12, temperature=0.9, seed=7).choices[0].text
    b = c.completions.create(model="tiny", prompt="a big red", max_tokens=12, temperature=0.9, seed=7).choices[0].text
    assert a == b


def test_eight_concurrent_clients_all_answered_correctly(lm, server):
    prompts = [f"word {i} and then" for i in range(8)]
    want = {p: reference(lm, server, messages=[{"role": "user", "content": p}], max_tokens=12) for p in prompts}
    got, errors = {}, []

    def ask(p, stream):
        try:
            c = client(server)
            msgs = [{"role": "user", "content": p}]
            if stream:
                got[p] = "".join(ch.delta.content or "" for ev in c.chat.completions.create(
                    model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True) for ch in ev.choices)
            else:
                got[p] = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                                   temperature=0).choices[0].message.content
        except Exception as e:       # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want


def test_a_client_that_disconnects_mid_stream_frees_the_model(lm, server):
    import socket
    host, port = server.server_address
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
                       "temperature": 0.8, "seed": 1, "stream": True}).encode()
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while b"data: " not in seen:
        seen += sock.recv(4096)
    assert seen.startswith(b"HTTP/1.0 200") or seen.startswith(b"HTTP/1.1 200")
    sock.close()                                      # gone after the first event, 200 tokens asked
    t0 = time.perf_counter()
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
    assert r.choices[0].message.content == reference(lm, server, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4)
    assert time.perf_counter() - t0 < 30
    assert server.slot.queued == 0 and server.clients_left == 1   # it stopped early, it did not finish 200 tokens


@pytest.mark.parametrize("body,param", [
    ("{not json", None),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ([1, 2, 3], None),
])
def test_bad_requests_get_400_and_the_server_goes_on(server, body, param):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body if isinstance(body, str) else json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    assert resp.status == 400 and err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


def test_the_serve_command_answers_and_stops_on_sigterm(lm):
    proc = subprocess.Popen([sys.executable, "-c", "from hybrid_runtime.cli import main; main()", "serve",
                             "--model", str(lm.path), "--device", "cpu", "--port", "0", "--context", "128"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        deadline = time.time() + 120
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(m.group(1)) if m else None
        assert port, "the server did not say where it listens"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model=lm.path.name, prompt="the", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "serve: stopping" in proc.stderr.read()
    finally:
        proc.kill()
