"""Online RL: generation, reward sources, GRPO and PPO learning, exact resume, the value head."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.alignment.helpers import (EOS, PAD, ListData, make_ctx, prompt_batch, prompt_data, random_prompts,
                                     run_steps, tiny_classifier, tiny_lm, tiny_tokenizer)
from tests.numerics import learning_note

W5 = {"builtin": "token_fraction", "token": "w5"}


# -- generation ---------------------------------------------------------------------------------
def test_sampling_is_seeded_and_matches_unpadded_logps():
    from llmlab.rl.generation import make_generator, sample, sequence_forward

    model = tiny_lm(0)
    prompts = random_prompts(6, torch.Generator().manual_seed(3))
    b = prompt_batch(prompts)
    ids, mask = b["prompt_input_ids"], b["prompt_attention_mask"]
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    c1, m1 = sample(model, ids, mask, generator=make_generator(7, "cpu"), **kw)
    c2, m2 = sample(model, ids, mask, generator=make_generator(7, "cpu"), **kw)
    c3, _ = sample(model, ids, mask, generator=make_generator(8, "cpu"), **kw)
    assert torch.equal(c1, c2) and torch.equal(m1, m2)
    assert not torch.equal(c1, c3)
    # top_k = 1 is greedy; greedy with the KV cache equals HF generate's greedy decoding
    g1, _ = sample(model, ids, mask, generator=make_generator(1, "cpu"), top_k=1, **kw)
    g0, _ = sample(model, ids, mask, generator=make_generator(2, "cpu"), temperature=0.0, **kw)
    assert torch.equal(g1, g0)
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=EOS,
                             pad_token_id=PAD)[0, len(p):]
        assert g0[i, :len(ref)].tolist() == ref.tolist()
    # log-probs of left-padded batches equal those of each prompt alone (positions are right)
    lp = sequence_forward(model, ids, mask, c1, m1, temperature=1.0)
    for i, p in enumerate(prompts):
        n = int(m1[i].sum())
        alone = sequence_forward(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                 c1[i:i + 1, :n], m1[i:i + 1, :n])
        torch.testing.assert_close(lp[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_top_p_keeps_the_nucleus():
    from llmlab.rl.generation import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [[True, True, True, False]]


# -- reward sources -----------------------------------------------------------------------------
def _rollout(tok):
    from llmlab.rl.rewards import Rollout

    b = prompt_batch([[5, 6], [7]])
    comp = torch.tensor([[8, 8, 9, 1], [8, 10, 0, 0]])  # "w5 w5 w6 <eos>", "w5 w7"
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    texts = [tok.decode(c[m.bool()].tolist(), skip_special_tokens=True) for c, m in zip(comp, cmask)]
    return Rollout(b["prompt_input_ids"], b["prompt_attention_mask"], comp, cmask, b["prompts"], texts)


def test_python_reward_needs_allow_code():
    from llmlab.rl.rewards import RewardConfigError
    from llmlab.stages.grpo import GRPOStage

    spec = [{"function": "tests.alignment.helpers:w5_fraction"}]
    with pytest.raises(RewardConfigError) as err:
        GRPOStage(make_ctx("grpo", {"reward": spec}))
    msg = str(err.value)
    assert "stages.stage.reward[0].function" in msg and "Python code" in msg and "--allow-code" in msg
    stage = GRPOStage(make_ctx("grpo", {"reward": spec + [W5]}, allow_code=True))
    stage.setup(tiny_lm(0))
    r = _rollout(stage.ctx.tokenizer)
    # the function counts decoded words (EOS skipped), the builtin counts tokens (EOS included);
    # the stage reward is their sum
    torch.testing.assert_close(stage.reward_fn(r), torch.tensor([2 / 3 + 2 / 4, 1 / 2 + 1 / 2]))


def test_builtin_rewards_and_weights():
    from llmlab.rl.rewards import RewardConfigError, RewardFunction

    tok = tiny_tokenizer()
    ctx = make_ctx("grpo", {}, tokenizer=tok)
    fn = RewardFunction([{**W5, "weight": 2.0}, {"builtin": "contains", "text": "w7"},
                         {"builtin": "length", "target": 4, "weight": 0.5}], ctx)
    r = _rollout(tok)
    expected = 2.0 * torch.tensor([2 / 4, 1 / 2]) + torch.tensor([0.0, 1.0]) + 0.5 * torch.tensor([0.0, -0.5])
    torch.testing.assert_close(fn(r), expected)
    with pytest.raises(RewardConfigError, match="exactly one"):
        RewardFunction([{"builtin": "token_fraction", "token": "w1 w2"}], ctx)
    with pytest.raises(RewardConfigError, match="not one of"):
        RewardFunction([{"builtin": "nope"}], ctx)
    with pytest.raises(RewardConfigError, match="exactly one of"):
        RewardFunction([{"builtin": "contains", "text": "x", "from": "rm"}], ctx)


@pytest.mark.parametrize("text,answer", [
    ("81", "81"), (" 81.\n", "81"), ("81.0", "81.0"), ("081", "081"),
    ("I think <answer> 12 </answer>", "12"), ("<answer>1</answer> no, <answer>2</answer>", "2"),
    ("so the total is \\boxed{7}.", "7"), ("3 + 4 = 7 #### 7", "7"), ("The answer is 81", "The answer is 81"),
    ("81 82", "81 82"), ("", "")])
def test_extract_answer_rules(text, answer):
    from llmlab.rl.rewards import extract_answer

    assert extract_answer(text) == answer


def test_exact_answer_reward_compares_exactly_with_the_rows_answer():
    from llmlab.rl.rewards import Rollout, RewardFunction, exact_answer_rewards

    completions = ["81", "81 or 82", "<answer>81</answer>", "81.0", "18", "81", "anything"]
    answers = ["81", "81", "81", "81", "81", "Step by step: 80 + 1 #### 81", ""]
    assert exact_answer_rewards(completions, answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="7 completions but 1 reference"):
        exact_answer_rewards(completions, ["81"])
    ctx = make_ctx("grpo", {}, allow_code=True)
    n = len(completions)
    ids, mask = torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long)
    r = Rollout(ids, mask, ids, mask, [[{"role": "user", "content": "q"}]] * n, completions, answers)
    fn = RewardFunction([{"builtin": "exact_answer"},
                         {"function": "tests.alignment.helpers:matches_answer", "weight": 10.0}], ctx)
    # the Python function is handed the answers as TRL hands dataset columns: answer=[...]
    want = torch.tensor([1.0, 0, 1, 0, 0, 1, 0]) + 10 * torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(fn(r), want)
    # data without an answer column: the builtin scores 0, never raises
    no_answers = Rollout(ids, mask, ids, mask, r.prompts, completions)
    assert RewardFunction([{"builtin": "exact_answer"}], ctx)(no_answers).tolist() == [0.0] * n


def test_eval_reports_greedy_exact_answer_rate_on_the_held_out_prompts():
    """eval_exact_answer is the share of held-out prompts whose greedy completion is the reference
    answer (train answers are never looked at); eval_reward_se is the standard error of eval_reward."""
    import math

    from llmlab.rl.generation import make_generator, rollout_seed, sample
    from llmlab.stages.grpo import GRPOStage

    cfg = {"batch_size": 8, "group_size": 2, "max_new_tokens": 1, "kl_beta": 0.0,
           "reward": [{"builtin": "exact_answer"}]}
    stage = GRPOStage(make_ctx("grpo", cfg))
    model = tiny_lm(0)
    stage.setup(model)
    tok = stage.ctx.tokenizer
    g = torch.Generator().manual_seed(5)
    held_out = prompt_batch(random_prompts(16, g))
    greedy, gmask = sample(model, held_out["prompt_input_ids"], held_out["prompt_attention_mask"], max_new_tokens=1,
                           generator=make_generator(0, "cpu"), temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    words = [tok.decode(c[m.bool()].tolist(), skip_special_tokens=True) for c, m in zip(greedy, gmask)]
    assert all(words)
    # the first 10 answers are what the model says greedily, the next 4 are not, the last 2 rows have
    # no reference answer (they do not count)
    held_out["answers"] = words[:10] + [("w1" if w != "w1" else "w2") for w in words[10:14]] + ["", ""]
    train = prompt_batch(random_prompts(8, g))
    train["answers"] = ["w0"] * 8
    stage._data = ListData([train], [held_out])
    out = stage.evaluate(model, stage.eval_batches())
    assert out["eval_exact_answer"] == 10 / 14
    assert out["eval_exact_answer_se"] == pytest.approx(math.sqrt(10 / 14 * 4 / 14 / 14))
    # eval_reward: the same reward on completions sampled with the stage's settings and the eval seed
    comp, cmask = sample(model, held_out["prompt_input_ids"], held_out["prompt_attention_mask"], max_new_tokens=1,
                         generator=make_generator(rollout_seed(0, "stage", 0, salt="eval"), "cpu"),
                         temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    sampled = [tok.decode(c[m.bool()].tolist(), skip_special_tokens=True) for c, m in zip(comp, cmask)]
    r = torch.tensor([float(bool(a) and s == a) for s, a in zip(sampled, held_out["answers"])])
    assert out["eval_reward"] == pytest.approx(float(r.mean()))
    assert out["eval_reward_se"] == pytest.approx(float(r.std()) / math.sqrt(16))
    assert out["eval_loss"] == -out["eval_reward"]
    # prompts without answers: no exact-answer metric
    del held_out["answers"]
    assert "eval_exact_answer" not in stage.evaluate(model, stage.eval_batches())


def test_closing_table_shows_the_rl_stages_held_out_metrics_first_to_last():
    from llmlab.run_summary import key_metrics

    first = {"eval_exact_answer": 0.156, "eval_reward": 0.133, "eval_loss": -0.133}
    last = {"eval_exact_answer": 0.582, "eval_reward": 0.473, "eval_loss": -0.473}
    assert key_metrics(last, first) == "exact 0.156 → 0.582, reward 0.133 → 0.473"
    assert key_metrics(last) == "exact 0.582, reward 0.473"


def test_reward_model_sources(tmp_path):
    """{from: STAGE} scores the ids directly; {model: PATH} decodes and re-tokenizes with its own
    tokenizer. Both equal scoring the same text by hand."""
    from llmlab.rl.rewards import RewardFunction
    from llmlab.stages.reward import reward_scores

    tok = tiny_tokenizer()
    rm = tiny_classifier(0)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(tmp_path / "rm" / "final")
    ctx = make_ctx("ppo", {}, tokenizer=tok, stage_paths={"rm": tmp_path / "rm"})
    r = _rollout(tok)
    got = RewardFunction([{"from": "rm"}], ctx)(r)
    seqs = [[5, 6, 8, 8, 9, 1], [7, 8, 10]]
    want = torch.stack([reward_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    torch.testing.assert_close(got, want)

    # an external reward model whose tokenizer numbers the words differently (reversed vocabulary)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i in reversed(range(61)):
        vocab[f"w{i}"] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    other.save_pretrained(tmp_path / "ext")
    rm.save_pretrained(tmp_path / "ext")
    got = RewardFunction([{"model": str(tmp_path / "ext")}], ctx)(r)
    want = []
    for p, c in zip(["w2 w3", "w4"], ["w5 w5 w6", "w5 w7"]):
        enc = other(p, c, return_tensors="pt")
        want.append(reward_scores(rm, enc["input_ids"], enc["attention_mask"])[0])
    torch.testing.assert_close(got, torch.stack(want))
    assert not torch.allclose(got, RewardFunction([{"from": "rm"}], ctx)(r))


# -- learning -----------------------------------------------------------------------------------
def test_grpo_raises_reward_of_fresh_samples():
    from llmlab.stages.grpo import GRPOStage

    cfg = {"batch_size": 8, "group_size": 4, "max_new_tokens": 8, "kl_beta": 0.04, "reward": [W5]}
    stage = GRPOStage(make_ctx("grpo", cfg))
    model = tiny_lm(0)
    stage._data = prompt_data(64, 8)
    stage.setup(model)
    before = stage.evaluate(model, stage.eval_batches())["eval_reward"]
    history, _ = run_steps(stage, model, 45, lr=3e-3)
    after = stage.evaluate(model, stage.eval_batches())["eval_reward"]
    print(f"grpo eval reward {before:.3f} -> {after:.3f}; kl {history[-1]['kl']:.3f}")
    assert before < 0.05
    assert after > before + 0.4 and history[-1]["reward"] > history[0]["reward"] + 0.3, learning_note(
        f"grpo eval reward {before:.3f} -> {after:.3f}, batch reward {history[0]['reward']:.3f} -> "
        f"{history[-1]['reward']:.3f} in 45 steps")
    assert 0 < history[-1]["kl"] < 3.0  # per-token k3 KL to the reference
    for key in ("reward", "reward_std", "group_reward_var", "best_of_group", "kl", "clip_fraction",
                "completion_length", "policy_loss", "approx_kl"):
        assert key in history[-1]


def _ppo(kl_coef: float, steps: int = 60):
    from llmlab.stages.ppo import PPOStage

    cfg = {"batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 2, "max_new_tokens": 8,
           "kl_coef": kl_coef, "reward": [W5]}
    stage = PPOStage(make_ctx("ppo", cfg))
    model = tiny_lm(0)
    stage._data = prompt_data(16, 32)
    stage.setup(model)
    before = stage.evaluate(model, stage.eval_batches())["eval_reward"]
    history, _ = run_steps(stage, model, steps, lr=1e-2)
    after = stage.evaluate(model, stage.eval_batches())["eval_reward"]
    return before, after, history


def test_ppo_raises_reward_and_kl_coef_bounds_kl():
    before, after, h = _ppo(0.02)
    _, after_strong, h_strong = _ppo(0.3)
    print(f"ppo eval reward {before:.3f} -> {after:.3f} (kl/seq {h[-1]['kl']:.2f}); "
          f"kl_coef 0.3: -> {after_strong:.3f} (kl/seq {h_strong[-1]['kl']:.2f})")
    assert before < 0.05
    assert after > before + 0.3 and h[-1]["reward"] > h[0]["reward"] + 0.2, learning_note(
        f"ppo eval reward {before:.3f} -> {after:.3f}, batch reward {h[0]['reward']:.3f} -> {h[-1]['reward']:.3f}")
    assert h_strong[-1]["kl"] < h[-1]["kl"]  # a larger penalty keeps the policy closer
    assert h[-1]["kl"] / h[-1]["completion_length"] < 4.0  # nats per token under the weak penalty; 3.04 measured
    for key in ("reward", "kl", "value_loss", "policy_loss", "clip_fraction", "approx_kl",
                "explained_variance"):
        assert key in h[-1]


# -- schedule and resume ------------------------------------------------------------------------
def test_index_schedule():
    from llmlab.stages.ppo import PPOStage

    stage = PPOStage(make_ctx("ppo", {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 3,
                                      "gradient_accumulation_steps": 2, "reward": [W5]}))
    assert stage.updates_per_rollout == 6
    assert stage.locate(0) == (0, 0, 0, 0)
    assert stage.locate(1) == (0, 0, 0, 1)
    assert stage.locate(2) == (0, 0, 1, 0)
    assert stage.locate(5) == (0, 1, 0, 1)
    assert stage.locate(12) == (1, 0, 0, 0)
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOStage(make_ctx("ppo", {"batch_size": 8, "mini_batch_size": 3, "reward": [W5]}))


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what llmlab.train.checkpoint does


@pytest.mark.parametrize("kind,stop", [("grpo", 3), ("grpo_one_update", 3), ("ppo", 4), ("ppo", 5)])
def test_resume_is_exact(kind, stop):
    """Stop after `stop` updates (mid-rollout or at a rollout boundary), restore model, optimizer and
    stage state into fresh objects, continue: the weights equal an uninterrupted run bit for bit."""
    from llmlab.stages.grpo import GRPOStage
    from llmlab.stages.ppo import PPOStage

    cls = PPOStage if kind == "ppo" else GRPOStage
    cfg = {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 5,
           "kl_coef": 0.05, "kl_target": 1.0, "group_size": 2, "reward": [W5]}
    if kind == "grpo_one_update":  # the rollout keeps no old log-probs (reuses_logps)
        cfg.update(mini_batch_size=4, ppo_epochs=1)
        kind = "grpo"
    total = 8

    def fresh():
        stage = cls(make_ctx(kind, dict(cfg)))
        model = tiny_lm(0)
        if kind == "ppo":
            stage.build_model = None  # (the loop calls build_model; here setup attaches the head)
        stage._data = prompt_data(8, 4)
        stage.setup(model)
        return stage, model

    straight_stage, model = fresh()
    run_steps(straight_stage, model, total, lr=1e-2)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    stage, model = fresh()
    _, opt = run_steps(stage, model, stop, lr=1e-2)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "stage": stage.state_dict()})

    stage2, model2 = fresh()
    model2.load_state_dict(saved["model"])
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    stage2.load_state_dict(saved["stage"])
    run_steps(stage2, model2, total - stop, lr=1e-2, start=stop, opt=opt2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, straight[k]), k
    if kind == "ppo":
        assert any("v_head" in k for k in straight)
        assert stage2.kl_coef == straight_stage.kl_coef != 0.05  # the adaptive coefficient moved and resumed


# -- value head ---------------------------------------------------------------------------------
def test_value_head_checkpoint_final_and_lora(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmlab.models.build import apply_lora
    from llmlab.rl.value_head import get_value_head, load_value_head
    from llmlab.stages.ppo import PPOStage

    tiny_lm(0).save_pretrained(tmp_path / "sft" / "final")
    lora = {"preset": "all", "r": 4, "alpha": 8}
    ctx = make_ctx("ppo", {"batch_size": 4, "max_new_tokens": 4, "ppo_epochs": 1, "lora": lora,
                           "reward": [{"builtin": "length", "target": 2}]}, tmp_path)
    ctx.init_path = tmp_path / "sft" / "final"
    stage = PPOStage(ctx)
    model = apply_lora(stage.build_model(), lora)
    stage._data = prompt_data(4, 4)
    stage.setup(model)
    assert stage.reference.use_disabled_adapter
    head = get_value_head(model)
    assert all(p.requires_grad for p in head.parameters())  # trains although PEFT froze the base
    run_steps(stage, model, 3, lr=1e-2)
    assert head.summary.weight.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "v_head" in n for n in trainable)
    # checkpoints: the head is part of the model's state dict
    assert any(k.endswith("v_head.summary.weight") for k in model.state_dict())
    # final/: finalize moves the head out; the merged model is a plain causal LM
    merged = stage.finalize(model).merge_and_unload()
    assert not hasattr(merged, "v_head")
    merged.save_pretrained(tmp_path / "ppo_final")
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_final")
    restored = load_value_head(tiny_lm(0), tmp_path / "stage" / "value_head.safetensors")
    torch.testing.assert_close(restored.summary.weight, head.summary.weight)


def test_grpo_one_update_per_rollout_skips_the_old_logp_forward(monkeypatch):
    """With one update per rollout and no dropout, the rollout's "old" log-probs are the loss
    forward's own: the rollout skips that forward, and training follows the same trajectory as
    with it (up to float rounding between the eval-mode and train-mode forwards)."""
    import llmlab.stages.online as online
    from llmlab.stages.online import has_active_dropout
    from llmlab.stages.grpo import GRPOStage

    cfg = {"batch_size": 4, "group_size": 4, "max_new_tokens": 6, "kl_beta": 0.04, "reward": [W5]}
    calls = []
    real = online.sequence_forward
    monkeypatch.setattr(online, "sequence_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def train(force_old_logps: bool):
        stage = GRPOStage(make_ctx("grpo", dict(cfg)))
        if force_old_logps:
            stage.reuses_logps = lambda model: False
        model = tiny_lm(0)
        stage._data = prompt_data(16, 4)
        stage.setup(model)
        calls.clear()
        history, _ = run_steps(stage, model, 6, lr=1e-2)
        return model, history, len(calls)

    reused, h_reused, n_reused = train(False)
    explicit, h_explicit, n_explicit = train(True)
    assert not has_active_dropout(reused)
    # rollout-time forwards: policy + reference per rollout, or the reference alone
    assert (n_explicit, n_reused) == (12, 6)
    assert "rollout_kl" in h_explicit[-1] and "rollout_kl" not in h_reused[-1]
    assert all(h["clip_fraction"] == 0.0 and h["approx_kl"] == 0.0 for h in h_reused)
    for (name, a), b in zip(reused.named_parameters(), explicit.parameters()):
        assert torch.allclose(a, b, atol=1e-4), name

    dropped = tiny_lm(0)
    dropped.config.dropout = 0.1
    assert has_active_dropout(dropped)
    assert not GRPOStage(make_ctx("grpo", dict(cfg))).reuses_logps(dropped)
    assert not GRPOStage(make_ctx("grpo", {**cfg, "ppo_epochs": 2})).reuses_logps(tiny_lm(0))


def test_sample_categorical_draws_the_distribution():
    from llmlab.rl.generation import sample_categorical

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_categorical(probs.expand(200_000, -1) * 3.0, g)  # unnormalised rows are fine
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.004), freq
    assert freq[1] == 0 and freq[4] == 0  # zero-probability ids never come out
    again = sample_categorical(probs.expand(1000, -1), torch.Generator().manual_seed(0))
    assert torch.equal(again, sample_categorical(probs.expand(1000, -1), torch.Generator().manual_seed(0)))
