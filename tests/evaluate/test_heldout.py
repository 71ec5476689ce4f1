"""One held-out loss: a stage's last eval_loss is ``llmlab eval``'s number on the same rows.

A shrunken quick-start (pretrain → sft → dpo, real data, fp32) trains a few steps; each stage's last
eval record must equal ``llmlab eval`` of its saved final/ weights on the stage's held-out split to
1e-4. These are two computations on the same weights, so they agree whatever the steps learned.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llmlab.heldout import fit_left, score_tokens, windows
from tests.tiny import TINY, write_recipe

EVAL_STEPS = 100  # × batch_size 8: more than every held-out split here, so each stage covers all of it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from llmlab.commands.run import run_command

    rec = copy.deepcopy(TINY)
    rec["precision"] = "fp32"
    for name, steps in (("pretrain", 4), ("sft", 3), ("dpo", 2)):
        rec["stages"][name].update(max_steps=steps, eval_every=steps, save_every=steps, log_every=1,
                                   eval_steps=EVAL_STEPS)
    d = tmp_path_factory.mktemp("heldout")
    assert run_command(write_recipe(d, rec)) == 0
    return d / "run"


def _last_eval(run_dir, stage: str) -> dict:
    recs = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "eval_loss" in r][-1]


def _llmlab_eval(run_dir, stage: str, dataset: str, tmp_path) -> dict:
    from llmlab.commands.inference import eval_command

    out = tmp_path / f"{stage}.json"
    assert eval_command(run_dir, dataset=dataset, stage=stage, output=out, limit=EVAL_STEPS * 8) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage,dataset", [("pretrain", "bible"), ("sft", "chat")])
def test_lm_stage_eval_loss_is_llmlab_eval_mean_loss(run_dir, tmp_path, stage, dataset):
    ev, rep = _last_eval(run_dir, stage), _llmlab_eval(run_dir, stage, dataset, tmp_path)
    assert ev["eval_examples"] == ev["eval_heldout_examples"] == rep["rows"]
    assert ev["eval_tokens"] == rep["tokens"] > 0
    assert ev["eval_loss"] == pytest.approx(rep["mean_loss"], abs=1e-4)
    if stage == "sft":  # seq_len 64 cuts many chatterbot conversations: both score their tails
        assert ev["eval_truncated"] == rep["truncated"] > 0


def test_dpo_eval_is_llmlab_eval_on_the_pairs(run_dir, tmp_path):
    ev, rep = _last_eval(run_dir, "dpo"), _llmlab_eval(run_dir, "dpo", "chat_pairs", tmp_path)
    assert rep["reference"].endswith("sft/final")  # the stage's reference: its `from` stage
    assert ev["eval_examples"] == rep["pairs"] > 0
    assert ev["eval_loss"] == pytest.approx(rep["loss"], abs=1e-4)
    assert ev["eval_preference_loss"] == pytest.approx(rep["preference_loss"], abs=1e-4)
    assert ev["eval_nll_loss"] == pytest.approx(rep["nll_loss"], abs=1e-4)
    assert ev["eval_rewards/margins"] == pytest.approx(rep["reward_margin"], abs=1e-4)
    assert ev["eval_rewards/accuracies"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)
    first = json.loads((run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0  # the policy is its reference: every pair a tie, loss ln 2
    assert first["eval_preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["eval_rewards/accuracies"] == 0.5  # a tie counts one half (issue #28)


def test_summary_table_says_what_the_eval_loss_covers(run_dir):
    from llmlab.run_summary import coverage_note

    ev = _last_eval(run_dir, "sft")
    assert coverage_note(ev) == ""  # the whole split
    assert coverage_note({**ev, "eval_examples": 3}) == f" (3/{ev['eval_heldout_examples']} ex.)"


class _Bigram(torch.nn.Module):
    """A causal LM whose next-token distribution depends on the current token only: any padding or
    batching that changed a sequence's scores would show."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 11)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_scores_do_not_depend_on_batching_or_padding():
    torch.manual_seed(0)
    model = _Bigram()
    g = torch.Generator().manual_seed(1)
    items = [(torch.randint(0, 11, (n,), generator=g).tolist(), [True] * n) for n in (3, 9, 5, 17, 2)]
    one = score_tokens(model, items, pad_id=0, batch_size=1)
    many = score_tokens(model, items, pad_id=10, batch_size=4)
    assert [c for _, c in one] == [n - 1 for n in (3, 9, 5, 17, 2)]
    for (a, n), (b, m) in zip(one, many):
        assert n == m and a == pytest.approx(b, abs=1e-9)
    by_hand = torch.log_softmax(model.emb.weight.detach().double(), -1)
    ids = items[1][0]
    assert one[1][0] == pytest.approx(sum(float(by_hand[a, b]) for a, b in zip(ids, ids[1:])), abs=1e-5)


def test_over_long_rule_keeps_the_tail_and_windows_score_each_token_once():
    ids, flags, cut = fit_left(list(range(10)), [False] * 6 + [True] * 4, 5)
    assert (ids, flags, cut) == ([5, 6, 7, 8, 9], [False, True, True, True, True], True)
    assert fit_left([1, 2], [False, True], 5) == ([1, 2], [False, True], False)
    ws = windows(list(range(10)), 4)
    scored = [t for w, f in ws for t, s in zip(w, f) if s]
    assert scored == list(range(1, 10)) and all(len(w) <= 4 for w, _ in ws)


class _TinyLM(torch.nn.Module):
    """Embedding + linear head: under bf16 autocast its head computes in bf16."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(11, 16), torch.nn.Linear(16, 11)

    def forward(self, input_ids, attention_mask=None):
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.head(self.emb(input_ids)))


def test_heldout_forward_skips_accelerates_mixed_precision_wrapper():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from llmlab.models.wrappers import unwrap, without_mixed_precision

    torch.manual_seed(0)
    model = _TinyLM()
    ids = torch.randint(0, 11, (2, 7))
    fp32 = model(ids).logits.detach().clone()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        prepared = unwrap(Accelerator(cpu=True, mixed_precision="bf16").prepare(model))
        wrapped = prepared(ids).logits
        assert not torch.equal(wrapped, fp32)  # the wrapper computes in bf16
        with torch.no_grad(), without_mixed_precision(prepared):
            assert torch.equal(prepared(ids).logits, fp32)
        assert torch.equal(prepared(ids).logits, wrapped)  # and is back after the block
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
