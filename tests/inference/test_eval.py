"""`llmlab eval`: perplexity / bits per byte against an independent computation, preference metrics,
reward models, prompt sampling, dataset specs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab.inference.datasets import DatasetError, load_eval_rows
from llmlab.inference.evaluate import evaluate_model
from llmlab.inference.loading import load_for_inference

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And God said, Let there be light: and there was light.",
         "Jesus wept.",
         "Blessed are the meek: for they shall inherit the earth. Blessed are they which do hunger."]


def _logp(model, ids, n_prompt):
    """Summed log-probability of ids[n_prompt:] given ids[:n_prompt], one unbatched forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return float(lp[n_prompt - 1:].sum())


def test_perplexity_equals_exp_mean_token_loss(tiny_run, tmp_path):
    from llmlab.commands.inference import eval_command

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "report.json"
    assert eval_command(tiny_run / "pretrain" / "final", dataset=str(data), output=out, batch_size=3) == 0
    report = json.loads(out.read_text())

    # Independently: each document conditioned on BOS, mean cross-entropy from the model's own loss.
    model, tok, _ = load_for_inference(tiny_run / "pretrain" / "final")
    total, count = 0.0, 0
    for t in TEXTS:
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert report["kind"] == "text" and report["tokens"] == count
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert report["bytes"] == n_bytes
    assert report["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-4)


def test_long_documents_are_windowed_without_changing_short_ones(tiny_run):
    model, tok, _ = load_for_inference(tiny_run / "pretrain" / "final")
    rows = [{"text": " ".join(TEXTS * 3)}]
    full = evaluate_model(model, tok, rows, "text")
    windowed = evaluate_model(model, tok, rows, "text", max_length=32)
    assert windowed["tokens"] == full["tokens"]  # every token still scored exactly once
    # independently: 32-token windows overlapping by one, each scored by the model's own loss (a
    # comparison with the full-context perplexity would assert what the tiny model learnt)
    ids = [tok.bos_token_id] + tok(rows[0]["text"], add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * 32  # several windows
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, 31):
        w = torch.tensor([ids[s: s + 32]])
        with torch.no_grad():
            total += model(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
        count += w.shape[1] - 1
    assert count == windowed["tokens"] == len(ids) - 1
    assert windowed["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert full["perplexity"] != pytest.approx(windowed["perplexity"], rel=1e-4)  # the windows did cut context


def test_preference_implicit_rewards_match_an_independent_computation(tiny_run):
    policy, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    ref, _, _ = load_for_inference(tiny_run / "pretrain" / "final")
    _, rows = load_eval_rows("chatterbot_pairs", limit=12)
    beta = 0.2
    res = evaluate_model(policy, tok, rows, "preference", reference=ref, beta=beta, batch_size=5)

    def seq_logps(model, row, key):
        p_text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        # as the sft/dpo training data is tokenized: no BOS; the reply and its <|im_end|> are scored,
        # the newline after it is not
        assert full.startswith(p_text) and full.endswith("<|im_end|>\n")
        p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
        c_ids = tok(full[len(p_text):-1], add_special_tokens=False)["input_ids"]
        n_tokens[key] = len(c_ids)
        return _logp(model, p_ids + c_ids, len(p_ids))

    n_tokens = {}

    margins, wins, logp_wins, avg_wins = [], [], [], []
    for r in rows:
        rc = beta * (seq_logps(policy, r, "chosen") - seq_logps(ref, r, "chosen"))
        rr = beta * (seq_logps(policy, r, "rejected") - seq_logps(ref, r, "rejected"))
        margins.append(rc - rr)
        wins.append(rc > rr)
        logp_wins.append(seq_logps(policy, r, "chosen") > seq_logps(policy, r, "rejected"))
        avg_wins.append(seq_logps(policy, r, "chosen") / n_tokens["chosen"]
                        > seq_logps(policy, r, "rejected") / n_tokens["rejected"])
    assert res["pairs"] == len(rows) == 12
    assert res["reward_margin"] == pytest.approx(sum(margins) / len(rows), rel=1e-3, abs=1e-4)
    assert res["reward_accuracy"] == pytest.approx(sum(wins) / len(rows))
    assert res["logp_accuracy"] == pytest.approx(sum(logp_wins) / len(rows))
    assert res["avg_logp_accuracy"] == pytest.approx(sum(avg_wins) / len(rows))

    same = evaluate_model(policy, tok, rows, "preference", reference=policy)
    assert same["reward_margin"] == pytest.approx(0.0, abs=1e-6) and same["reward_accuracy"] == 0.5  # all ties: one half each


def test_reward_model_accuracy(tiny_run, tmp_path):
    from transformers import LlamaForSequenceClassification

    _, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    policy_cfg = json.loads((tiny_run / "sft" / "final" / "config.json").read_text())
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in policy_cfg.items() if k in ("vocab_size", "hidden_size",
                         "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")}, num_labels=1)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm, rtok, _ = load_for_inference(tmp_path / "rm")
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    _, rows = load_eval_rows("chatterbot_pairs", limit=6)
    res = evaluate_model(rm, rtok, rows, "preference", is_chat=True)

    def score(msgs):
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return float(rm(torch.tensor([ids])).logits[0, 0])

    diffs = [score(r["prompt"] + r["chosen"]) - score(r["prompt"] + r["rejected"]) for r in rows]
    assert res["reward_model"] is True
    assert res["reward_accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
    assert res["reward_margin"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4, abs=1e-5)


def test_prompt_and_conversation_kinds(tiny_run):
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    _, convs = load_eval_rows("chatterbot", limit=5)
    res = evaluate_model(model, tok, convs, "conversation")
    # only the assistant turns (content + <|im_end|>) are scored
    expected = sum(len(tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                   for r in convs for m in r["messages"] if m["role"] == "assistant")
    assert res["tokens"] == expected and math.isfinite(res["perplexity"])

    _, prompts = load_eval_rows("chatterbot", limit=5, kind="prompt")
    a = evaluate_model(model, tok, prompts, "prompt", num_samples=3)
    b = evaluate_model(model, tok, prompts, "prompt", num_samples=3)
    assert a["prompts"] == 3 and [s["completion"] for s in a["samples"]] == [s["completion"] for s in b["samples"]]
    assert all(s["prompt"][-1]["role"] == "user" for s in a["samples"])


def test_dataset_specs(tmp_path):
    kind, rows = load_eval_rows("kjv", limit=3)
    assert kind == "text" and len(rows) == 3 and "God" in rows[0]["text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2"):
        load_eval_rows(str(bad))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"prompt": "b", "chosen": "c", "rejected": "d"}\n')
    with pytest.raises(DatasetError, match="several kinds"):
        load_eval_rows(str(mixed))
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\nstill first\n\nsecond doc\n")
    assert load_eval_rows(str(txt)) == ("text", [{"text": "first doc\nstill first"}, {"text": "second doc"}])
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                              "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}))
    kind, rows = load_eval_rows(str(hh))
    assert kind == "preference" and rows[0]["prompt"] == [{"role": "user", "content": "q"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    with pytest.raises(DatasetError, match="not a dataset of the run or a builtin"):
        load_eval_rows("no_such_thing")


def test_local_builtin_reader_without_llmlab_data():
    from llmlab.inference.datasets import _local_builtin

    rows = _local_builtin("chatterbot_pairs")
    assert len(rows) > 500
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)


def test_recipe_dataset_name_gives_its_held_out_rows():
    sources = pytest.importorskip("llmlab.data.sources")
    recipe = {"seed": 5, "datasets": {"pairs": {"builtin": "chatterbot_pairs", "eval_split": 0.1}}}
    kind, held_out = load_eval_rows("pairs", recipe=recipe)
    splits = sources.load_named_dataset(recipe, "pairs")
    assert kind == "preference" and len(held_out) == len(splits.eval) > 0
    train = {json.dumps(r, sort_keys=True) for r in splits.train.to_list()}
    assert not any(json.dumps(r, sort_keys=True) in train for r in held_out)


def test_lm_eval_is_optional(tiny_run, monkeypatch):
    import importlib.util

    from llmlab.commands.inference import eval_command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    assert eval_command(tiny_run / "sft" / "final", tasks=["hellaswag"]) == 1


def test_templates_without_generation_markers_score_the_same_tokens(tiny_run):
    import copy

    from llmlab.inference.evaluate import _chat_scored

    _, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]
    for last_k in (None, 1):
        marked = _chat_scored(tok, msgs, last_k, 256)
        assert _chat_scored(plain, msgs, last_k, 256) == marked
        assert sum(marked[1]) > 0
    assert sum(_chat_scored(tok, msgs, 1, 256)[1]) < sum(_chat_scored(tok, msgs, None, 256)[1])


def test_sequences_cut_to_the_length_limit_are_counted(tiny_run, tmp_path, capsys):
    """Conversations and preference pairs longer than --max-length are cut from the left; the report says
    how many (it used to cut them silently), and `llmlab eval` prints a note."""
    from llmlab.commands.inference import eval_command

    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    long = [{"role": "user", "content": "Tell me about the light " * 8}, {"role": "assistant", "content": "No."}]
    convs = [{"messages": short}, {"messages": long}, {"messages": short + long}]
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in convs]
    limit = 40
    assert lengths[0] <= limit < min(lengths[1:])  # the oracle: two of the three do not fit
    assert evaluate_model(model, tok, convs, "conversation", max_length=limit)["truncated"] == 2
    assert evaluate_model(model, tok, convs, "conversation")["truncated"] == 0

    pairs = [{"prompt": short[:1], "chosen": short[1:], "rejected": long[1:]},
             {"prompt": long[:1], "chosen": short[1:], "rejected": long[1:]}]
    res = evaluate_model(model, tok, pairs, "preference", max_length=limit, reference=model)
    assert res["truncated"] == 1 and evaluate_model(model, tok, pairs, "preference")["truncated"] == 0

    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in convs))
    out = tmp_path / "report.json"
    assert eval_command(tiny_run / "sft" / "final", dataset=str(data), output=out, max_length=limit) == 0
    assert json.loads(out.read_text())["truncated"] == 2
    assert "note: 2 row(s) were longer than the length limit" in capsys.readouterr().err
