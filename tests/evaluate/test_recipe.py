"""The evaluate stage in recipes: schema, defaults filled by resolution, semantic checks, messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
name: t
tokenizer:
  train: {datasets: [bible], vocab_size: 512}
  chat_template: chatml
model: {arch: transformer, d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 128}
datasets:
  bible: {builtin: kjv, eval_split: 0.05}
  chat: {builtin: chatterbot, eval_split: 0.1}
  pairs: {builtin: chatterbot_pairs, eval_split: 0.1}
  prompts: {builtin: chatterbot_prompts, eval_split: 0.1}
  pairs_all: {builtin: chatterbot_pairs}
stages:
  pretrain: {type: pretrain, datasets: {bible: 1.0}, max_steps: 10}
  sft: {type: sft, datasets: {chat: 1.0}, max_steps: 10}
  rm: {type: reward, datasets: {pairs: 1.0}, max_steps: 10}
  dpo: {type: dpo, datasets: {pairs: 1.0}, max_steps: 10}
"""


def _load(tmp_path, extra: str = "", base: str = BASE):
    path = tmp_path / "r.yaml"
    path.write_text(base + extra)
    return load_recipe(path, env={})


def _ok(tmp_path, extra: str = "", base: str = BASE) -> dict:
    resolved, errors = _load(tmp_path, extra, base)
    assert not errors, "\n".join(map(str, errors))
    return resolved


def _errors(tmp_path, extra: str = "", base: str = BASE) -> list[str]:
    resolved, errors = _load(tmp_path, extra, base)
    assert resolved is None and errors
    return [str(e) for e in errors]


def test_the_example_from_the_issue_validates_and_resolves(tmp_path):
    r = _ok(tmp_path, """\
  compare:
    type: evaluate
    models: [pretrain, sft, dpo]
    datasets: {bible: 1, pairs: 1}
    reference_from: sft
    beta: 0.1
    max_samples: 200
    max_new_tokens: 32
""")
    c = r["stages"]["compare"]
    assert c == {"type": "evaluate", "models": ["pretrain", "sft", "dpo"], "datasets": {"bible": 1, "pairs": 1},
                 "reference_from": "sft", "beta": 0.1, "max_samples": 200, "num_samples": 8, "max_new_tokens": 32,
                 "temperature": 0.8, "batch_size": 8}
    assert list(r["stages"]) == ["pretrain", "sft", "rm", "dpo", "compare"]


def test_resolution_fills_defaults_and_no_training_keys(tmp_path):
    r = _ok(tmp_path, "  compare: {type: evaluate, datasets: {bible: null}}\n")
    c = r["stages"]["compare"]
    # default models: every earlier stage that trains a language model (the reward model is left out)
    assert c["models"] == ["pretrain", "sft", "dpo"]
    assert c["beta"] == 0.1 and c["max_samples"] == 200 and c["max_new_tokens"] == 32
    assert c.get("reference_from") is None and c.get("reward_from") is None
    for key in ("max_steps", "from", "seq_len", "log_every", "optimizer", "scheduler", "lora", "mixing"):
        assert key not in c, key


def test_an_evaluate_stage_in_the_middle_is_not_the_next_stages_from(tmp_path):
    base = BASE.replace("  dpo: {type: dpo", "  mid: {type: evaluate, datasets: {chat: 1}}\n  dpo: {type: dpo")
    r = _ok(tmp_path, "  end: {type: evaluate, datasets: {pairs: 1}, reward_from: rm}\n", base=base)
    assert r["stages"]["mid"]["models"] == ["pretrain", "sft"]
    assert r["stages"]["dpo"]["from"] == "rm"  # the previous *training* stage, as before
    assert r["stages"]["end"]["models"] == ["pretrain", "sft", "dpo"]


def test_reward_stages_can_be_listed_explicitly(tmp_path):
    r = _ok(tmp_path, "  compare: {type: evaluate, models: [rm, dpo], datasets: {pairs: 1}, reference_from: sft}\n")
    assert r["stages"]["compare"]["models"] == ["rm", "dpo"]


def test_an_evaluate_stage_extends_the_quickstart(tmp_path):
    (tmp_path / "q.yaml").write_text(
        f"extends: {ROOT / 'recipes' / 'quickstart.yaml'}\n"
        "stages:\n  compare:\n    type: evaluate\n    datasets: {bible: 1, chat: 1, chat_pairs: 1}\n"
        "    reference_from: sft\n")
    r, errors = load_recipe(tmp_path / "q.yaml", env={})
    assert not errors, "\n".join(map(str, errors))
    assert r["stages"]["compare"]["models"] == ["pretrain", "sft", "dpo"]


@pytest.mark.parametrize("extra, fragment", [
    ("  compare: {type: evaluate, models: [pretrain, sfft], datasets: {bible: 1}}\n",
     "stages.compare.models[1]: models: 'sfft' is not a stage (did you mean 'sft'?)"),
    (("  compare: {type: evaluate, models: [pretrain, later], datasets: {bible: 1}}\n"
      "  later: {type: sft, datasets: {chat: 1.0}, max_steps: 10}\n"),
     "stages.compare.models[1]: models: 'later' must name an earlier stage; 'later' runs after this one"),
    ("  compare: {type: evaluate, models: [compare], datasets: {bible: 1}}\n",
     "models: 'compare' must name an earlier stage; 'compare' is this stage"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, optimizer: {name: adamw}}\n",
     "stages.compare.optimizer: unknown key 'optimizer' in stages.compare; an evaluate stage trains nothing"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, scheduler: {name: cosine}}\n",
     "an evaluate stage trains nothing, so 'scheduler' (a training setting) does not apply"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, max_steps: 10}\n",
     "an evaluate stage trains nothing, so 'max_steps' (a training setting) does not apply"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, lora: {r: 8}}\n",
     "an evaluate stage trains nothing, so 'lora' (a training setting) does not apply"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, lr: 0.001}\n",
     "an evaluate stage trains nothing, so 'lr' (a training setting) does not apply"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, max_sample: 5}\n",
     "unknown key 'max_sample' in stages.compare (did you mean 'max_samples'?)"),
    ("  compare: {type: evaluate, models: [pretrain]}\n",
     "stages.compare.datasets: missing required key 'datasets'"),
    ("  compare: {type: evaluate, datasets: {bibel: 1}}\n",
     "stages.compare.datasets.bibel: unknown dataset 'bibel' (did you mean 'bible'?)"),
    ("  compare: {type: evaluate, datasets: {pairs_all: 1}}\n",
     "dataset 'pairs_all' has no held-out rows to evaluate on; give it an eval_split > 0"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, reference_from: rm}\n",
     "reference_from: 'rm' is a reward stage; expected a stage that trains a language model"),
    ("  compare: {type: evaluate, datasets: {prompts: 1}, reward_from: sft}\n",
     "reward_from: 'sft' is a sft stage; expected a reward stage"),
    ("  compare: {type: evaluate, datasets: {bible: 1}}\n  again: {type: evaluate, models: [compare], datasets: {bible: 1}}\n",
     "models: 'compare' is an evaluate stage, which trains nothing and has no weights"),
    (("  compare: {type: evaluate, datasets: {bible: 1}}\n"
      "  more: {type: dpo, datasets: {pairs: 1.0}, max_steps: 5, reference_from: compare}\n"),
     "stages.more.reference_from: reference_from: 'compare' is an evaluate stage"),
    ("  compare: {type: evaluate, datasets: {bible: 1}, max_samples: 0}\n",
     "stages.compare.max_samples: 0 is out of range; expected a value ≥ 1"),
    ("  compare: {type: evaluate, models: [], datasets: {bible: 1}}\n",
     "stages.compare.models: needs at least 1 item(s), got 0"),
])
def test_bad_evaluate_stages(tmp_path, extra, fragment):
    errors = _errors(tmp_path, extra)
    assert any(fragment in e for e in errors), "\n".join(errors)


def test_an_evaluate_stage_before_any_training_stage_has_nothing_to_evaluate(tmp_path):
    base = BASE.replace("stages:\n", "stages:\n  first: {type: evaluate, datasets: {bible: 1}}\n")
    errors = _errors(tmp_path, base=base)
    assert any("stages.first: an evaluate stage needs an earlier stage that trains a language model" in e
               for e in errors), errors


def test_training_stage_hints_never_point_at_evaluate(tmp_path):
    errors = _errors(tmp_path, "  more: {type: pretrain, datasets: {bible: 1.0}, max_steps: 5, max_samples: 3}\n")
    assert any("unknown key 'max_samples' in stages.more" in e and "evaluate" not in e for e in errors), errors


def test_docs_describe_the_evaluate_stage():
    docs = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert "## stages.NAME (type: evaluate)" in docs
    for key in ("models", "reward_from", "max_samples", "num_samples", "max_new_tokens"):
        assert f"| `{key}`" in docs
