"""The recipe means what it says (issue 15): each test failed on the code of 2026-11-30."""

from __future__ import annotations

from pathlib import Path

from llmlab.fingerprint import stage_fingerprints, stage_inputs
from llmlab.recipe import load_recipe, stage_order
from tests.tiny import TINY, write_recipe


def test_from_null_trains_from_the_model_section(tmp_path):
    from llmlab.plan import plan_rows

    stages = {k: dict(v) for k, v in TINY["stages"].items()}
    stages["sft"]["from"] = None
    rec, errors = load_recipe(write_recipe(tmp_path, {**TINY, "stages": stages}))
    assert errors == []
    order = stage_order(rec)
    assert stage_inputs(rec, "sft", order)["from"] is None
    assert stage_inputs(rec, "dpo", order)["from"] == "sft"  # the default is still the previous stage
    rows = {r["stage"]: r for r in plan_rows(rec)[0]}
    assert rows["sft"]["from"] == "model" and rows["dpo"]["from"] == "sft"
    # sft no longer depends on pretrain: changing pretrain leaves sft's fingerprint alone
    fp = stage_fingerprints(rec, order)["sft"]["fingerprint"]
    rec["stages"]["pretrain"]["optimizer"]["lr"] = 0.5
    assert stage_fingerprints(rec, order)["sft"]["fingerprint"] == fp


def _short_stages(**steps):
    out = {}
    for name, n in steps.items():
        st = dict(TINY["stages"][name])
        st.update(max_steps=n, save_every=n, eval_every=n, log_every=1)
        out[name] = st
    return out


def test_only_checks_inputs_before_deleting_anything(tmp_path, capsys):
    from llmlab.commands.run import run_command

    recipe = write_recipe(tmp_path, {**TINY, "stages": _short_stages(pretrain=4, sft=3, dpo=2)})
    assert run_command(recipe) == 0
    dpo = tmp_path / "run" / "dpo"
    finished = sorted(p.relative_to(dpo) for p in dpo.rglob("*"))
    capsys.readouterr()
    # sft's input changes: sft is stale, and dpo reads it
    assert run_command(recipe, overrides=["stages.sft.optimizer.lr=0.0005"], only="dpo") == 1
    out = capsys.readouterr().out
    assert "stage dpo reads stage sft" in out and "stale" in out and "--from sft" in out
    assert "starting over" not in out
    assert sorted(p.relative_to(dpo) for p in dpo.rglob("*")) == finished  # nothing deleted


def test_validate_refuses_what_cannot_run(tmp_path):
    import yaml

    rec = {**TINY, "datasets": {**TINY["datasets"], "mine": {"path": "data/missing.jsonl", "format": "messages"}}}
    stages = {k: dict(v) for k, v in TINY["stages"].items()}
    stages["sft"]["datasets"] = {"chat": 1.0, "mine": 1.0}
    stages["dpo"]["lora"] = {"preset": "custom", "target_modules": ["q_proj", "qkv_proj", "c_attn"]}
    path = write_recipe(tmp_path, {**rec, "stages": stages})
    lines = path.read_text().splitlines()
    _, errors = load_recipe(path)
    by_path = {e.path: e for e in errors}
    missing = by_path["datasets.mine.path"]
    assert "no such file" in missing.message and str(tmp_path / "data" / "missing.jsonl") in missing.message
    assert lines[missing.line - 1].strip().startswith("path:")
    lora = by_path["stages.dpo.lora.target_modules"]
    assert "['qkv_proj', 'c_attn'] name no module" in lora.message and "'q_proj'" in lora.message
    # with the file present and real module names, the same recipe is valid
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "missing.jsonl").write_text("")
    stages["dpo"]["lora"]["target_modules"] = ["q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    path.write_text(yaml.safe_dump({**rec, "stages": stages, "output_dir": "run"}, sort_keys=False))
    assert load_recipe(path)[1] == []


def test_a_bad_set_key_is_reported_at_the_set(tmp_path):
    path = write_recipe(tmp_path)
    _, errors = load_recipe(path, overrides=["seed=3", "stages.sft.optimizr.lr=1e-3"])
    assert [(e.file, e.line, e.path) for e in errors] == [("--set", 2, "stages.sft.optimizr")]


def test_pinned_precision_is_part_of_the_fingerprint(tmp_path):
    rec, _ = load_recipe(write_recipe(tmp_path))
    order = stage_order(rec)
    auto = stage_fingerprints(rec, order)
    rec["precision"] = "bf16"
    bf16 = stage_fingerprints(rec, order)
    assert all(auto[n]["fingerprint"] != bf16[n]["fingerprint"] for n in order)
    assert bf16["pretrain"]["parts"]["precision"] == "bf16"


def test_an_extended_stage_says_it_differs_from_a_fresh_run(tmp_path, capsys):
    import json

    from llmlab.commands.run import run_command
    from llmlab.runplan import build_run_plan

    recipe = write_recipe(tmp_path, {**TINY, "stages": _short_stages(pretrain=3)})
    assert run_command(recipe) == 0
    assert run_command(recipe, overrides=["stages.pretrain.max_steps=5"]) == 0
    info = json.loads((tmp_path / "run" / "pretrain" / "stage.json").read_text())
    assert info["extended_from"] == [3] and info["max_steps"] == 5
    rec, _ = load_recipe(recipe, overrides=["stages.pretrain.max_steps=5"])
    status, detail = build_run_plan(rec).status("pretrain")
    assert status == "done" and "extended from 3" in detail and "fresh 5-step run" in detail


def test_byte_identical_data_in_another_folder_is_the_same_source(tmp_path):
    import shutil

    from llmlab.fingerprint import source_fingerprint, tokenizer_fingerprint

    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "x.jsonl").write_text('{"text": "In the beginning"}\n')
    (a / "y.txt").write_text("God created the heaven\n")
    shutil.copytree(a, b)
    for kind in ("", "/sub/x.jsonl", "/**/*.jsonl"):
        assert source_fingerprint({"path": f"{a}{kind}", "format": "text"}) == \
            source_fingerprint({"path": f"{b}{kind}", "format": "text"}), kind
    (b / "sub" / "x.jsonl").write_text('{"text": "In the end"}\n')  # content still counts
    assert source_fingerprint({"path": str(a)}) != source_fingerprint({"path": str(b)})
    # a local tokenizer directory counts by its files, not its path
    tok_a, tok_b = tmp_path / "tok_a", tmp_path / "tok_b"
    tok_a.mkdir()
    (tok_a / "tokenizer.json").write_text("{}")
    shutil.copytree(tok_a, tok_b)
    fp = [tokenizer_fingerprint({"tokenizer": {"from_pretrained": str(t)}, "datasets": {}}) for t in (tok_a, tok_b)]
    assert fp[0] == fp[1]


def test_moving_a_recipe_with_its_data_keeps_every_stage_done(tmp_path):
    import shutil

    from llmlab.commands.run import run_command
    from llmlab.runplan import build_run_plan

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    lines = [f"Verse {i}: and the earth was without form, and void; number {i * 7}." for i in range(400)]
    (proj / "data" / "text.txt").write_text("\n\n".join(lines) + "\n")
    rec = {**TINY, "datasets": {"bible": {"path": "data/text.txt", "format": "text", "eval_split": 0.05}},
           "stages": _short_stages(pretrain=3)}
    recipe = write_recipe(proj, rec)
    assert run_command(recipe) == 0
    moved = tmp_path / "moved"
    shutil.move(proj, moved)
    resolved, errors = load_recipe(moved / recipe.name)
    assert errors == []
    assert build_run_plan(resolved).status("pretrain")[0] == "done"


def test_merge_finds_the_base_of_a_moved_run_and_never_overwrites_without_force(tmp_path):
    import json
    import shutil

    import pytest
    import torch
    from transformers import PreTrainedTokenizerFast

    from llmlab.merge import merge_adapter
    from llmlab.models.build import apply_lora, build_model

    run = tmp_path / "run"
    torch.manual_seed(0)
    base = build_model(TINY["model"], vocab_size=300)
    base.save_pretrained(run / "pretrain" / "final")
    peft_model = apply_lora(base, {"preset": "all", "r": 4, "alpha": 8, "dropout": 0.0}, "transformer_gated")
    peft_model.save_pretrained(run / "sft" / "adapter")
    cfg = run / "sft" / "adapter" / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    meta["base_model_name_or_path"] = str(run / "pretrain" / "final")  # absolute, as a stage records it
    cfg.write_text(json.dumps(meta))
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.save_pretrained(run / "sft" / "adapter")

    moved = tmp_path / "moved"
    shutil.move(run, moved)
    out = merge_adapter(moved / "sft" / "adapter", tmp_path / "merged")
    assert (out / "config.json").is_file()
    with pytest.raises(FileExistsError, match="--force"):
        merge_adapter(moved / "sft" / "adapter", tmp_path / "merged")
    merge_adapter(moved / "sft" / "adapter", tmp_path / "merged", force=True)
    lone = tmp_path / "lone_adapter"
    shutil.copytree(moved / "sft" / "adapter", lone)
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="does not exist .*pass --base"):
        merge_adapter(lone, tmp_path / "merged2")


def test_a_child_recipe_removes_inherited_entries_with_null(tmp_path):
    base = write_recipe(tmp_path, {**TINY, "stages": {**_short_stages(pretrain=2, sft=2, dpo=2)}}, name="base.yaml")
    stages = _short_stages(sft=2)
    stages["sft"]["datasets"] = {"chat": 1.0, "chat_pairs": 1.0}
    mixed = write_recipe(tmp_path, {**TINY, "stages": {**_short_stages(pretrain=2), **stages}}, name="mixed.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {mixed.name}\nstages:\n  sft:\n    datasets:\n      chat_pairs: null\n")
    rec, errors = load_recipe(child)
    assert errors == []
    assert rec["stages"]["sft"]["datasets"] == {"chat": 1.0}
    child.write_text(f"extends: {base.name}\nstages:\n  dpo: null\ndatasets:\n  chat_pairs: null\n")
    rec, errors = load_recipe(child)
    assert errors == [] and list(rec["stages"]) == ["pretrain", "sft"] and "chat_pairs" not in rec["datasets"]
    # elsewhere null keeps its meaning: from: null is the model section
    child.write_text(f"extends: {base.name}\nstages:\n  sft:\n    from: null\n")
    rec, errors = load_recipe(child)
    assert errors == [] and rec["stages"]["sft"]["from"] is None


def test_unquoted_env_placeholder_in_a_flow_mapping_gets_a_hint(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text("name: x\nstages:\n  sft: {type: sft, optimizer: {name: adamw, lr: ${LR}}}\n")
    _, errors = load_recipe(path, env={"LR": "1e-3"})
    assert len(errors) == 1 and errors[0].line == 3
    assert 'quote ${VAR}: {lr: "${LR}"}' in errors[0].message


def test_report_to_a_tracker_that_is_not_installed_fails_validation(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = write_recipe(tmp_path, logging={"report_to": ["wandb"]})
    _, errors = load_recipe(path)
    assert [e.path for e in errors] == ["logging.report_to[0]"]
    assert "pip install 'llmlab[logging]'" in errors[0].message


def test_plan_counts_with_the_real_tokenizer_and_the_adapter_a_stage_continues(tmp_path, capsys):
    from rich.console import Console

    from llmlab.models.params import count_lora_parameters, count_parameters
    from llmlab.commands.recipe import plan_command
    from llmlab.plan import plan_rows
    from llmlab.runner import Runner

    stages = _short_stages(pretrain=2, sft=2, dpo=2)
    stages["sft"]["lora"] = {"preset": "minimal", "r": 4, "alpha": 8, "merge": False}
    tok = {**TINY["tokenizer"], "train": {**TINY["tokenizer"]["train"], "vocab_size": 60000}}
    path = write_recipe(tmp_path, {**TINY, "tokenizer": tok, "stages": stages})
    rec, _ = load_recipe(path)
    rows, facts = plan_rows(rec)
    assert facts["vocab_size"] == 60000 and facts["tokenizer"] == "absent"
    Runner(rec, Console(quiet=True)).ensure_tokenizer()
    rows, facts = plan_rows(rec)
    real = facts["vocab_size"]
    assert facts["tokenizer"] == "current" and real < 60000  # 200 chapters cannot fill 60,000 merges
    assert facts["params"] == count_parameters(rec["model"], real)
    rows = {r["stage"]: r for r in rows}
    adapter = count_lora_parameters(rec["model"], real, stages["sft"]["lora"])
    assert rows["sft"]["trainable"] == adapter
    assert rows["dpo"]["trainable"] == adapter  # dpo continues sft's unmerged adapter
    capsys.readouterr()
    assert plan_command(path) == 0
    assert "exact:" in capsys.readouterr().out
    # a changed tokenizer section: the run's tokenizer no longer counts, and plan says how to recover
    rec2, _ = load_recipe(path, overrides=["tokenizer.train.vocab_size=600"])
    assert plan_rows(rec2)[1]["tokenizer"] == "changed" and plan_rows(rec2)[1]["vocab_size"] == 600
    assert plan_command(path, overrides=["tokenizer.train.vocab_size=600"]) == 0
    out = capsys.readouterr().out
    assert "retrains it and then every stage" in out and "another output_dir" in out


def test_a_moved_run_continues_an_unmerged_adapter(tmp_path):
    import json
    import shutil

    from llmlab.commands.run import run_command

    stages = _short_stages(pretrain=2, sft=2, dpo=2)
    stages["sft"]["lora"] = {"preset": "minimal", "r": 4, "alpha": 8, "merge": False}
    proj = tmp_path / "proj"
    proj.mkdir()
    recipe = write_recipe(proj, {**TINY, "stages": stages})
    assert run_command(recipe, until="sft") == 0
    info = json.loads((proj / "run" / "sft" / "stage.json").read_text())
    assert info["init_path"] == "pretrain/final" and info["outputs"]["adapter"] == "sft/adapter"
    moved = tmp_path / "moved"
    shutil.move(proj, moved)
    assert run_command(moved / recipe.name) == 0  # dpo continues sft's adapter from the new place
    dpo = json.loads((moved / "run" / "dpo" / "stage.json").read_text())
    assert dpo["init_adapter"] == "sft/adapter" and dpo["init_path"] == "pretrain/final"
