"""`llmlab serve`: the HTTP API with plain urllib, in a thread and as a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from llmlab.inference.generation import GenerationSettings, generate_text
from llmlab.inference.loading import load_for_inference
from llmlab.inference.server import InferenceServer

from .conftest import subprocess_env


def _post(url, body, raw=False):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if not raw else body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def _events(body: str) -> list:
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def server(tiny_run):
    model, tok, is_chat = load_for_inference(tiny_run / "sft" / "final")
    srv = InferenceServer(model, tok, is_chat, host="127.0.0.1", port=0, model_id="tiny-sft",
                          defaults=GenerationSettings(max_new_tokens=20))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)
    assert not t.is_alive()


def test_models_and_health(server):
    assert server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
        data = json.loads(r.read())
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny-sft"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_chat_completions_plain_and_streaming(server):
    msgs = [{"role": "user", "content": "Hello"}]
    expected = generate_text(server.model, server.tokenizer, msgs,
                             GenerationSettings(max_new_tokens=12, temperature=0), True)
    status, ctype, body = _post(server.url + "/v1/chat/completions",
                                {"model": "tiny-sft", "messages": msgs, "max_tokens": 12, "temperature": 0})
    resp = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert resp["object"] == "chat.completion" and resp["model"] == "tiny-sft"
    choice = resp["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert resp["usage"]["completion_tokens"] == expected.completion_tokens
    assert resp["usage"]["total_tokens"] == resp["usage"]["prompt_tokens"] + expected.completion_tokens

    status, ctype, body = _post(server.url + "/v1/chat/completions",
                                {"messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert ctype == "text/event-stream"
    ev = _events(body)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for x in content if x) > 1  # streamed in pieces
    assert "".join(content) == expected.text
    assert chunks[-2]["choices"][0]["finish_reason"] == expected.finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == expected.completion_tokens


def test_generate_endpoint_is_seeded(server):
    body = {"prompt": "Hello", "max_new_tokens": 15, "temperature": 1.0, "seed": 4}
    a = json.loads(_post(server.url + "/generate", body)[2])
    b = json.loads(_post(server.url + "/generate", body)[2])
    assert a["text"] == b["text"] and a["completion_tokens"] >= 1
    local = generate_text(server.model, server.tokenizer, "Hello",
                          GenerationSettings(max_new_tokens=15, temperature=1.0, seed=4), True)
    assert a["text"] == local.text
    ev = _events(_post(server.url + "/generate", {**body, "stream": True})[2])
    assert "".join(e["text"] for e in ev if "text" in e) == a["text"]
    assert ev[-1]["done"] is True and ev[-1]["finish_reason"] == a["finish_reason"]


def test_bad_requests(server):
    for path, body, code in [("/v1/chat/completions", b"{not json", 400),
                             ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400),
                             ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                                                  "n": 2}).encode(), 400),
                             ("/generate", json.dumps({"prompt": 3}).encode(), 400),
                             ("/nope", b"{}", 404)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(server.url + path, body, raw=True)
        assert e.value.code == code
        assert "message" in json.loads(e.value.read())["error"]


def test_serve_command_subprocess(tiny_run):
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", str(tiny_run),
                             "--stage", "sft", "--port", "0", "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            # SIGINT handled as in a terminal even under a background pytest (see test_chat._spawn)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        timer = threading.Timer(90, proc.kill)
        timer.start()
        line = proc.stdout.readline()
        timer.cancel()
        assert line.startswith("Serving sft on http://127.0.0.1:"), line + proc.stderr.read() if not line else line
        url = line.split(" on ")[1].split()[0]
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == "sft"
        status, _, body = _post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _error(url, body, raw=False):
    """(status, error object) of a request that must fail."""
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url, body, raw=raw)
    err = json.loads(e.value.read())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return e.value.code, err


def _raw_http(srv, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes (or ``wait`` seconds pass)."""
    import socket

    with socket.create_connection(srv.server_address[:2], timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "Hello"}]


def test_unknown_model_is_404_model_not_found(server):
    status, err = _error(server.url + CHAT, {"model": "gpt-4o", "messages": MSGS})
    assert status == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-4o" in err["message"]


def test_stop_sequences(server):
    full = json.loads(_post(server.url + CHAT, {"messages": MSGS, "max_tokens": 20, "temperature": 0})[2])
    text = full["choices"][0]["message"]["content"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop
    cut = json.loads(_post(server.url + CHAT, {"messages": MSGS, "max_tokens": 20, "temperature": 0,
                                               "stop": [stop, "never-there"]})[2])
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    ev = _events(_post(server.url + CHAT, {"messages": MSGS, "max_tokens": 20, "temperature": 0, "stop": stop,
                                          "stream": True})[2])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in ev[:-1] if c["choices"])
    assert streamed == text[: text.find(stop)]
    status, err = _error(server.url + CHAT, {"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]})
    assert status == 400 and err["param"] == "stop"


def test_a_prompt_is_never_cut(server):
    """max_tokens too large for the context is refused as OpenAI does; without max_tokens the reply is
    capped to what the context leaves and the whole prompt is counted."""
    from llmlab.inference.generation import encode_prompt

    n = len(encode_prompt(server.tokenizer, MSGS, True))
    status, err = _error(server.url + CHAT, {"messages": MSGS, "max_tokens": 256})
    assert status == 400 and err["code"] == "context_length_exceeded" and "256" in err["message"]
    srv_default = server.defaults.max_new_tokens
    server.defaults.max_new_tokens = None
    try:
        resp = json.loads(_post(server.url + CHAT, {"messages": MSGS, "temperature": 0})[2])
    finally:
        server.defaults.max_new_tokens = srv_default
    assert resp["usage"]["prompt_tokens"] == n and 1 <= resp["usage"]["completion_tokens"] <= 256 - n
    long = [{"role": "user", "content": "Hello " * 300}]
    status, err = _error(server.url + CHAT, {"messages": long})
    assert status == 400 and err["code"] == "context_length_exceeded"


def test_concurrent_requests_are_batched(server):
    """Eight greedy requests sent at once are answered in fewer generate calls than requests, each with
    the reply it gets alone."""
    prompts = ["Hello", "How are you?", "What is your name?", "Tell me a joke", "Hi", "Good morning",
               "Who are you?", "What is AI?"]
    expected = [generate_text(server.model, server.tokenizer, [{"role": "user", "content": p}],
                              GenerationSettings(max_new_tokens=12, temperature=0), True).text for p in prompts]
    before = len(server.batcher.batches)
    got: dict[int, str] = {}

    def ask(i):
        body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 12, "temperature": 0}
        got[i] = json.loads(_post(server.url + CHAT, body)[2])["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(len(prompts))] == expected
    sizes = server.batcher.batches[before:]
    assert sum(sizes) == len(prompts) and len(sizes) < len(prompts) and max(sizes) > 1


BAD_BODIES = {
    "max_tokens Infinity": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
    "max_tokens NaN": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}',
    "max_tokens 1e400": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
    "max_tokens 0": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
    "max_tokens 2.5": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}',
    "temperature NaN": b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "temperature -1": b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
    "top_p -1": b'{"messages": [{"role": "user", "content": "x"}], "top_p": -1}',
    "top_p 0": b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}',
    "top_k -3": b'{"messages": [{"role": "user", "content": "x"}], "top_k": -3}',
    "repetition_penalty -1": b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": -1}',
    "seed 2^70": b'{"messages": [{"role": "user", "content": "x"}], "seed": 1180591620717411303424}',
    "seed string": b'{"messages": [{"role": "user", "content": "x"}], "seed": "7"}',
    "deep nesting": b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_request_gets_a_4xx_json_error(server, case):
    for path in (CHAT, "/generate"):
        body = BAD_BODIES[case] if path == CHAT else BAD_BODIES[case].replace(b'"messages"', b'"prompt"')
        status, err = _error(server.url + path, body, raw=True)
        assert status == 400 and err["type"] == "invalid_request_error"
    # the server is still serving
    assert _post(server.url + CHAT, {"messages": MSGS, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("length", ["-1", "abc", "99999999999"])
def test_bad_content_length_gets_a_4xx_json_error(server, length):
    reply = _raw_http(server, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {length}\r\n\r\n{{}}".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] in (b"400", b"413"), reply[:200]
    assert "Content-Length" in json.loads(body)["error"]["message"] or head.split()[1] == b"413"


def _small_server(tiny_run, **kw):
    model, tok, is_chat = load_for_inference(tiny_run / "sft" / "final")
    srv = InferenceServer(model, tok, is_chat, port=0, model_id="m", defaults=GenerationSettings(max_new_tokens=4),
                          **kw)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv, t


def test_slow_clients_time_out_and_connections_are_bounded(tiny_run):
    import socket
    import time

    srv, t = _small_server(tiny_run, timeout=1.0)
    try:
        # a client that sends half its body and stalls gets 408 after the timeout, not a thread forever
        t0 = time.monotonic()
        reply = _raw_http(srv, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"mess".encode())
        assert reply.split()[1] == b"408" and time.monotonic() - t0 < 8
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "timeout"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)

    # two idle connections hold both slots: a third is answered 503 at once. The idle ones must outlive
    # the wait for the server to take them (seconds on a busy machine), so this server's timeout is long.
    srv, t = _small_server(tiny_run, timeout=60.0, max_connections=2)
    try:
        idle = [socket.create_connection(srv.server_address[:2]) for _ in range(2)]
        try:
            deadline = time.monotonic() + 30  # wait until the server has taken both (slow on a busy machine)
            while srv.slots._value > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            reply = _raw_http(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", wait=5)
            assert reply.split()[1] == b"503" and b"server_busy" in reply
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30  # the slots come back once those connections end
        while srv.slots._value < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            assert r.status == 200
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)
