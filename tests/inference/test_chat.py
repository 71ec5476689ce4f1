"""`llmlab chat` through a pseudo-terminal, and the chat loop's edge cases in process."""

from __future__ import annotations

import io
import signal
import sys

import pytest
import torch

from llmlab.inference.chat import run_chat
from llmlab.inference.generation import GenerationSettings, generate_text
from llmlab.inference.loading import load_for_inference

from .conftest import REPLIES, subprocess_env

pexpect = pytest.importorskip("pexpect")

SETTINGS = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 0}


def _spawn(tiny_run):
    args = ["-m", "llmlab", "chat", str(tiny_run), "--stage", "sft", "--seed", "0",
            "--max-new-tokens", "24", "--temperature", "1.0"]
    env = subprocess_env()
    env["TERM"] = "dumb"
    # SIGINT as a terminal delivers it, even when pytest itself was started in the background by a
    # shell without job control (which ignores SIGINT, and an ignored signal stays ignored across exec)
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120, dimensions=(24, 500),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


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
    assert replies == [REPLIES["How are you?"], REPLIES["What is your name?"]]  # learnt to a margin (conftest)
    assert all(r in text for r in replies)  # each message's own reply
    assert "reply capped at" in text and "not sent: the prompt is" in text
    assert generate_text(model, tok, "Hi", greedy, True).text in text  # still chatting afterwards


def _recording(monkeypatch):
    """Record the prompt ids and replies of every turn run_chat generates (the real generate_ids runs)."""
    import llmlab.inference.chat as chat_mod

    real, seen = chat_mod.generate_ids, []

    def spy(model, tokenizer, ids, settings, is_chat, **kw):
        r = real(model, tokenizer, ids, settings, is_chat, **kw)
        seen.append((list(ids), r.text))
        return r

    monkeypatch.setattr(chat_mod, "generate_ids", spy)
    return seen


def test_turn_n_prompt_is_the_chat_template_of_the_whole_history(tiny_run, monkeypatch):
    """Each turn's prompt is apply_chat_template(history, add_generation_prompt=True), token for token the
    SFT training tokenization of the conversation up to the reply; messages are kept stripped as the SFT
    data is (the old loop kept the user's stray spaces in the history)."""
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    seen = _recording(monkeypatch)
    lines = ["  Hello  ", "What is your name?\t", " Do you like music?"]
    out = io.StringIO()
    run_chat(model, tok, True, GenerationSettings(max_new_tokens=12, temperature=0), system="Be brief.",
             read=_reader(iter(lines)), out=out)
    assert len(seen) == 3
    history = [{"role": "system", "content": "Be brief."}]
    for (ids, reply), line in zip(seen, lines):
        history.append({"role": "user", "content": line.strip()})
        want = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids == list(want["input_ids"])
        # the SFT format: the whole conversation tokenized at once (llmlab.data), cut before the reply
        history.append({"role": "assistant", "content": reply.strip()})
        trained = tok.apply_chat_template(history, tokenize=True, return_dict=True)["input_ids"]
        assert list(trained[: len(ids)]) == ids
    assert "outgrew" not in out.getvalue()  # three short turns fit: nothing dropped


def test_a_conversation_longer_than_the_context_is_cut_at_turn_boundaries(tiny_run, monkeypatch):
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    limit = model.config.max_position_embeddings
    seen = _recording(monkeypatch)
    lines = [f"Question {i}: " + "tell me about the light and the waters " * 3 for i in range(12)]
    out = io.StringIO()
    s = GenerationSettings(max_new_tokens=16, temperature=0)
    run_chat(model, tok, True, s, system="You are helpful.", read=_reader(iter(lines)), out=out)
    assert len(seen) == len(lines)

    conversation = []  # every message of the session, in order
    cut_turns = 0
    for (ids, reply), line in zip(seen, lines):
        conversation.append({"role": "user", "content": line.strip()})
        assert len(ids) + 16 <= limit  # room left for the reply
        # the prompt is the system message plus a suffix of WHOLE turns ending with the newest message
        starts = [i for i, m in enumerate(conversation) if m["role"] == "user"]
        renders = {k: tok.apply_chat_template([{"role": "system", "content": "You are helpful."}]
                                              + conversation[starts[k]:], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
                   for k in range(len(starts))}
        matches = [k for k, r in renders.items() if list(r) == ids]
        assert matches, "the prompt is not the rendering of whole turns"
        k = matches[0]
        # ... and the longest such suffix that fits
        assert k == 0 or len(renders[k - 1]) + 16 > limit
        cut_turns = max(cut_turns, k)
        conversation.append({"role": "assistant", "content": reply.strip()})
    assert cut_turns >= 3  # the session did outgrow the context
    text = out.getvalue()
    assert text.count("outgrew the model's 256-token context") == 1  # said once


def test_a_refused_message_leaves_the_conversation_as_it_was(tiny_run, monkeypatch):
    """A message too long for the context is refused; the old loop had already dropped every earlier turn
    to make room for it, so the next message started a new conversation."""
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    seen = _recording(monkeypatch)
    lines = ["Hello", "How are you?", "word " * 400, "What is your name?"]
    out = io.StringIO()
    run_chat(model, tok, True, GenerationSettings(max_new_tokens=8, temperature=0), read=_reader(iter(lines)),
             out=out)
    assert "not sent: the prompt is" in out.getvalue()
    assert len(seen) == 3
    (_, r1), (_, r2), (last, _) = seen
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": r1.strip()},
               {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": r2.strip()},
               {"role": "user", "content": "What is your name?"}]
    assert last == list(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    assert "outgrew" not in out.getvalue()


def test_fit_conversation_drops_the_fewest_whole_turns(tiny_run):
    from llmlab.inference.generation import encode_prompt, fit_conversation, turn_starts

    _, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    msgs = [{"role": "system", "content": "Be kind."}]
    for i in range(9):
        msgs += [{"role": "user", "content": f"message {i} " + "and " * i},
                 {"role": "assistant", "content": f"reply {i}"}]
    msgs.append({"role": "user", "content": "last"})
    starts = turn_starts(msgs)
    assert starts == list(range(1, len(msgs), 2))
    lengths = [len(encode_prompt(tok, msgs[:1] + msgs[s:], True)) for s in starts]
    for limit in range(lengths[-1] + 1, lengths[0] + 10, 7):  # every cut point, by a linear scan
        ids, kept = fit_conversation(tok, msgs, limit, 0)
        k = next(i for i, n in enumerate(lengths) if n <= limit)
        assert kept == msgs[:1] + msgs[starts[k]:] and ids == encode_prompt(tok, kept, True)
    ids, kept = fit_conversation(tok, msgs, lengths[-1] - 1, 0)  # not even the last turn fits: it alone
    assert kept == msgs[:1] + msgs[-1:]
    assert fit_conversation(tok, msgs, None, 10**6)[1] == msgs


def test_a_reply_is_kept_without_its_surrounding_whitespace(tiny_run, monkeypatch):
    """The quick-start model's greedy replies end in runs of spaces ("I't" + 60 spaces, [max tokens]); kept
    as they were, the history filled with whitespace no SFT reply has (its turns are stripped) and from
    turn 5 on the model answered with whitespace only. The reply is stored stripped."""
    import dataclasses

    import llmlab.inference.chat as chat_mod

    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    real, prompts = chat_mod.generate_ids, []

    def padded(model, tokenizer, ids, settings, is_chat, **kw):  # the real reply, as if it ended in blanks
        prompts.append(list(ids))
        r = real(model, tokenizer, ids, settings, is_chat, **kw)
        return dataclasses.replace(r, text=r.text + " " * 30 + "\n")

    monkeypatch.setattr(chat_mod, "generate_ids", padded)
    s = GenerationSettings(max_new_tokens=8, temperature=0)
    run_chat(model, tok, True, s, read=_reader(iter(["Hello", "How are you?"])), out=io.StringIO())
    first = generate_text(model, tok, "Hello", s, True).text
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.strip()},
               {"role": "user", "content": "How are you?"}]
    assert prompts[1] == list(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
