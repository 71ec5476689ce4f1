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
    proc = subprocess.Popen([sys.executable, "-m", "llmlab.inference.commands", "serve", str(tiny_run),
                             "--stage", "sft", "--port", "0", "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
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
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
