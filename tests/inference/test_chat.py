"""`llmlab chat` through a pseudo-terminal, and the chat loop's edge cases in process."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from llmlab.inference.chat import run_chat
from llmlab.inference.generation import GenerationSettings, generate_text
from llmlab.inference.loading import load_for_inference

from .conftest import subprocess_env

pexpect = pytest.importorskip("pexpect")

SETTINGS = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 0}


def _spawn(tiny_run):
    args = ["-m", "llmlab.inference.commands", "chat", str(tiny_run), "--stage", "sft", "--seed", "0",
            "--max-new-tokens", "24", "--temperature", "1.0"]
    env = subprocess_env()
    env["TERM"] = "dumb"
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=60, dimensions=(24, 500))


def _reader(lines):
    """A ``read(prompt)`` for run_chat that answers ``lines`` in turn, then EOF (the user's Ctrl-D)."""
    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    return read


def _norm(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "")


def test_chat_in_a_terminal(tiny_run):
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    expected = generate_text(model, tok, "Hello", GenerationSettings(**SETTINGS), True).text.strip()
    assert expected

    child = _spawn(tiny_run)
    try:
        child.expect_exact(">>> ")
        assert "chat (chat template" in child.before
        child.sendline("Hello")
        child.expect_exact(">>> ")
        first = _norm(child.before)
        assert expected in first  # the reply the model gives for this prompt and seed

        child.sendline("How are you?")  # a second turn sees the history
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(">>> ")
        child.sendline("Hello")  # after /reset the conversation starts afresh: same reply as turn one
        child.expect_exact(">>> ")
        assert expected in _norm(child.before)
        child.sendline("/exit")
        child.expect_exact("Bye.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_ends_cleanly(tiny_run):
    child = _spawn(tiny_run)
    try:
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect_exact("Bye.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
    assert "Traceback" not in (child.before or "")


def test_chat_loop_in_process(tiny_run):
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    lines = iter(["Hello", "/help", "/nonsense", "Hello again"])

    read = _reader(lines)
    out = io.StringIO()
    assert run_chat(model, tok, True, GenerationSettings(max_new_tokens=8, seed=1), read=read, out=out) == 0
    text = out.getvalue()
    assert "Commands:" in text and "unknown command /nonsense" in text and text.endswith("Bye.\n")

    # Ctrl+C while a reply is streaming ends the chat cleanly too
    calls = {"n": 0}

    class Out(io.StringIO):
        def write(self, s):
            calls["n"] += 1
            if calls["n"] == 3:  # banner, mode line, then the first streamed piece
                raise KeyboardInterrupt
            return super().write(s)

    assert run_chat(model, tok, True, GenerationSettings(max_new_tokens=8, seed=1), read=lambda p: "Hi",
                    out=Out()) == 0


def test_base_model_continues_plain_text(tiny_run):
    model, tok, is_chat = load_for_inference(tiny_run / "pretrain" / "final")
    assert not is_chat
    lines = iter(["In the beginning"])
    out = io.StringIO()

    read = _reader(lines)
    s = GenerationSettings(max_new_tokens=10, seed=0)
    run_chat(model, tok, False, s, read=read, out=out)
    expected = generate_text(model, tok, "In the beginning", s, False).text
    assert "plain continuation" in out.getvalue()
    assert "In the beginning" + expected in out.getvalue()
    assert torch.get_num_threads() == 1


def test_chat_keeps_the_prompt_when_the_reply_length_fills_the_context(tiny_run):
    """--max-new-tokens as large as the context once cut each message to one token (255 spaces for any
    message); now the replies follow the message, the cap is stated, and a message too long to fit is
    refused without ending the chat."""
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    s = GenerationSettings(max_new_tokens=256, temperature=0)
    greedy = GenerationSettings(max_new_tokens=24, temperature=0)
    lines = iter(["How are you?", "/reset", "What is your name?", "/reset", "word " * 400, "Hi"])

    read = _reader(lines)
    out = io.StringIO()
    assert run_chat(model, tok, True, s, read=read, out=out) == 0
    text = out.getvalue()
    replies = [generate_text(model, tok, msg, greedy, True).text for msg in ("How are you?", "What is your name?")]
    assert replies[0] != replies[1] and all(r.strip() and r in text for r in replies)  # each message's own reply
    assert "reply capped at" in text and "not sent: the prompt is" in text
    assert generate_text(model, tok, "Hi", greedy, True).text in text  # still chatting afterwards
