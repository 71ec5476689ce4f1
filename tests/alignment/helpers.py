"""Tiny models, a word-level tokenizer and hand-made batches for the alignment tests.

Everything is built in memory (no hub access): a 64-token word-level tokenizer and tiny Llama models
from a config, obeying the batch contract of docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64
PAD, EOS, UNK = 0, 1, 2


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
    for i in range(VOCAB - 3):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_lm(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def tiny_classifier(seed: int = 0, **kw):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(num_labels=1, **kw)).eval()


def make_ctx(stage_type: str, config: dict, tmp_path: Path | None = None, tokenizer=None,
             allow_code: bool = False, stage_paths=None, name: str = "stage"):
    from llmlab.stages.base import StageContext

    root = Path(tmp_path) if tmp_path is not None else Path("/tmp/llmlab-test")
    recipe = {"seed": 0, "output_dir": str(root), "stages": {name: {"type": stage_type, **config}}}
    return StageContext.bare(recipe, name, tokenizer if tokenizer is not None else tiny_tokenizer(),
                             stage_paths=stage_paths or {}, allow_code=allow_code)


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = []
    for r in rows:
        fill = [value] * (T - len(r))
        out.append(fill + r if left else r + fill)
    return torch.tensor(out, dtype=torch.long)


def preference_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict:
    """(prompt, chosen completion, rejected completion) token lists -> the dpo/reward batch."""
    out = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        ids = [p[0] + p[k] for p in pairs]
        labels = [[-100] * len(p[0]) + p[k] for p in pairs]
        out[f"{side}_input_ids"] = pad_rows(ids, PAD)
        out[f"{side}_attention_mask"] = pad_rows([[1] * len(r) for r in ids], 0)
        out[f"{side}_labels"] = pad_rows(labels, -100)
    return out


def prompt_batch(prompts: list[list[int]]) -> dict:
    """Token lists -> the grpo/ppo batch (left-padded)."""
    return {
        "prompt_input_ids": pad_rows(prompts, PAD, left=True),
        "prompt_attention_mask": pad_rows([[1] * len(p) for p in prompts], 0, left=True),
        "prompts": [[{"role": "user", "content": " ".join(f"w{t - 3}" for t in p)}] for p in prompts],
    }


class ListData:
    """Stand-in for llmlab.data's StageData: train_batch(index) cycles a list of batches."""

    def __init__(self, train: list[dict], eval: list[dict] | None = None):
        self.train, self.eval = train, eval or []
        self.shares = {}

    def train_batch(self, index: int) -> dict:
        return self.train[index % len(self.train)]

    def eval_batches(self) -> list[dict]:
        return self.eval

    def heldout(self):
        """No held-out set: stages over ListData are evaluated on ``eval_batches``."""
        return None


def w5_fraction(prompts, completions):
    """A Python reward function (for ``{function: ...}`` tests): the fraction of words that are w5."""
    return [c.split().count("w5") / max(len(c.split()), 1) for c in completions]


def random_prompts(n: int, generator: torch.Generator) -> list[list[int]]:
    return [torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=generator)),),
                          generator=generator).tolist() for _ in range(n)]


def prompt_data(n_batches: int, batch_size: int, n_eval: int = 16, seed: int = 0) -> ListData:
    g = torch.Generator().manual_seed(seed)
    train = [prompt_batch(random_prompts(batch_size, g)) for _ in range(n_batches)]
    return ListData(train, [prompt_batch(random_prompts(n_eval, g))])


def run_steps(stage, model, steps: int, lr: float, start: int = 0, opt=None):
    """A minimal stand-in for llmlab.train.loop: one optimizer update per index."""
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for i in range(start, start + steps):
        loss, metrics = stage.compute_loss(model, stage.get_batch(i, model))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(metrics)
    return history, opt


def matches_answer(prompts, completions, answer):
    """A TRL-style Python reward function taking the dataset's ``answer`` column: 1.0 on a match."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
