"""The main job end to end on a shrunken quick-start: tokenizer → pretrain → sft → dpo, real data."""

import json
import time

import pytest
import torch

from llmlab.commands.run import run_command
from tests.numerics import learning_note
from tests.tiny import write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(d)
    t0 = time.perf_counter()
    assert run_command(recipe) == 0
    return d, recipe, time.perf_counter() - t0


def _stage(d, name):
    return json.loads((d / "run" / name / "stage.json").read_text())


def test_every_stage_leaves_a_loadable_hf_model(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _, _ = tiny_run
    for name in ("pretrain", "sft", "dpo"):
        final = d / "run" / name / "final"
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
        info = _stage(d, name)
        assert info["status"] == "done" and len(info["fingerprint"]) == 64
        lines = [json.loads(x) for x in (d / "run" / name / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in lines) and any("eval_loss" in r for r in lines)
        model = AutoModelForCausalLM.from_pretrained(final)
        tok = AutoTokenizer.from_pretrained(final)
        ids = tok("In the beginning", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 5 or out[0, -1].item() in (tok.eos_token_id,
                                                                           tok.convert_tokens_to_ids("<|im_end|>"))
    assert (d / "run" / "recipe.resolved.yaml").is_file()
    assert (d / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_pretraining_and_sft_eval_loss_fall(tiny_run):
    d, _, _ = tiny_run
    for name in ("pretrain", "sft"):
        info = _stage(d, name)
        first, last = info["first_eval"]["eval_loss"], info["last_eval"]["eval_loss"]
        print(f"{name} eval loss {first:.4f} -> {last:.4f} (x{last / first:.3f})")
        assert last < first, learning_note(f"{name} eval loss {first:.4f} -> {last:.4f}")
    pre = _stage(d, "pretrain")
    first, last = pre["first_eval"]["eval_loss"], pre["last_eval"]["eval_loss"]
    assert last < 0.88 * first, learning_note(  # ~unigram fit in 60 tiny steps
        f"pretrain eval loss {first:.4f} -> {last:.4f}, not below x0.88")


def test_dpo_logs_preference_metrics(tiny_run):
    d, _, _ = tiny_run
    last = _stage(d, "dpo")["last_eval"]
    for key in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected"):
        assert key in last


def test_second_run_skips_everything_quickly(tiny_run, capsys):
    d, recipe, _ = tiny_run
    before = {n: (d / "run" / n / "final" / "model.safetensors").stat().st_mtime_ns for n in ("pretrain", "sft", "dpo")}
    t0 = time.perf_counter()
    assert run_command(recipe) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert out.count("skipped") >= 3
    assert elapsed < 15
    after = {n: (d / "run" / n / "final" / "model.safetensors").stat().st_mtime_ns for n in ("pretrain", "sft", "dpo")}
    assert before == after


def test_editing_one_stage_reruns_it_and_downstream_only(tiny_run, capsys):
    d, recipe, _ = tiny_run
    pre_mtime = (d / "run" / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns
    sft_fp = _stage(d, "sft")["fingerprint"]
    assert run_command(recipe, overrides=["stages.sft.optimizer.lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert "stage pretrain: done" in out and "stage sft: stale" in out and "stage dpo: stale" in out
    assert (d / "run" / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns == pre_mtime
    assert _stage(d, "sft")["fingerprint"] != sft_fp
